"""The training loop on the tiny Llama: it learns, uses two learning rates, resumes exactly, stops early."""

from __future__ import annotations

import json
import os
import random
import sys
from dataclasses import replace

import pytest
import torch
from conftest import WORDS, tiny_backbone

from commer.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from commer.config import ComMerConfig, RunConfig, TrainConfig, load_config
from commer.errors import ConfigError
from commer.model import build_model
from commer.text import Example
from commer.train import (
    ONEDNN_CACHE_CAPACITY,
    Trainer,
    build,
    cap_onednn_cache,
    contrast_hinge,
    contrast_partners,
    param_groups,
    return_freed_memory,
    trim_heap,
)


def _examples(n: int, seed: int = 0) -> list[Example]:
    """Each user's answer is a word from their documents: learnable only by reading the soft prompt."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.sample(WORDS, 3)
        out.append(Example(f"u{i}", [f"my {w} today" for w in words], "what do i like ?", words[0]))
    return out


def _run(tmp_path, method="commer", **train) -> tuple[Trainer, RunConfig]:
    config = RunConfig(
        output_dir=str(tmp_path),
        model=ComMerConfig(method=method, num_embeddings=2, lora_r=4, lora_dropout=0.1),
        train=TrainConfig(**{"batch_size": 4, "micro_batch_size": 2, "eval_every": 3, "log_every": 1, **train}),
    )
    backbone = tiny_backbone()
    model = build_model(backbone, config.model)
    return Trainer(config, model, backbone.tokenizer, _examples(16), _examples(4, seed=1)), config


def test_a_few_steps_lower_the_training_loss(tmp_path):
    trainer, _ = _run(tmp_path, max_steps=12, lr_lora=1e-3)
    summary = trainer.fit()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert summary["steps"] == 12 and len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert all({"ppl", "lr", "tokens_per_s"} <= r.keys() for r in log if "loss" in r)
    assert (tmp_path / "best" / "commer.json").is_file() and (tmp_path / "config.yaml").is_file()
    load_checkpoint(tmp_path / "best", tiny_backbone())  # the best checkpoint loads on a fresh backbone


def test_two_learning_rates_reach_the_right_parameters(tmp_path):
    trainer, _ = _run(tmp_path, max_steps=1, lr_compression=0.5, lr_lora=0.25, warmup_ratio=0.0)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["compression"]["params"] == [trainer.model.compression_embeddings]
    assert groups["compression"]["lr"] == 0.5 and groups["lora"]["lr"] == 0.25
    lora = {id(p) for n, p in trainer.model.trainable_state().items() if "lora_" in n}
    assert {id(p) for p in groups["lora"]["params"]} == lora and len(lora) > 0
    pt = build_model(tiny_backbone(), ComMerConfig(method="prompt_tuning", num_embeddings=2))
    (only,) = param_groups(pt, TrainConfig(lr_soft_prompt=0.125))
    assert only["name"] == "soft_prompt" and only["lr"] == 0.125 and only["weight_decay"] == 0.001


@pytest.mark.parametrize("method", ["commer", "prompt_tuning"])
def test_resume_after_kill_reproduces_the_uninterrupted_run(tmp_path, method):
    torch.manual_seed(0)
    straight, _ = _run(tmp_path / "straight", method, max_steps=9)
    straight.fit()
    torch.manual_seed(0)
    killed, _ = _run(tmp_path / "killed", method, max_steps=9)
    assert killed.fit(stop_at_step=6) == {"killed_at": 6}
    torch.manual_seed(123)  # a new process: whatever RNG state it starts with must not matter
    resumed, _ = _run(tmp_path / "killed", method, max_steps=9)
    resumed.fit()
    assert resumed.step == 9
    for name, p in straight.model.trainable_state().items():
        torch.testing.assert_close(resumed.model.trainable_state()[name], p, atol=1e-6, rtol=0)


def test_a_folder_resumes_only_its_own_run(tmp_path):
    """Another config (here a learning rate, or the checkpoint training starts from) in a folder holding a run's state
    is an error naming what differs, not a silent resume of the other run; the same config resumes."""
    killed, _ = _run(tmp_path, max_steps=6)
    killed.fit(stop_at_step=3)
    other, _ = _run(tmp_path, max_steps=6, lr_lora=0.5)
    with pytest.raises(ConfigError, match=r"another config \(train.lr_lora: 0.0001 -> 0.5\)"):
        other.fit()
    with pytest.raises(ConfigError, match="train.init_from: None -> 'pretrained'"):
        _run(tmp_path, max_steps=6, init_from="pretrained")[0].fit()
    same, _ = _run(tmp_path, max_steps=6)
    assert same.fit()["steps"] == 6


def test_init_fresh_bridge_starts_a_new_bridge_on_a_saved_compressor(tmp_path):
    """``train.init_from`` with ``train.init_fresh_bridge``: a linear-bridge checkpoint starts an MLP-bridge run, with
    its compressor copied and the MLP's output layer at zero; without the flag the bridge mismatch is refused."""
    saved = build_model(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=4, bridge="linear"))
    with torch.no_grad():
        saved.compression_embeddings.add_(1.0)
    save_checkpoint(saved, tmp_path / "linear")
    config = RunConfig(
        model=ComMerConfig(num_embeddings=2, lora_r=4, bridge="mlp"),
        train=TrainConfig(init_from=str(tmp_path / "linear"), init_fresh_bridge=True),
    )
    model, _ = build(config, backbone=tiny_backbone())
    assert torch.equal(model.compression_embeddings, saved.compression_embeddings)
    assert not model.bridge.mlp[2].weight.any()
    with pytest.raises(CheckpointError, match="bridge='linear' \\(model: 'mlp'\\)"):
        build(replace(config, train=replace(config.train, init_fresh_bridge=False)), backbone=tiny_backbone())


def test_early_stopping_when_validation_stops_improving(tmp_path):
    # all learning rates zero: validation perplexity can never improve after the first evaluation
    trainer, _ = _run(
        tmp_path, max_steps=60, lr_compression=0.0, lr_lora=0.0, lr_soft_prompt=0.0, lr_bridge=0.0, patience=2
    )
    summary = trainer.fit()
    assert summary["stopped_early"] and summary["steps"] == 9  # evals at 3 (best), 6 and 9 (no improvement)


def test_config_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  num_embeddings: 8\ntrain:\n  lr_lora: 1.0e-4\ndata:\n  task: lamp7\n")
    config = load_config(path, ["model.num_embeddings=16", "train.max_steps=5", "data.n_docs=2"])
    assert config.model.num_embeddings == 16 and config.train.max_steps == 5 and config.data.n_docs == 2
    assert config.train.lr_lora == 1e-4
    # YAML reads 1e-3 (no dot) as a string; a float field still gets the number, and a non-number is named
    assert load_config(path, ["train.lr_lora=1e-3"]).train.lr_lora == 1e-3
    with pytest.raises(ValueError, match="train.lr_lora must be a number, got 'fast'"):
        load_config(path, ["train.lr_lora=fast"])
    with pytest.raises(ValueError, match="unknown config key.*model.num_embedings"):
        load_config(path, ["model.num_embedings=4"])
    with pytest.raises(ValueError, match="num_embeddings"):
        load_config(path, ["model.num_embeddings=0"])


def test_each_trainable_tensor_gets_its_learning_rate():
    model = build_model(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=4))
    groups = {g["name"]: g for g in param_groups(model, TrainConfig(lr_soft_prompt=0.3, lr_bridge=0.2))}
    assert groups["soft_prompt"]["lr"] == 0.3 and groups["bridge"]["lr"] == 0.2
    assert [p is model.bridge.task_prompt for p in groups["soft_prompt"]["params"]] == [True]
    assert {id(p) for p in groups["bridge"]["params"]} == {id(p) for p in model.bridge.mlp.parameters()}  # the default
    assert sum(len(g["params"]) for g in groups.values()) == len(model.trainable_state())


def test_contrast_hinge_is_zero_once_the_margin_is_met():
    nll, n_tokens = torch.tensor([10.0, 10.0]), torch.tensor([10, 10])
    other = torch.tensor([12.0, 10.5])  # 0.2 and 0.05 nats per token worse with another user's soft prompt
    torch.testing.assert_close(contrast_hinge(nll, other, n_tokens, 0.1), torch.tensor([0.0, 0.05]))


def test_contrast_partners_are_other_users_only():
    assert contrast_partners(["a", "b", "c"]).tolist() == [2, 0, 1]  # the previous example, cyclically
    assert contrast_partners(["a", "a", "b"]).tolist() == [2, 2, 1]  # never an example of the same user
    assert contrast_partners(["a", "a"]).tolist() == [-1, -1]  # one user only: no hinge


def _one_step(tmp_path, **train) -> tuple[Trainer, float]:
    torch.manual_seed(0)
    config = RunConfig(
        output_dir=str(tmp_path),
        model=ComMerConfig(num_embeddings=2, lora_r=4, lora_dropout=0.0),
        train=TrainConfig(batch_size=4, micro_batch_size=4, max_steps=1, warmup_ratio=0.0, bf16=False, **train),
    )
    backbone = tiny_backbone()
    trainer = Trainer(config, build_model(backbone, config.model), backbone.tokenizer, _examples(4), [])
    return trainer, trainer._train_step(trainer._step_indices())[0]


def test_the_contrast_term_is_the_weighted_mean_hinge_and_trains_the_bridge(tmp_path):
    plain, plain_loss = _one_step(tmp_path / "plain")
    weight, margin = 0.5, 3.0
    # the hinge the contrast run must add, on the step-0 weights (a run whose learning rates are all 0 keeps them)
    fresh, _ = _one_step(tmp_path / "fresh", lr_lora=0.0, lr_compression=0.0, lr_soft_prompt=0.0, lr_bridge=0.0)
    batch = fresh.collator(fresh.train_examples)
    with torch.no_grad():
        prefix = fresh.model.prefix(batch)
        nll, n_tokens = fresh.model.nll(batch, prefix)
        other = fresh.model.nll(batch, tuple(t.roll(1, dims=0) for t in prefix))[0]
    expected_hinge = contrast_hinge(nll, other, n_tokens, margin).mean().item()
    assert expected_hinge > 0  # a margin of 3 nats per token is not met at initialisation
    contrast, contrast_loss = _one_step(tmp_path / "contrast", contrast_weight=weight, contrast_margin=margin)
    assert contrast_loss == pytest.approx(plain_loss + weight * expected_hinge, rel=1e-4)
    # at step 0 the zero-init output layer is the only way the documents reach the soft prompt: the hinge trains it
    assert not torch.equal(contrast.model.bridge.mlp[2].weight, plain.model.bridge.mlp[2].weight)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_glibc_is_told_to_return_freed_memory():
    assert return_freed_memory() is True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trimming_the_heap_between_steps_changes_no_weight(tmp_path):
    """``train.trim_heap`` only hands freed memory back: the same run with it ends with the same weights."""
    assert trim_heap() is True
    ends = []
    for trim in (False, True):
        torch.manual_seed(0)
        trainer, _ = _run(tmp_path / str(trim), max_steps=3, lr_lora=1e-3, trim_heap=trim)
        trainer.fit()
        ends.append(trainer.model.trainable_state())
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_the_onednn_cache_cap_is_set_unless_the_user_set_one(monkeypatch):
    name = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
    monkeypatch.setenv(name, "unset")
    monkeypatch.delenv(name)  # recorded, so the value set below is undone after the test
    cap_onednn_cache()
    assert os.environ[name] == str(ONEDNN_CACHE_CAPACITY) == "64"
    monkeypatch.setenv(name, "512")
    cap_onednn_cache()
    assert os.environ[name] == "512"
