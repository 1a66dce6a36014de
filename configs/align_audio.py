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


def hubert_architecture(variant: str) -> ml_collections.ConfigDict:
    """HF ``HubertConfig`` fields; used when ``init_from.hubert`` is empty."""
    if variant == "tiny":
        return ml_collections.ConfigDict(dict(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            conv_dim=(32, 32, 32), conv_kernel=(10, 8, 8), conv_stride=(5, 8, 8),
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
            feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
        ))
    return ml_collections.ConfigDict(dict(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
        conv_dim=(512,) * 7, conv_kernel=(10, 3, 3, 3, 3, 2, 2), conv_stride=(5, 2, 2, 2, 2, 2, 2),
        num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
        feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
    ))


def text_encoder_architecture(variant: str) -> ml_collections.ConfigDict:
    """HF ``BertConfig`` fields of the LaBSE-shaped sentence encoder; used when ``init_from.text_encoder`` is empty."""
    if variant == "tiny":
        return ml_collections.ConfigDict(dict(
            vocab_size=2048, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128,
        ))
    return ml_collections.ConfigDict(dict(
        vocab_size=501153, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
        max_position_embeddings=512,
    ))


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    variant = common.check_variant(variant)
    c = common.base_config("align_audio")
    c.variant = variant
    c.init_from.hubert = ""  # HF folder of TencentGameMate/chinese-hubert-large
    c.init_from.text_encoder = ""  # sentence-transformers folder of LaBSE
    c.init_from.tokenizer = ""  # caption tokenizer folder ("" = the text encoder folder's)

    c.model = ml_collections.ConfigDict()
    c.model.hubert = hubert_architecture(variant)
    c.model.text_encoder = text_encoder_architecture(variant)
    c.model.bridge_layers = 2
    c.model.align_dim = 768
    c.model.text_dim = 768
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
        c.model.text_dim = 32
        c.model.text_pooling = "mean"
        c.model.train_encoders = True
        c.data.max_audio_seconds = 3.0
        c.train.steps = 150
    return c
