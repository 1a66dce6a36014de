"""Stage 1: VECB pretraining (L_cva + l1 L_ftd + l2 L_mfm) with CLIP frozen.

``--config=configs/align_video.py`` is paper scale (CLIP ViT-L/14 @224, 16 frames);
``--config=configs/align_video.py:tiny`` fits a 2-core CPU. Its CLIP towers are random-init (no
weights may be downloaded) and so are trained here (``model.train_encoders``): frozen, a random ViT's
per-frame CLS is nearly the same vector for every clip (near-uniform attention averages the patches,
so mouth, brows and eyes, a few pixels each, vanish) and the contrastive loss cannot move off ln(B).
The paper variant keeps CLIP frozen.
"""

from __future__ import annotations

import ml_collections

from configs import common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    variant = common.check_variant(variant)
    c = common.base_config("align_video")
    c.variant = variant
    c.init_from.clip = ""  # HF folder of openai/clip-vit-large-patch14
    c.init_from.tokenizer = ""  # tokenizer folder for the captions ("" = the CLIP folder's)

    c.model = ml_collections.ConfigDict()
    common.runtime_options(c.model)
    c.model.clip = "tiny" if variant == "tiny" else "clip-vit-l14"  # a preset of models/presets.py, or HF fields
    c.model.num_frames = 16
    c.model.bridge_layers = 2
    c.model.align_dim = 768
    c.model.train_encoders = False  # the paper freezes CLIP; True trains both towers too (tiny only)

    c.loss = ml_collections.ConfigDict()
    c.loss.tau_init = 0.07  # CLIP's initial temperature; learnable through a log-scale parameter [reconstructed]
    c.loss.max_logit_scale = 100.0  # CLIP's clip on 1/tau
    c.loss.ftd_weight = 1.0  # l1 [reconstructed]
    c.loss.mfm_weight = 1.0  # l2 [reconstructed]
    c.loss.mask_ratio = 0.5

    c.data.max_text_tokens = 77
    c.optim.learning_rate = 1e-4  # [reconstructed]
    c.data.batch_size = 256  # [reconstructed]
    c.train.steps = 20_000  # [reconstructed]
    if variant == "tiny":
        common.tiny_overrides(c)
        c.model.align_dim = 32
        c.model.num_frames = 16
        c.model.train_encoders = True
        c.train.steps = 150
    return c
