"""Data-parallel training: ``accelerate launch`` with 2 CPU processes (gloo) takes the same steps as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from _server import free_port
from conftest import tiny_backbone
from safetensors.torch import load_file

ROOT = Path(__file__).parents[1]
DATA = ROOT.parent / "shared" / "data"


def _config(folder: Path, backbone_dir: Path, name: str) -> Path:
    """17 LaMP-7 examples in steps of 8 on the tiny Llama: two full steps (each process: 4 examples, two micro batches,
    the first without gradient sync), a step of one example (the second process has none), a fourth full step.
    Dropout 0 and float32, so that two processes compute what one does up to reduction order."""
    config = {
        "output_dir": str(folder / name),
        "backbone": str(backbone_dir),
        "device": "cpu",
        "model": {"num_embeddings": 2, "lora_r": 4, "lora_dropout": 0.0},
        "data": {"task": "lamp7", "data_dir": str(DATA), "n_docs": 2, "max_train_examples": 17, "max_val_examples": 5},
        "train": {"batch_size": 8, "micro_batch_size": 2, "max_steps": 4, "eval_every": 2, "log_every": 1},
    }
    config["train"] |= {"bf16": False, "lr_lora": 1e-3}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(*command: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.skipif(not (DATA / "lamp7").is_dir(), reason="needs the LaMP-7 data in ../shared/data")
@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="this torch build has no gloo backend")
def test_two_processes_train_like_one(tmp_path):
    backbone_dir = tmp_path / "backbone"
    bb = tiny_backbone()
    bb.model.save_pretrained(backbone_dir)
    bb.tokenizer.save_pretrained(backbone_dir)

    assert "1 process(es)" in _run(sys.executable, "-m", "commer", "train", str(_config(tmp_path, backbone_dir, "one")))
    # On a machine without GPUs, --multi_gpu makes Accelerate start the processes (torchrun); the run config's CPU
    # device makes them talk through gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(free_port())]
    assert "2 process(es)" in _run(*launch, "-m", "commer", "train", str(_config(tmp_path, backbone_dir, "two")))

    one, two = (load_file(tmp_path / name / "last" / "trainable.safetensors") for name in ("one", "two"))
    assert one.keys() == two.keys() and len(one) > 2
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, atol=1e-5, rtol=0, msg=name)
    assert any((t != 0).any() for n, t in one.items() if "lora_B" in n)  # the LoRA did train

    logs = [[json.loads(x) for x in (tmp_path / n / "log.jsonl").read_text().splitlines()] for n in ("one", "two")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]  # one writer: no line twice
    for a, b in zip(*logs, strict=True):
        for key in ("loss", "val_ppl"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    assert (tmp_path / "two" / "best" / "commer.json").is_file()
