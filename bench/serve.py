"""Serving throughput: requests/s, tokens/s and time to first token at 1, 8 and 32 concurrent streaming clients.

A random tiny model (``configs/sft.py:tiny``, byte-level tokenizer, its untied LM head limited to
letters so answers are visible text from the first token) behind the real server
(:class:`xemogpt_jax.serve.Server`, in-process, on loopback). Each client streams greedy text chats
over HTTP (server-sent events) one after another; time to first token is from sending the request
to the first chunk with text. Every batch shape the server can form is compiled before measuring.

    python -m bench.serve [--clients 1 8 32] [--requests-per-client 2] [--new-tokens 32] [--max-batch 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import string
import time

import httpx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import sft
from xemogpt_jax import checkpoint as checkpoint_lib
from xemogpt_jax import run_config, serve
from xemogpt_jax.explainer import Decoding, Explainer
from xemogpt_jax.models.xemogpt import XEmoGPT
from xemogpt_jax.serving.app import Settings
from xemogpt_jax.testing.byte_tokenizer import byte_tokenizer

QUESTION = "Describe how the speaker sounds when she says: I can't believe you did that."


def tiny_explainer() -> Explainer:
    tokenizer = byte_tokenizer()
    config = sft.get_config("tiny")
    run_config.set_architecture(config, "llm", vocab_size=len(tokenizer), tie_word_embeddings=False)
    config.data.max_context = 512
    model = XEmoGPT(run_config.xemogpt_config(checkpoint_lib.to_json(config)), rngs=nnx.Rngs(0))
    letters = sorted(set(tokenizer.encode(string.ascii_letters, add_special_tokens=False)))
    head = np.asarray(model.llm.lm_head.kernel[...])
    kept = np.zeros_like(head)
    kept[:, letters] = 4.0 * head[:, letters]
    model.llm.lm_head.kernel[...] = jnp.asarray(kept)
    return Explainer(model, tokenizer, buckets=(128, 512))


def warm_up(explainer: Explainer, decoding: Decoding, max_batch: int) -> None:
    """Compile the streaming decode at every batch size the server rounds to (powers of two)."""
    size = 1
    while size <= max_batch:
        conversations = [[{"role": "user", "content": QUESTION}]] * size
        explainer.chat_generations(conversations, decoding, on_token=lambda *token: None)
        size *= 2


async def one_request(client: httpx.AsyncClient, new_tokens: int) -> tuple[float, float, int]:
    """(seconds to the first text chunk, seconds to the end, completion tokens) of one streamed chat."""
    body = {"model": "xemogpt", "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
            "max_tokens": new_tokens, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        reply.raise_for_status()
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    end = time.perf_counter() - start
    return (end if first is None else first), end, tokens


async def load(url: str, clients: int, per_client: int, new_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800, limits=httpx.Limits(max_connections=clients)) as http:
        async def client() -> list[tuple[float, float, int]]:
            return [await one_request(http, new_tokens) for _ in range(per_client)]

        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client() for _ in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    firsts = sorted(r[0] for r in results)
    return {"requests/s": len(results) / wall, "tokens/s": sum(r[2] for r in results) / wall,
            "ttft median": statistics.median(firsts), "ttft max": firsts[-1],
            "latency median": statistics.median(r[1] for r in results)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--batch-window-ms", type=float, default=20.0)
    args = parser.parse_args()
    # what a temperature-0 chat asks for, so the warm-up compiles the programs the requests run
    decoding = Decoding(max_new_tokens=args.new_tokens, num_beams=1, do_sample=False, temperature=1.0, top_p=1.0)
    explainer = tiny_explainer()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}; tiny XEmoGPT (random, letters-only head), "
          f"greedy {args.new_tokens} tokens, streamed; max batch {args.max_batch}, window {args.batch_window_ms:g} ms")
    warm_up(explainer, decoding, args.max_batch)
    server = serve.Server(explainer, max_batch=args.max_batch, batch_window_s=args.batch_window_ms / 1000,
                          settings=Settings(defaults=decoding)).start()
    try:
        asyncio.run(load(server.url, 1, 1, args.new_tokens))  # the route and the HTTP stack, once
        print(f"{'clients':>8}{'requests':>10}{'req/s':>9}{'tokens/s':>10}{'TTFT med':>10}{'TTFT max':>10}"
              f"{'latency med':>13}")
        rates = {}
        for clients in args.clients:
            figures = asyncio.run(load(server.url, clients, args.requests_per_client, args.new_tokens))
            rates[clients] = figures["requests/s"]
            print(f"{clients:>8}{clients * args.requests_per_client:>10}{figures['requests/s']:>9.2f}"
                  f"{figures['tokens/s']:>10.1f}{figures['ttft median']:>9.3f}s{figures['ttft max']:>9.3f}s"
                  f"{figures['latency median']:>12.3f}s")
        if 1 in rates and len(rates) > 1:
            most = max(rates)
            print(f"{most} concurrent clients vs one at a time: {rates[most] / rates[1]:.2f}x requests/s")
    finally:
        server.close()


if __name__ == "__main__":
    main()
