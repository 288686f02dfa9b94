"""A real ``commer`` server in a subprocess, on a loopback port, over the tiny backbone saved to disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import torch
from conftest import tiny_backbone

from commer.backbone import load_backbone
from commer.checkpoint import save_checkpoint
from commer.config import ComMerConfig
from commer.model import ComMer

KEYS = {"key-acme": "acme", "key-globex": "globex", "key-acme-2": "acme"}
CONFIG = ComMerConfig(num_embeddings=4, lora_r=4)


def save_tiny_model(folder: Path) -> tuple[Path, Path]:
    """The tiny backbone as a model folder, and a checkpoint of a ComMer on it (LoRA B made non-zero, so that
    compressions depend on the checkpoint's weights)."""
    backbone_dir, checkpoint_dir = folder / "backbone", folder / "checkpoint"
    bb = tiny_backbone()
    bb.model.save_pretrained(backbone_dir)
    bb.tokenizer.save_pretrained(backbone_dir)
    torch.manual_seed(0)
    model = ComMer(load_backbone(str(backbone_dir)), CONFIG)
    with torch.no_grad():
        for name, p in model.trainable_state().items():
            if "lora_B" in name:
                p.normal_(0, 0.05)
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
