"""Soak test of the service with faults: several tenants add, delete and generate; the server is SIGKILLed and
restarted in the middle; then one tenant floods it with generations while a quiet tenant keeps asking.

    python bench/serve_soak.py                                  # the tests' tiny Llama, about 2 minutes
    python bench/serve_soak.py --seconds 60 --flood-clients 48  # shorter, harder flood

Everything is on loopback: ``python -m commer.service serve`` with a fresh database and an untrained (seeded) ComMer.
Three phases share ``--seconds``: the quiet tenant alone (its idle latency); the mixed load of ``--tenants`` tenants
(adds of 1 to 3 documents, deletes of acknowledged ones, generations), with a SIGKILL and a restart halfway; the flood
(``--flood-clients`` closed-loop generations of one tenant from another process, which honour 429 + Retry-After) while
the quiet tenant asks again. Every phase also stops at ``--requests`` requests per client. Then the server is stopped
and the database read directly. Printed: requests answered, 5xx, unexpected 4xx, acknowledged documents lost,
acknowledged deletes undone, profiles whose stored mean differs from the mean recomputed from their documents, and the
quiet tenant's p50/p99 alone and under the flood.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from serve_load import percentile, tiny_backbone_folder

QUIET, FLOOD = "quiet", "flood"
WORDS = "i love running in the morning jazz music coffee tea rain city book weekend plan marathon".split()
INSTRUCTION = "what is my plan today ?"


@dataclass
class Tally:
    """What one client saw."""

    answered: int = 0
    server_errors: list[str] = field(default_factory=list)  # 5xx
    unexpected: list[str] = field(default_factory=list)  # 4xx no request of this bench should get
    refused: int = 0  # 429
    transport_errors: int = 0  # no answer: the server was down

    def add(self, other: Tally) -> None:
        self.answered += other.answered
        self.server_errors += other.server_errors
        self.unexpected += other.unexpected
        self.refused += other.refused
        self.transport_errors += other.transport_errors

    def record(self, r: httpx.Response, what: str) -> bool:
        """Count an answer; True when it is a 200."""
        self.answered += 1
        if r.status_code >= 500:
            self.server_errors.append(f"{what}: {r.status_code} {r.text[:200]}")
        elif r.status_code == 429:
            self.refused += 1
        elif r.status_code != 200:
            self.unexpected.append(f"{what}: {r.status_code} {r.text[:200]}")
        return r.status_code == 200


class Server:
    """The server as a child process on a fixed port, so that it can be killed and started again at the same URL."""

    def __init__(self, folder: Path, backbone: str, k: int, keys: dict[str, str], extra: list[str]) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = folder / "soak.db"
        self.log = folder / "server.log"
        self.cmd = [sys.executable, "-m", "commer.service", "serve", "--backbone", backbone, "--k", str(k),
                    "--db", str(self.db), "--port", str(self.port), "--log-level", "warning", *extra]  # fmt: skip
        self.env = {**os.environ, "COMMER_API_KEYS": json.dumps(keys), "TOKENIZERS_PARALLELISM": "false"}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 300) -> float:
        """Start and wait for /healthz; returns the seconds it took."""
        started = time.monotonic()
        with self.log.open("a") as log:
            self.process = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        while time.monotonic() < started + timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return time.monotonic() - started
            except httpx.TransportError:
                time.sleep(0.1)
        raise SystemExit(f"server did not start in {timeout} s")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            self.process.send_signal(sig)
            self.process.wait(60)
            self.process = None


class MixedClient(threading.Thread):
    """One tenant's client on its own users: adds (1 to 3 documents), deletes of acknowledged documents, generations;
    remembers what was acknowledged and what was in flight when the server went away."""

    def __init__(self, url: str, key: str, tenant: str, users: list[str], seed: int, stop: threading.Event, cap: int):
        super().__init__(daemon=True)
        self.url, self.key, self.tenant, self.users = url, key, tenant, users
        self.rng, self.stop, self.cap = random.Random(seed), stop, cap
        self.seed = seed
        self.added: dict[str, set[str]] = {u: set() for u in users}
        self.removed: dict[str, set[str]] = {u: set() for u in users}
        self.uncertain: set[str] = set()
        self.tally = Tally()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"X-API-Key": self.key}, timeout=120) as client:
            for i in range(self.cap):
                if self.stop.is_set():
                    return
                user = self.users[i % len(self.users)]
                live = sorted(self.added[user] - self.removed[user])
                op = self.rng.random()
                if op < 0.2 and live:
                    doc = self.rng.choice(live)
                    if self._send(client, "DELETE", f"/v1/users/{user}/documents/{doc}", None, [doc]):
                        self.removed[user].add(doc)
                elif op < 0.65 or not live:
                    docs = [
                        {"text": " ".join(self.rng.choices(WORDS, k=6)), "id": f"s{self.seed}-{i}-{j}"}
                        for j in range(self.rng.randint(1, 3))
                    ]
                    ids = [d["id"] for d in docs]
                    if self._send(client, "POST", f"/v1/users/{user}/documents", {"documents": docs}, ids):
                        self.added[user].update(ids)
                else:
                    body = {"instruction": INSTRUCTION, "max_new_tokens": 4}
                    self._send(client, "POST", f"/v1/users/{user}/generate", body, [])

    def _send(self, client: httpx.Client, method: str, path: str, body: object, ids: list[str]) -> bool:
        try:
            r = client.request(method, path, json=body)
        except httpx.TransportError:
            self.tally.transport_errors += 1
            self.uncertain.update(ids)
            time.sleep(0.2)
            return False
        return self.tally.record(r, f"{self.tenant} {method} {path}")


def quiet_latencies(url: str, seconds: float, cap: int, tally: Tally) -> list[float]:
    """The quiet tenant's sequential 4-token generations: their latencies."""
    out: list[float] = []
    stop_at = time.monotonic() + seconds
    body = {"instruction": INSTRUCTION, "max_new_tokens": 4}
    with httpx.Client(base_url=url, headers={"X-API-Key": f"key-{QUIET}"}, timeout=120) as client:
        while time.monotonic() < stop_at and len(out) < cap:
            t = time.perf_counter()
            r = client.post(f"/v1/users/{QUIET}-0/generate", json=body)
            if tally.record(r, "quiet generate"):
                out.append(time.perf_counter() - t)
    return out


def flood(url: str, clients: int, seconds: float, cap: int, results: multiprocessing.Queue) -> None:
    """In its own process (so that its clients do not slow the quiet tenant's): closed-loop 16-token generations of
    one tenant, each client waiting ``Retry-After`` when refused."""

    async def client(c: httpx.AsyncClient, i: int, stop_at: float, tally: Tally) -> None:
        body = {"instruction": INSTRUCTION, "max_new_tokens": 16}
        for _ in range(cap):
            if time.monotonic() > stop_at:
                return
            try:
                r = await c.post(f"/v1/users/{FLOOD}-{i % 4}/generate", json=body)
            except httpx.TransportError:
                tally.transport_errors += 1
                continue
            if not tally.record(r, "flood generate") and r.status_code == 429:
                await asyncio.sleep(float(r.headers.get("retry-after", "1")))

    async def main() -> Tally:
        tally = Tally()
        limits = httpx.Limits(max_connections=clients)
        async with httpx.AsyncClient(
            base_url=url, headers={"X-API-Key": f"key-{FLOOD}"}, timeout=120, limits=limits
        ) as c:
            stop_at = time.monotonic() + seconds
            await asyncio.gather(*(client(c, i, stop_at, tally) for i in range(clients)))
        return tally

    results.put(asyncio.run(main()))


def verify(db: Path, fingerprint: str, shape: tuple[int, int], clients: list[MixedClient]) -> dict[str, int]:
    """Read the stopped server's database: acknowledged adds present, acknowledged deletes absent, every stored mean
    equal to the mean recomputed from the stored documents."""
    from commer.store import ProfileStore, UnknownUserError

    lost = undone = mismatches = profiles = 0
    with ProfileStore(db, fingerprint, shape) as store:
        for c in clients:
            for user in c.users:
                try:
                    stored = {d.id for d in store.list_documents(c.tenant, user)}
                except UnknownUserError:
                    stored = set()
                lost += len(c.added[user] - c.removed[user] - c.uncertain - stored)
                undone += len((c.removed[user] - c.uncertain) & stored)
        for tenant, user in store.users():
            profiles += 1
            state, recomputed = store.get_profile(tenant, user), store.recompute_mean(tenant, user)
            mean = state.mean()
            same = state.count == len(store.list_documents(tenant, user)) and (
                (mean is None and recomputed is None)
                or (mean is not None and recomputed is not None and float((mean - recomputed).abs().max()) <= 1e-5)
            )
            mismatches += not same
    return {"lost": lost, "undone": undone, "mismatches": mismatches, "profiles": profiles}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tiny", help="'tiny' (the tests' Llama), 'smollm2-135m' or a folder")
    parser.add_argument("--k", type=int, default=4, help="compression embeddings per document")
    parser.add_argument(
        "--seconds", type=float, default=90.0, help="load time in all: 20%% idle, 50%% mixed, 30%% flood"
    )
    parser.add_argument("--requests", type=int, default=2000, help="most requests per client per phase")
    parser.add_argument("--tenants", type=int, default=3, help="tenants of the mixed load (2 clients each)")
    parser.add_argument("--flood-clients", type=int, default=32, help="concurrent generations of the flooding tenant")
    parser.add_argument("--max-queued-per-tenant", type=int, default=16, help="the server's per-tenant queue bound")
    args = parser.parse_args()
    tenants = [f"t{i}" for i in range(args.tenants)]
    keys = {f"key-{t}": t for t in [*tenants, QUIET, FLOOD]}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backbone = tiny_backbone_folder(folder / "tiny") if args.backbone == "tiny" else args.backbone
        extra = ["--max-queued-per-tenant", str(args.max_queued_per_tenant)]
        server = Server(folder, backbone, args.k, keys, extra)
        boot = server.start()
        health = httpx.get(server.url + "/healthz").json()
        tally = Tally()
        try:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                for who in (QUIET, FLOOD):
                    for i in range(4):
                        docs = {"documents": [{"text": " ".join(random.Random(i).choices(WORDS, k=8))}]}
                        r = c.post(f"/v1/users/{who}-{i}/documents", json=docs, headers={"X-API-Key": f"key-{who}"})
                        tally.record(r, "setup")
            quiet_latencies(server.url, 2, 5, Tally())  # warm-up
            idle = quiet_latencies(server.url, 0.2 * args.seconds, args.requests, tally)

            stop = threading.Event()
            mixed = [
                MixedClient(
                    server.url, f"key-{t}", t, [f"{t}-c{j}-u{u}" for u in range(3)], 10 * i + j, stop, args.requests
                )
                for i, t in enumerate(tenants)
                for j in range(2)
            ]
            for m in mixed:
                m.start()
            time.sleep(0.25 * args.seconds)
            server.stop(signal.SIGKILL)  # mid-stream: requests are in flight
            restart = server.start()
            time.sleep(max(0.0, 0.25 * args.seconds - restart))
            stop.set()
            for m in mixed:
                m.join(120)
                tally.add(m.tally)

            results: multiprocessing.Queue = multiprocessing.get_context("spawn").Queue()
            flooder = multiprocessing.get_context("spawn").Process(
                target=flood, args=(server.url, args.flood_clients, 0.3 * args.seconds + 5, args.requests, results)
            )
            flooder.start()
            time.sleep(min(5.0, 0.05 * args.seconds))  # let the flood fill the queue first
            flooded = quiet_latencies(server.url, 0.3 * args.seconds, args.requests, tally)
            flood_tally = results.get(timeout=0.3 * args.seconds + 180)
            flooder.join(60)
            tally.add(flood_tally)
            batches = httpx.get(server.url + "/metrics").text
        finally:
            server.stop()
        checks = verify(server.db, health["fingerprint"], tuple(health["shape"]), mixed)

    acked = sum(len(m.added[u]) for m in mixed for u in m.users)
    rows, count = (
        sum(float(x.split()[-1]) for x in batches.splitlines() if x.startswith(f"commer_generate_batch_size_{name}"))
        for name in ("sum", "count")
    )
    print(f"backbone {args.backbone}, K={args.k}, {args.seconds:.0f} s of load, cpus={os.cpu_count()}, "
          f"server start {boot:.1f} s, restart after SIGKILL {restart:.1f} s")  # fmt: skip
    print(f"requests answered            {tally.answered}")
    print(f"  of which 429 (flood)       {tally.refused}")
    print(f"no answer (server down)      {tally.transport_errors}")
    print(f"5xx                          {len(tally.server_errors)}")
    print(f"unexpected 4xx               {len(tally.unexpected)}")
    print(f"documents acknowledged       {acked} in {sum(len(m.users) for m in mixed)} profiles")
    print(f"acknowledged documents lost  {checks['lost']}")
    print(f"acknowledged deletes undone  {checks['undone']}")
    print(f"means != recomputed          {checks['mismatches']} of {checks['profiles']} profiles")
    print(f"flood: {args.flood_clients} clients, {flood_tally.answered} answered, {flood_tally.refused} refused (429)")
    print(f"mean batch size              {rows / max(count, 1):.1f} (after the restart)")
    ratio = percentile(flooded, 0.99) / percentile(idle, 0.99)
    print(f"quiet tenant, 4 tokens: alone    n={len(idle):>4} p50 {statistics.median(idle):.3f} s "
          f"p99 {percentile(idle, 0.99):.3f} s")  # fmt: skip
    print(f"quiet tenant, 4 tokens: flooded  n={len(flooded):>4} p50 {statistics.median(flooded):.3f} s "
          f"p99 {percentile(flooded, 0.99):.3f} s")  # fmt: skip
    print(f"p99 flooded / alone          {ratio:.2f}x (target <= 3x: {'met' if ratio <= 3 else 'NOT met'})")
    for line in (tally.server_errors + tally.unexpected)[:10]:
        print("  ", line)


if __name__ == "__main__":
    main()
