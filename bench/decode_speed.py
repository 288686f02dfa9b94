"""Decoding speed: commer's generator (a soft prompt + a request) against Hugging Face ``generate()`` of the same
backbone on the same input, side by side.

    python bench/decode_speed.py [--backbone smollm2-135m] [--batch 1 16] [--new-tokens 32] [--rounds 3]
                                 [--static-compile]

Both sides read the same ``inputs_embeds`` (K=16 soft-prompt vectors from an untrained ComMer's task prompt, then a
LaMP-7 request) and decode greedily, ignoring EOS, so they do the same work. The time per decoding step is measured
without the prefill: (time for ``1 + n`` new tokens - time for 1) / n. Each dtype is a separate load of the backbone
(float32, and bfloat16 where the CPU does bf16 natively); rounds alternate between the sides; medians.

With both dtypes it also compares commer's greedy tokens in bfloat16 against float32, row by row: how many rows stay
identical, and at which step the others part.

The bound printed beside the tokens/s is what memory bandwidth allows at batch 1: every step reads every weight once,
so steps/s <= bandwidth / weight bytes, with the bandwidth measured here by copying a 512 MB tensor.

``--static-compile`` also times, after the same warm-up (which includes compiling), commer's loop with
``static_decoding()`` (a static KV cache, each step compiled by ``torch.compile``) and HF ``generate()`` with a static
cache and its forward pass compiled (inductor, forced on the CPU, which HF does not compile by default), and says
whether each one's greedy tokens equal its uncompiled loop's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from transformers import CompileConfig

from commer.backbone import load_backbone
from commer.config import DEFAULT_BACKBONE, DEFAULT_K, ComMerConfig
from commer.data.lamp import load_lamp7
from commer.evaluate import bf16_supported
from commer.model import ComMer
from commer.text import Collator, Example


def bandwidth_gb_s(megabytes: int = 512, rounds: int = 5) -> float:
    """Memory bandwidth of a large copy (read + write), in GB/s."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * 4 / best / 1e9


def per_step(run: Callable[[int], torch.Tensor], new_tokens: int, rounds: int) -> float:
    """Median seconds per decoding step of ``run(n)`` (which decodes exactly ``n`` tokens), prefill excluded."""

    def timed(n: int) -> float:
        start = time.perf_counter()
        out = run(n)
        if out.shape[1] != n:
            raise RuntimeError(f"decoded {out.shape[1]} tokens, expected {n}")
        return time.perf_counter() - start

    timed(1), timed(new_tokens + 1)  # warm-up
    return statistics.median((timed(new_tokens + 1) - timed(1)) / new_tokens for _ in range(rounds))


def measure(dtype: torch.dtype, args: argparse.Namespace, requests: list[str], gb_s: float) -> dict[int, torch.Tensor]:
    """Print one row per batch size for backbones loaded in ``dtype``; return commer's greedy tokens per batch size."""
    tokens = {}
    commer = ComMer(load_backbone(args.backbone, dtype=dtype), ComMerConfig()).eval()
    hf = load_backbone(args.backbone, dtype=dtype)  # a separate plain copy: what a user of HF alone would run
    collator = Collator(hf.tokenizer, commer.config, commer.max_length)
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.model.parameters())
    compile_config = CompileConfig(mode="default")  # for --static-compile; "reduce-overhead" means CUDA graphs
    compile_config._compile_all_devices = True  # HF compiles on accelerators only unless told
    for b in args.batch:
        batch = collator([Example(f"u{i}", [], r) for i, r in enumerate(requests[:b])], with_answers=False)
        prefix, prefix_mask = commer.prefix(batch)
        # HF reads exactly what commer's generator reads: the soft prompt, then the request (left-padded).
        embeds, mask = commer.left_aligned(prefix, prefix_mask, batch.input_ids, batch.input_mask)

        def ours(n: int, prefix=prefix, prefix_mask=prefix_mask, batch=batch) -> torch.Tensor:
            return commer.decode(
                prefix, prefix_mask, batch.input_ids, batch.input_mask,
                eos_token_id=-1, pad_token_id=collator.pad_id, max_new_tokens=n,
            )  # fmt: skip

        def theirs(n: int, embeds=embeds, mask=mask) -> torch.Tensor:
            return hf.model.generate(
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                do_sample=False, pad_token_id=collator.pad_id,
            )  # fmt: skip

        runs = {"commer": ours, "hf": theirs}
        if args.static_compile:

            def ours_static(n: int) -> torch.Tensor:
                commer.static_decoding()
                try:
                    return ours(n)
                finally:
                    commer.static_decoding(False)

            def static(n: int, embeds=embeds, mask=mask) -> torch.Tensor:
                return hf.model.generate(
                    inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=collator.pad_id, cache_implementation="static", compile_config=compile_config,
                )  # fmt: skip

            runs["ours_static"], runs["static"] = ours_static, static
        ms = {name: 1e3 * per_step(run, args.new_tokens, args.rounds) for name, run in runs.items()}
        tokens[b] = ours(args.new_tokens)
        bound = gb_s * 1e9 / weight_bytes if b == 1 else float("nan")
        print(
            f" {str(dtype).removeprefix('torch.'):8} | {b:5} | {ms['commer']:14.1f} | {ms['hf']:10.1f} | "
            f"{ms['commer'] / ms['hf']:9.2f} | {1e3 * b / ms['commer']:12.1f} | {1e3 * b / ms['hf']:8.1f} | "
            f"{bound:17.1f}"
        )
        if args.static_compile:
            # Each against its own loop: HF suppresses EOS until n tokens (min_new_tokens), commer's loop does not.
            plain = {"commer": tokens[b], "hf": theirs(args.new_tokens)}  # each uncompiled loop's tokens
            for name, what, loop in (("ours_static", "commer", "commer"), ("static", "HF", "hf")):
                same = torch.equal(plain[loop], runs[name](args.new_tokens))
                print(
                    f"   {what} static cache + torch.compile, batch {b}: {ms[name]:.1f} ms/step, "
                    f"{1e3 * b / ms[name]:.1f} tok/s, its loop/this {ms[loop] / ms[name]:.2f}, same greedy tokens as "
                    f"its loop: {'yes' if same else 'no'}"
                )
            print(f"   commer compiled / HF compiled: {ms['ours_static'] / ms['static']:.2f}")
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--static-compile", action="store_true", help="Also time both with a static cache, compiled.")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    requests = [e.instruction for e in load_lamp7(args.data_dir, n_docs=0).examples[: max(args.batch)]]
    dtypes = [torch.float32] + ([torch.bfloat16] if bf16_supported(torch.device("cpu")) else [])
    gb_s = bandwidth_gb_s()
    print(
        f"backbone {args.backbone}, K={DEFAULT_K} soft prompt + a LaMP-7 request, greedy, {args.new_tokens} steps, "
        f"torch threads {torch.get_num_threads()}, median of {args.rounds} rounds; memory copy {gb_s:.1f} GB/s"
    )
    print(" dtype    | batch | commer ms/step | HF ms/step | commer/HF | commer tok/s | HF tok/s | bound tok/s (b=1)")
    print("----------+-------+----------------+------------+-----------+--------------+----------+------------------")
    tokens = {dtype: measure(dtype, args, requests, gb_s) for dtype in dtypes}
    if len(dtypes) == 2:  # does decoding in bfloat16 change the answers beyond bf16 noise?
        for b, full in tokens[torch.float32].items():
            differs = (tokens[torch.bfloat16][b] != full).cpu()
            parted = [int(row.long().argmax()) for row in differs if bool(row.any())]
            print(
                f"greedy tokens, bfloat16 against float32 (commer's loop, batch {b}, {args.new_tokens} steps): "
                f"{b - len(parted)}/{b} rows identical"
                + (f"; the others part at steps {sorted(parted)}" if parted else "")
            )


if __name__ == "__main__":
    main()
