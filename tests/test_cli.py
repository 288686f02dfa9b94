"""The command line: bad input ends in one clear line, and every shipped config loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commer.cli import app
from commer.config import DEFAULT_K, ComMerConfig, RunConfig, TrainConfig, config_keys, help_of, load_config

ROOT = Path(__file__).parents[1]


def _commer(*args: str) -> subprocess.CompletedProcess:
    code = "from commer.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--backbone", "no-such-model"], "unknown backbone 'no-such-model'"),
        (["train", "configs/lamp7.yaml", "--set", "model.num_embeddings=0"], "num_embeddings (K) must be"),
        (["train", "configs/lamp7.yaml", "--set", "train.lr"], "is not of the form key.sub=value"),
        (["info", "README.md"], "is not a commer checkpoint"),
    ],
)
def test_bad_input_is_one_clear_line(args, message):
    result = _commer(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


RUN_CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.name.startswith("sweep-"))


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    config = load_config(path)
    assert config.output_dir == f"runs/{path.stem}"
    assert config.model.method == ("prompt_tuning" if "prompt-tuning" in path.stem else "commer")


def test_every_config_key_has_help_and_the_cli_lists_it():
    keys = config_keys(RunConfig)
    assert [k for k, _, text in keys if not text] == []
    assert ("model.num_embeddings", DEFAULT_K, help_of(ComMerConfig, "num_embeddings")) in keys
    listed = CliRunner().invoke(app, ["config-keys"])
    assert listed.exit_code == 0 and f"model.num_embeddings = {DEFAULT_K}" in listed.output
    assert help_of(TrainConfig, "lr_bridge") in listed.output
