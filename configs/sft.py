"""Stage 3: instruction tuning (causal-LM loss on the target tokens).

Trains LoRA on q/k/v of the LLM, the video and audio projections, and the bridges under the
modality rule (VECB learns from video and audio+video samples, AECB from audio and audio+video).
``--config=configs/sft.py`` is paper scale (Qwen3-4B, LoRA r=512/alpha=512, 16 frames, 12 s,
context 2048); ``--config=configs/sft.py:tiny`` fits a 2-core CPU. Its random-init CLIP vision and
HuBERT towers are trained in stages 1-2 (see ``configs/align_video.py``) and come from those
checkpoints; here they stay frozen as in the paper: trained on at stage 3's learning rate too, they
stopped carrying the cues (demo at step 300: train loss 0.15 and cue accuracy at chance, against 0.10
with them frozen).
"""

from __future__ import annotations

import ml_collections

from configs import align_audio, align_video, common


def get_config(variant: str = "") -> ml_collections.ConfigDict:
    variant = common.check_variant(variant)
    c = common.base_config("sft")
    c.variant = variant
    c.init_from.model = ""  # model checkpoint of tools/import_weights.py (every weight; its LoRA folded in)
    c.init_from.llm = ""  # HF folder of Qwen/Qwen3-4B (or Qwen2.5-7B-Instruct)
    c.init_from.clip = ""
    c.init_from.hubert = ""
    c.init_from.video_bridge = ""  # stage-1 workdir (its checkpoints/ hold VECB + heads)
    c.init_from.audio_bridge = ""  # stage-2 workdir
    c.init_from.tokenizer = ""  # "" = the LLM folder's tokenizer

    c.model = ml_collections.ConfigDict()
    common.runtime_options(c.model)
    # presets of models/presets.py (or HF fields); init_from folders' config.json wins
    video, audio = align_video.get_config(variant).model, align_audio.get_config(variant).model
    c.model.llm = "tiny" if variant == "tiny" else "qwen3-4b"
    c.model.clip = video.clip
    c.model.hubert = audio.hubert
    c.model.text_encoder = audio.text_encoder  # sizes the AECB text head of the stage-2 checkpoint
    c.model.bridge_layers = 2
    c.model.num_frames = 16
    # Width of the bridges' stage 1-2 heads (unused here; it must match the checkpoints of init_from.*_bridge).
    c.model.align_dim = video.align_dim  # one width for both bridges' heads
    # Positions whose [rows, chunk, vocab] fp32 logits the loss holds at a time (the whole [rows, 2048, vocab]
    # would be the step's largest buffer); a smaller chunk frees HBM, a larger one makes wider matmuls.
    c.model.loss_chunk = 512
    c.model.remat = "full"  # LLM layers in the backward pass: the choices of model.remat_towers (configs/common.py)
    c.model.lora = ml_collections.ConfigDict(
        dict(rank=512, alpha=512.0, dropout=0.05, targets=("q_proj", "k_proj", "v_proj")))
    c.model.train_bridges = True  # False: bridges frozen in stage 3
    c.model.train_encoders = False  # True: CLIP vision + HuBERT train too, from stages 1-2 (tiny only)

    c.data.max_audio_seconds = 12.0
    c.data.max_context = 2048
    # An over-long condition keeps its tail (the question and "###Assistant: " stay): our choice. "head"
    # keeps the first max_context positions, as the release's prompt_wrap does (docs/architecture.md).
    c.data.truncate = "tail"
    c.data.length_buckets = (256, 512, 768, 1024, 1536, 2048, 2560, 3072)
    c.optim.learning_rate = 2e-5  # [reconstructed]
    c.optim.warmup_steps = 200  # [reconstructed]
    c.optim.weight_decay = 0.0  # LoRA fine-tuning without decay [reconstructed]
    c.data.batch_size = 32  # [reconstructed]
    c.optim.accum_steps = 1
    c.train.steps = 5_000  # [reconstructed]
    if variant == "tiny":
        common.tiny_overrides(c)
        c.model.remat = "none"
        # The tiny LLM is random-init (no pretrained base to adapt), so it is fully fine-tuned: rank -1.
        c.model.lora = ml_collections.ConfigDict(
            dict(rank=-1, alpha=16.0, dropout=0.0, targets=("q_proj", "k_proj", "v_proj")))
        c.data.max_audio_seconds = 3.0
        c.data.max_context = 512
        c.data.length_buckets = (384, 512, 640, 768)
        c.optim.learning_rate = 2e-3
        c.train.steps = 200
    return c
