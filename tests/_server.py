"""A real ``commer`` server on a loopback port, over the tiny backbone saved to disk: in a subprocess (``Server``), or
in this process (``AppServer``) where a test can reach its model worker."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch
import uvicorn
from conftest import perturb_zero_init, tiny_backbone

from commer.backbone import load_backbone
from commer.checkpoint import save_checkpoint
from commer.config import ComMerConfig
from commer.model import ComMer
from commer.service.app import create_app
from commer.service.cli import open_store
from commer.service.limits import ServiceLimits
from commer.service.worker import ModelWorker
from commer.serving import load_personalizer

KEYS = {"key-acme": "acme", "key-globex": "globex", "key-acme-2": "acme"}
CONFIG = ComMerConfig(num_embeddings=4, lora_r=4)


def save_tiny_model(folder: Path) -> tuple[Path, Path]:
    """The tiny backbone as a model folder, and a checkpoint of a ComMer on it (LoRA B and the bridge's map made
    non-zero, so that compressions and soft prompts depend on the checkpoint's weights)."""
    backbone_dir, checkpoint_dir = folder / "backbone", folder / "checkpoint"
    bb = tiny_backbone()
    bb.model.save_pretrained(backbone_dir)
    bb.tokenizer.save_pretrained(backbone_dir)
    torch.manual_seed(0)
    model = ComMer(load_backbone(str(backbone_dir)), CONFIG)
    perturb_zero_init(model, std=0.05, seed=0)
    save_checkpoint(model, checkpoint_dir)
    return backbone_dir, checkpoint_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m commer.service serve`` as a child process; ``start`` waits until ``/healthz`` answers."""

    def __init__(self, folder: Path, backbone_dir: Path, checkpoint_dir: Path, db: Path, *extra: str) -> None:
        self.folder, self.db = folder, db
        self.keys_file = folder / "keys.json"
        self.keys_file.write_text(json.dumps(KEYS))
        self.args = [
            "--backbone",
            str(backbone_dir),
            "--checkpoint",
            str(checkpoint_dir),
            "--db",
            str(db),
            "--api-keys",
            str(self.keys_file),
            "--log-level",
            "warning",
            *extra,
        ]
        self.process: subprocess.Popen | None = None
        self.url = ""
        self.log = folder / "server.log"

    def start(self, timeout: float = 60.0) -> Server:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        with self.log.open("a") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "commer.service", "serve", "--port", str(port), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log.read_text()[-4000:]}")

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def auth(key: str = "key-acme") -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def add_documents(client: httpx.Client, user: str, texts: list[str], **kw) -> httpx.Response:
    return client.post(f"/v1/users/{user}/documents", json={"documents": [{"text": t} for t in texts]}, **kw)


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples (all label values) in a Prometheus text exposition."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


class AppServer:
    """``create_app`` served by uvicorn on a thread of this process (real HTTP, real SQLite), so that a test can hold
    its model worker (``held``) and decide what is queued together instead of racing the worker thread."""

    def __init__(self, folder: Path, limits: ServiceLimits | None = None, **options: str) -> None:
        self.backbone_dir, self.checkpoint_dir = save_tiny_model(folder)
        self.personalizer = load_personalizer(self.checkpoint_dir, str(self.backbone_dir))
        self.store = open_store(folder / "profiles.db", self.personalizer)
        self.app = create_app(self.personalizer, self.store, KEYS, limits, **options)
        self.worker: ModelWorker = self.app.state.worker
        self.url = f"http://127.0.0.1:{free_port()}"
        port = int(self.url.rsplit(":", 1)[1])
        self._server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> AppServer:
        self._thread.start()
        wait_for(lambda: self._server.started, "the in-process server to start")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self.store.close()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll until ``condition()`` holds; the timeout only turns a hang into a failure, no result depends on it."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@contextmanager
def held(worker: ModelWorker) -> Iterator[None]:
    """Keep the model worker busy with a call that blocks until the block exits: what is queued meanwhile waits and is
    then scheduled together, whatever the thread timing."""
    running, release = threading.Event(), threading.Event()

    def hold() -> None:
        running.set()
        release.wait(120)

    worker.submit(hold)
    try:
        assert running.wait(60), "the model worker never ran the hold"
        yield
    finally:
        release.set()
