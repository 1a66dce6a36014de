"""Stage-3 train step throughput: ours (JAX) vs a PyTorch composition of the same tiny model.

``python -m bench.train [--steps 10] [--batch-size 4]`` builds the tiny stage-3 config
(``configs/sft.py:tiny``) on a small synthetic world, takes one real collated batch, and times
full train steps (forward, backward, AdamW) of

- ours: the jitted, sharded step of :mod:`xemogpt_jax.trainer` on one device;
- PyTorch: the same architecture composed from transformers modules (CLIPVisionModel, HubertModel,
  CLIPEncoderLayer / HubertEncoderLayer bridges, Qwen3ForCausalLM), the same trainable set and AdamW.

It prints samples/s and tokens/s side by side, and our achieved FLOP/s (XLA cost analysis of the
step) against a measured matmul peak of this machine. Numbers, not assertions: nothing here is a test.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--world", default="", help="an existing synthetic world (default: write a small one)")
    return parser.parse_args()


def stage3_config(world: Path, batch_size: int):
    from configs import sft

    config = sft.get_config("tiny")
    config.data.train_dir = str(world / "train")
    config.init_from.tokenizer = str(world / "tokenizer")
    config.data.batch_size = batch_size
    config.data.max_audio_seconds = 2.0
    config.data.length_buckets = (384, 512, 640)
    return config


def time_steps(step, count: int) -> float:
    """Seconds per step, after two warm-up steps (compilation, allocator)."""
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(count):
        step()
    return (time.perf_counter() - start) / count


def ours(config, task, local, steps: int) -> tuple[float, float | None]:
    from xemogpt_jax import optim, sharding, trainer
    from xemogpt_jax.metrics import compiled_flops

    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    engine = trainer.build_engine(task, optim.make_optimizer(config.optim, config.train.steps), mesh, config.seed)
    with jax.set_mesh(mesh):
        batch = trainer.global_batch(local, mesh, task.pad_values)
        flops = compiled_flops(engine.step_fn.lower(engine.trained, engine.frozen, batch))

        def step():
            engine.trained, out = engine.step_fn(engine.trained, engine.frozen, batch)
            out["loss"].block_until_ready()

        return time_steps(step, steps), flops


def torch_model(config, model_config):
    """The tiny XEmoGPT composed from transformers modules, plus its trainable parameters."""
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, HubertConfig, HubertModel, Qwen3Config, Qwen3ForCausalLM
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.hubert.modeling_hubert import HubertEncoderLayer

    vision_hf = CLIPVisionConfig(**config.model.clip.vision_config.to_dict())
    hubert_hf = HubertConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in config.model.hubert.to_dict().items()})
    llm_hf = Qwen3Config(**config.model.llm.to_dict())
    for hf in (vision_hf, hubert_hf, llm_hf):
        hf._attn_implementation = "eager"
    post_norm = HubertConfig(**{**hubert_hf.to_dict(), "do_stable_layer_norm": False})
    post_norm._attn_implementation = "eager"

    class Composition(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision_tower = CLIPVisionModel(vision_hf).requires_grad_(False)
            self.audio_tower = HubertModel(hubert_hf).requires_grad_(False)
            self.position_embedding = torch.nn.Parameter(0.02 * torch.randn(model_config.num_frames, vision_hf.hidden_size))
            self.visual_alignment_layer = torch.nn.ModuleList(CLIPEncoderLayer(vision_hf) for _ in range(2))
            self.audio_alignment_layer = torch.nn.ModuleList(HubertEncoderLayer(post_norm) for _ in range(2))
            self.visual_llm_project = torch.nn.Linear(vision_hf.hidden_size, llm_hf.hidden_size)
            self.audio_llm_project = torch.nn.Linear(hubert_hf.hidden_size, llm_hf.hidden_size)
            self.llm = Qwen3ForCausalLM(llm_hf)

        def forward(self, b):
            batch, frames = b["pixel_values"].shape[:2]
            pixels = b["pixel_values"].flatten(0, 1).permute(0, 3, 1, 2)
            with torch.no_grad():
                cls = self.vision_tower(pixel_values=pixels).last_hidden_state[:, 0].view(batch, frames, -1)
                hidden = self.audio_tower(b["input_values"], attention_mask=b["audio_mask"]).last_hidden_state
                frame_mask = self.audio_tower._get_feature_vector_attention_mask(hidden.shape[1], b["audio_mask"])
                hidden = hidden * frame_mask[..., None]
            video = cls + self.position_embedding
            for layer in self.visual_alignment_layer:
                video = layer(video, None)
            bias = (1.0 - frame_mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
            audio = hidden
            for layer in self.audio_alignment_layer:
                audio = layer(audio, attention_mask=bias)
                audio = audio[0] if isinstance(audio, tuple) else audio
            audio = audio * frame_mask[..., None]
            embeds = self.llm.get_input_embeddings()(b["token_ids"])
            for kind, tokens in ((1, self.audio_llm_project(audio)), (2, self.visual_llm_project(video))):
                index = b["feature_index"].clamp(0, tokens.shape[1] - 1)
                gathered = torch.gather(tokens, 1, index[..., None].expand(-1, -1, tokens.shape[-1]))
                embeds = torch.where((b["kind"] == kind)[..., None], gathered, embeds)
            logits = self.llm(inputs_embeds=embeds, attention_mask=b["attention_mask"], position_ids=b["positions"]).logits
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), b["labels"].flatten().long(), ignore_index=-100)

    model = Composition()
    frozen = ("vision_tower", "audio_tower")
    trainable = [p for n, p in model.named_parameters() if not n.startswith(frozen)]
    return model, trainable


def pytorch(config, model_config, local, steps: int) -> float:
    import torch

    model, trainable = torch_model(config, model_config)
    optimizer = torch.optim.AdamW(trainable, lr=1e-3, weight_decay=0.0)
    names = ("token_ids", "kind", "feature_index", "labels", "attention_mask", "positions", "pixel_values",
             "input_values", "audio_mask")
    batch = {k: torch.from_numpy(np.asarray(local[k])) for k in names}
    batch["token_ids"] = batch["token_ids"].long()
    batch["positions"] = batch["positions"].long()
    batch["feature_index"] = batch["feature_index"].long()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        optimizer.step()

    return time_steps(step, steps)


def matmul_peak() -> float:
    """FLOP/s of a large fp32 matmul on this machine's first JAX device (best of a few)."""
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    dot(a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        dot(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def main() -> None:
    args = parse_args()
    from data_pipelines import synth
    from xemogpt_jax import run_config, stages

    with tempfile.TemporaryDirectory() as tmp:
        world = Path(args.world) if args.world else Path(tmp) / "world"
        if not args.world:
            synth.write_world(world, num_clips=24, seed=0)
        config = stage3_config(world, args.batch_size)
        task = stages.task_for(config)
        local = next(task.train_data(0, 1))
        model_config = run_config.xemogpt_config(config, stages.qwen3_params.load_tokenizer(world / "tokenizer"))
        tokens = int(np.sum(local["attention_mask"]))
        jax_seconds, flops = ours(config, task, local, args.steps)
        torch_seconds = pytorch(config, model_config, local, args.steps)
    peak = matmul_peak()
    batch, width = local["token_ids"].shape
    print(f"stage-3 train step, tiny config, batch {batch} x {width} positions ({tokens} real tokens), "
          f"{jax.devices()[0].platform} x1")
    print(f"{'':<22}{'s/step':>10}{'samples/s':>12}{'tokens/s':>12}")
    for name, seconds in (("ours (JAX)", jax_seconds), ("PyTorch composition", torch_seconds)):
        print(f"{name:<22}{seconds:>10.4f}{batch / seconds:>12.2f}{tokens / seconds:>12.1f}")
    print(f"speed ratio ours / PyTorch: {torch_seconds / jax_seconds:.2f}x")
    if flops:
        achieved = flops / jax_seconds
        print(f"our step: {flops / 1e9:.2f} GFLOP (XLA cost analysis) -> {achieved / 1e9:.2f} GFLOP/s; "
              f"measured fp32 matmul peak {peak / 1e9:.2f} GFLOP/s; ratio {achieved / peak:.3f}")


if __name__ == "__main__":
    main()
