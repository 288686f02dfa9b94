"""Crash safety: SIGKILL the server while clients add and remove documents; every acknowledged write survives and
every profile's stored mean still equals the mean of its stored documents."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import torch
from _server import Server, auth, save_tiny_model

from commer.checkpoint import read_meta
from commer.store import ProfileStore

USERS = [f"user-{i}" for i in range(4)]
WORDS = "i love running in the morning jazz music coffee tea rain city book weekend plan".split()


class Client(threading.Thread):
    """Adds documents (one or three per request) and now and then removes one, remembering what was acknowledged
    and what was in flight when the server died."""

    def __init__(self, url: str, seed: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.seed, self.stop = url, seed, stop
        self.added: dict[str, set[str]] = {u: set() for u in USERS}  # acknowledged adds
        self.removed: dict[str, set[str]] = {u: set() for u in USERS}  # acknowledged removes
        self.uncertain: set[str] = set()  # ids of the request that got no answer
        self.acks = 0
        self.errors: list[str] = []

    def run(self) -> None:
        rng = torch.Generator().manual_seed(self.seed)
        with httpx.Client(base_url=self.url, headers=auth(), timeout=30) as client:
            for i in range(10_000):
                if self.stop.is_set():
                    return
                user = USERS[i % len(USERS)]
                if i % 5 == 4 and self.added[user] - self.removed[user]:
                    doc = sorted(self.added[user] - self.removed[user])[0]
                    ok = self._send(client, "DELETE", f"/v1/users/{user}/documents/{doc}", None, [doc])
                    if ok:
                        self.removed[user].add(doc)
                    continue
                n = 3 if i % 3 == 0 else 1
                docs = [
                    {
                        "text": " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (6,), generator=rng)),
                        "id": f"c{self.seed}-{i}-{k}",
                    }
                    for k in range(n)
                ]
                ids = [d["id"] for d in docs]
                if self._send(client, "POST", f"/v1/users/{user}/documents", {"documents": docs}, ids):
                    self.added[user].update(ids)

    def _send(self, client: httpx.Client, method: str, path: str, body: object, ids: list[str]) -> bool:
        try:
            r = client.request(method, path, json=body)
        except httpx.TransportError:
            self.uncertain.update(ids)
            self.stop.wait()
            return False
        if r.status_code != 200:
            self.errors.append(f"{method} {path}: {r.status_code} {r.text}")
            return False
        self.acks += 1
        return True


def test_acknowledged_writes_survive_sigkill(tmp_path):
    backbone_dir, checkpoint_dir = save_tiny_model(tmp_path)
    db = tmp_path / "profiles.db"
    server = Server(tmp_path, backbone_dir, checkpoint_dir, db).start()
    stop = threading.Event()
    clients = [Client(server.url, seed, stop) for seed in range(3)]
    try:
        for c in clients:
            c.start()
        deadline = time.monotonic() + 30
        while sum(c.acks for c in clients) < 60 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.kill(signal.SIGKILL)  # mid-stream: requests are in flight
    finally:
        stop.set()
        for c in clients:
            c.join(30)
    assert sum(c.acks for c in clients) >= 60
    assert [e for c in clients for e in c.errors] == []

    server.start()
    try:
        with httpx.Client(base_url=server.url, headers=auth(), timeout=30) as client:
            for user in USERS:
                stored = {d["id"] for d in client.get(f"/v1/users/{user}").json()["documents"]}
                for c in clients:
                    assert (c.added[user] - c.removed[user] - c.uncertain) <= stored  # acknowledged adds are there
                    assert not ((c.removed[user] - c.uncertain) & stored)  # acknowledged removes are gone
                    assert stored <= {d for x in clients for d in x.added[user] | x.uncertain}  # nothing else
            r = client.post(f"/v1/users/{USERS[0]}/generate", json={"instruction": "hi", "max_new_tokens": 3})
            assert r.status_code == 200
        fingerprint = read_meta(checkpoint_dir)["fingerprint"]
        with ProfileStore(db, fingerprint, (4, 64)) as store:
            for user in USERS:
                profile = store.get_profile("acme", user)
                assert profile.count == len(store.list_documents("acme", user))
                torch.testing.assert_close(profile.mean(), store.recompute_mean("acme", user), rtol=0, atol=1e-6)
    finally:
        server.kill()
