"""Throughput and latency of batched generation: the real server under 1 and 16 concurrent users.

    python bench/serve_load.py                      # SmolLM2-135M (the embedded backbone), untrained K=16 ComMer
    python bench/serve_load.py --backbone tiny      # the tests' tiny random Llama: a quick check of the mechanics

Starts ``python -m commer.service serve`` on a loopback port with a fresh database, gives each user a few documents,
then for each concurrency level runs closed-loop clients (each sends its next generate request when the previous
answer arrives) for ``--seconds`` or ``--requests``, whichever ends first.

Then continuous batching: the latency of a short request (``--short-tokens``) sent one at a time, first on the idle
server, then while ``--long-users`` closed-loop clients keep long answers (``--long-tokens``) decoding; the ratio of
the two p99s is what a short request pays for arriving during a long batch.

``--compile-decoding`` starts the server with it (a static KV cache, each decoding step compiled) and runs every
measurement twice, reporting the second: the first pass pays for compiling the shapes the load brings.
``--bf16-decode`` starts it with ``--bf16-decode`` (a bfloat16 copy of the generator decodes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

KEY = "bench-key"
INSTRUCTION = "Write a short tweet about my plans for Saturday."
DOCS = [
    "Ran my first half marathon this morning, legs are jelly but so happy!",
    "Spent the whole weekend baking sourdough, the crust finally came out right.",
    "Trail running in the hills again, nothing beats the sunrise up there.",
    "Farmers market haul: tomatoes, basil and fresh mozzarella for pizza night.",
]


def tiny_backbone_folder(folder: Path) -> str:
    """The tests' tiny random Llama, saved as a model folder."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import tiny_backbone

    bb = tiny_backbone()
    bb.model.save_pretrained(folder)
    bb.tokenizer.save_pretrained(folder)
    return str(folder)


def start_server(
    folder: Path, backbone: str, k: int, max_batch_size: int, wait_ms: float, decoding: list[str]
) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "COMMER_API_KEYS": json.dumps({KEY: "bench"})}
    cmd = [sys.executable, "-m", "commer.service", "serve", "--backbone", backbone, "--k", str(k),
           "--db", str(folder / "bench.db"), "--port", str(port), "--log-level", "warning",
           "--max-batch-size", str(max_batch_size), "--batch-wait-ms", str(wait_ms)]  # fmt: skip
    cmd += decoding
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited:\n{(folder / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start in 300 s")


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (the value at index ``int(q * n)`` of the sorted list); nan when empty."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_level(url: str, users: int, seconds: float, max_requests: int, max_new_tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(i: int) -> None:
        nonlocal tokens
        body = {"instruction": INSTRUCTION, "max_new_tokens": max_new_tokens}
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as c:
            while time.monotonic() < stop_at:
                with lock:
                    if len(latencies) >= max_requests:
                        return
                t = time.perf_counter()
                r = c.post(f"/v1/users/user-{i}/generate", json=body)
                r.raise_for_status()
                with lock:
                    latencies.append(time.perf_counter() - t)
                    tokens += r.json()["tokens"]

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {
        "users": users,
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
    }


def short_during_long(url: str, shorts: int, short_tokens: int, long_users: int, long_tokens: int) -> dict[str, float]:
    """p50/p99 latency of ``shorts`` sequential short requests on the idle server, then beside long answers."""

    def short_latencies() -> list[float]:
        out = []
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as c:
            for _ in range(shorts):
                t = time.perf_counter()
                body = {"instruction": INSTRUCTION, "max_new_tokens": short_tokens}
                c.post("/v1/users/user-0/generate", json=body).raise_for_status()
                out.append(time.perf_counter() - t)
        return sorted(out)

    idle = short_latencies()
    stop = threading.Event()

    def long_client(i: int) -> None:
        body = {"instruction": INSTRUCTION, "max_new_tokens": long_tokens}
        with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as c:
            while not stop.is_set():
                c.post(f"/v1/users/user-{1 + i}/generate", json=body).raise_for_status()

    threads = [threading.Thread(target=long_client, args=(i,)) for i in range(long_users)]
    for t in threads:
        t.start()
    time.sleep(1.0)  # let the long answers start decoding
    busy = short_latencies()
    stop.set()
    for t in threads:
        t.join()

    return {"idle_p50": statistics.median(idle), "idle_p99": percentile(idle, 0.99),
            "busy_p50": statistics.median(busy), "busy_p99": percentile(busy, 0.99)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m", help="'smollm2-135m', a model folder, or 'tiny'")
    parser.add_argument("--k", type=int, default=16, help="compression embeddings per document")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--seconds", type=float, default=30.0, help="time bound per level")
    parser.add_argument("--requests", type=int, default=200, help="request bound per level")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--shorts", type=int, default=20, help="short requests timed, idle and beside long answers")
    parser.add_argument("--short-tokens", type=int, default=4)
    parser.add_argument("--long-users", type=int, default=4)
    parser.add_argument("--long-tokens", type=int, default=128)
    parser.add_argument(
        "--compile-decoding", action="store_true", help="serve with --compile-decoding (measured twice)"
    )
    parser.add_argument("--bf16-decode", action="store_true", help="serve with --bf16-decode")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone = tiny_backbone_folder(folder / "tiny") if args.backbone == "tiny" else args.backbone
        decoding = ["--compile-decoding"] * args.compile_decoding + ["--bf16-decode"] * args.bf16_decode
        process, url = start_server(folder, backbone, args.k, args.max_batch_size, args.batch_wait_ms, decoding)
        try:
            with httpx.Client(base_url=url, headers={"X-API-Key": KEY}, timeout=300) as c:
                for i in range(max(*args.concurrency, args.long_users + 1)):
                    docs = [{"text": DOCS[(i + j) % len(DOCS)]} for j in range(3)]
                    c.post(f"/v1/users/user-{i}/documents", json={"documents": docs}).raise_for_status()
                c.post("/v1/users/user-0/generate", json={"instruction": INSTRUCTION, "max_new_tokens": 4})  # warm-up
            for _ in range(2 if args.compile_decoding else 1):  # the last pass counts
                results = [
                    run_level(url, n, args.seconds, args.requests, args.max_new_tokens) for n in args.concurrency
                ]
                batches = httpx.get(url + "/metrics").text
                short = short_during_long(url, args.shorts, args.short_tokens, args.long_users, args.long_tokens)
        finally:
            process.terminate()
            process.wait(30)
    print(
        f"backbone {args.backbone}, K={args.k}, max_new_tokens={args.max_new_tokens}, cpus={os.cpu_count()}, "
        f"compiled decoding: {'yes (second pass)' if args.compile_decoding else 'no'}, "
        f"decoding dtype: {'bfloat16' if args.bf16_decode else 'float32'}"
    )
    print(f"{'users':>5} | {'requests':>8} | {'req/s':>7} | {'tokens/s':>8} | {'p50 (s)':>7} | {'p99 (s)':>7}")
    print(f"{'-' * 5}-+-{'-' * 8}-+-{'-' * 7}-+-{'-' * 8}-+-{'-' * 7}-+-{'-' * 7}")
    for r in results:
        print(f"{r['users']:>5} | {r['requests']:>8} | {r['rps']:>7.2f} | {r['tokens_per_s']:>8.1f} | "
              f"{r['p50']:>7.3f} | {r['p99']:>7.3f}")  # fmt: skip
    count = sum(float(x.split()[-1]) for x in batches.splitlines() if x.startswith("commer_generate_batch_size_count"))
    total = sum(float(x.split()[-1]) for x in batches.splitlines() if x.startswith("commer_generate_batch_size_sum"))
    print(f"mean generations prefilled together: {total / max(count, 1):.1f}")
    if len(results) > 1:
        print(f"throughput ratio {results[-1]['users']} users / {results[0]['users']} user: "
              f"{results[-1]['rps'] / results[0]['rps']:.2f}x")  # fmt: skip
    print(f"short request ({args.short_tokens} tokens, {args.shorts} sent one at a time), idle: p50 "
          f"{short['idle_p50']:.3f} s, p99 {short['idle_p99']:.3f} s; beside {args.long_users} long answers "
          f"({args.long_tokens} tokens): p50 {short['busy_p50']:.3f} s, p99 {short['busy_p99']:.3f} s; "
          f"p99 ratio {short['busy_p99'] / short['idle_p99']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
