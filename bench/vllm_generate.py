"""Decoding throughput: commer's own batched greedy decoding against a vLLM server, for the same requests.

Start vLLM first (docs/scaling.md, section 3; on a CPU-only machine its CPU build), e.g.

    VLLM_CPU_KVCACHE_SPACE=1 /opt/vllm/bin/python -m vllm.entrypoints.openai.api_server \\
        --model ~/.cache/commer/backbones/smollm2-135m --enable-prompt-embeds --dtype float32 --port 8001

then `python bench/vllm_generate.py --vllm-url http://127.0.0.1:8001`. Both sides decode greedily, in float32, the same
merged profiles and instructions (synthetic recall-probe users), up to `--new-tokens` tokens or EOS; commer decodes all
users in one batch (until its last row ends), vLLM gets them as concurrent requests. Prints generated tokens/s of each
(tokens actually produced, per second of wall time), measured one after the other in one run, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import torch

from commer.backbone import load_backbone
from commer.config import ComMerConfig
from commer.data.recall import recall_examples
from commer.scale.vllm import VLLMGenerator, completion_request
from commer.serving import Personalizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-url", required=True)
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    p = Personalizer.new(load_backbone("smollm2-135m"), ComMerConfig(num_embeddings=8))
    examples = recall_examples(args.users, n_docs=4)
    profiles = [p.profile(ex.documents) for ex in examples]
    instructions = [ex.instruction for ex in examples]

    def local() -> int:
        steps = p.stream(profiles, instructions, max_new_tokens=args.new_tokens)
        return sum(token is not None for step in steps for token in step)

    bodies = [
        completion_request(p, profile, text, max_tokens=args.new_tokens)
        for profile, text in zip(profiles, instructions, strict=True)
    ]

    async def complete_all() -> int:
        generator = VLLMGenerator(args.vllm_url)
        done = await asyncio.gather(*(generator.complete(body) for body in bodies))
        await generator.aclose()
        return sum(c.tokens for c in done)

    def remote() -> int:
        return asyncio.run(complete_all())

    remote()  # warm-up: vLLM's first request pays for lazy initialisation
    local()
    rates: dict[str, float] = {"commer (local, one batch)": 0.0, "vLLM (concurrent requests)": 0.0}
    for _ in range(args.repeats):
        for name, run in zip(rates, (local, remote), strict=True):
            start = time.perf_counter()
            tokens = run()
            rates[name] = max(rates[name], tokens / (time.perf_counter() - start))
    print(f"{args.users} users, up to {args.new_tokens} new tokens each, best of {args.repeats} runs")
    for name, rate in rates.items():
        print(f"  {name:28} {rate:8.1f} generated tokens/s")
    local_rate, vllm_rate = rates.values()
    print(f"ratio vLLM / commer local: {vllm_rate / local_rate:.2f}")


if __name__ == "__main__":
    main()
