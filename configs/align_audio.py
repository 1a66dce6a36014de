"""Stage 2: AECB pretraining (L_caa) with HuBERT and LaBSE frozen.

``--config=configs/align_audio.py`` is paper scale (chinese-hubert-large, first 12 s, LaBSE);
``--config=configs/align_audio.py:tiny`` fits a 2-core CPU. Its HuBERT and sentence encoder are
random-init and so are trained here (``model.train_encoders``): frozen, they give nearly the same
vector for every clip and caption, and the contrastive loss stays at ln(B). The paper variant keeps
both frozen. The tiny sentence encoder also mean-pools its tokens instead of LaBSE's CLS: our captions
carry no [CLS] token and all start with "A", and a random BERT's first position is then the same
vector for every caption (cosine 1.000), so the text side starts collapsed and training stalls.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    variant = common.check_variant(variant)
    c = common.base_config("align_audio")
    c.variant = variant
    c.init_from.hubert = ""  # HF folder of TencentGameMate/chinese-hubert-large
    c.init_from.text_encoder = ""  # sentence-transformers folder of LaBSE
    c.init_from.tokenizer = ""  # caption tokenizer folder ("" = the text encoder folder's)

    c.model = ml_collections.ConfigDict()
    common.runtime_options(c.model)
    # presets of models/presets.py (or HF fields); init_from folders' config.json wins
    c.model.hubert = "tiny" if variant == "tiny" else "hubert-large"
    c.model.text_encoder = "tiny" if variant == "tiny" else "labse"
    c.model.bridge_layers = 2
    c.model.align_dim = 768
    c.model.text_pooling = "cls"  # LaBSE's sentence pooling
    c.model.train_encoders = False  # the paper freezes HuBERT and LaBSE; True trains them too (tiny only)

    c.loss = ml_collections.ConfigDict()
    c.loss.tau_init = 0.07  # [reconstructed]
    c.loss.max_logit_scale = 100.0

    c.data.max_audio_seconds = 12.0
    c.data.max_text_tokens = 128
    c.optim.learning_rate = 1e-4  # [reconstructed]
    c.data.batch_size = 128  # [reconstructed]
    c.train.steps = 20_000  # [reconstructed]
    if variant == "tiny":
        common.tiny_overrides(c)
        c.model.align_dim = 32
        c.model.text_pooling = "mean"
        c.model.train_encoders = True
        c.data.max_audio_seconds = 3.0
        c.train.steps = 150
    return c
