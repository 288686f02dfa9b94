"""Checkpoints: trainable weights only, exact round trip, refusal on another backbone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb_zero_init, tiny_backbone

from commer.backbone import BackboneError, load_backbone
from commer.checkpoint import (
    META,
    PRETRAINED,
    PRETRAINED_PATH,
    WEIGHTS,
    CheckpointError,
    load_checkpoint,
    load_trainable,
    model_fingerprint,
    read_meta,
    resolve_checkpoint,
    save_checkpoint,
)
from commer.config import ComMerConfig
from commer.model import ComMer, PromptTuning


@pytest.mark.parametrize("method", ["commer", "prompt_tuning"])
def test_round_trip_is_exact(tmp_path, method):
    model = (ComMer if method == "commer" else PromptTuning)(
        tiny_backbone(), ComMerConfig(method=method, num_embeddings=3, lora_r=4)
    )
    with torch.no_grad():
        for p in model.trainable_state().values():
            p.add_(torch.randn_like(p))  # so the round trip is not of initial values
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, tiny_backbone())
    assert type(loaded) is type(model) and loaded.config == model.config
    original, restored = model.trainable_state(), loaded.trainable_state()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert model_fingerprint(loaded) == model_fingerprint(model)
    meta = json.loads((tmp_path / META).read_text())
    assert meta["backbone"]["name"] == "tiny-llama-0"
    # only the trainable state: far smaller than the backbone's weights
    backbone_bytes = sum(t.numel() * 4 for t in tiny_backbone().model.state_dict().values())
    assert (tmp_path / WEIGHTS).stat().st_size < backbone_bytes / 2


def test_checkpoint_for_another_backbone_is_refused(tmp_path):
    save_checkpoint(ComMer(tiny_backbone(seed=0), ComMerConfig(num_embeddings=2, lora_r=2)), tmp_path)
    with pytest.raises(CheckpointError, match="trained on backbone 'tiny-llama-0'.*not the same weights"):
        load_checkpoint(tmp_path, tiny_backbone(seed=1))


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="not a commer checkpoint"):
        load_checkpoint(tmp_path, tiny_backbone())


def test_unknown_backbone_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="unknown backbone 'no-such-model'"):
        load_backbone("no-such-model")
    with pytest.raises(BackboneError, match="has no config.json"):
        load_backbone(str(tmp_path))


def test_local_model_folder_loads(tmp_path):
    """Any local Hugging Face model folder works as a backbone, with the same fingerprint as in memory."""
    backbone = tiny_backbone()
    backbone.model.save_pretrained(tmp_path)
    backbone.tokenizer.save_pretrained(tmp_path)
    loaded = load_backbone(str(tmp_path))
    assert loaded.fingerprint == backbone.fingerprint
    assert not any(p.requires_grad for p in loaded.model.parameters())


def test_a_structure_mismatch_names_the_fields(tmp_path):
    save_checkpoint(ComMer(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=2, bridge="linear")), tmp_path)
    model = ComMer(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=2, bridge="mlp"))
    with pytest.raises(CheckpointError, match="bridge='linear' \\(model: 'mlp'\\)"):
        load_trainable(model, tmp_path)


def test_fresh_bridge_moves_a_compressor_to_another_bridge(tmp_path):
    saved = ComMer(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=2, bridge="linear"))
    perturb_zero_init(saved)  # a trained-looking checkpoint: nonzero LoRA B and bridge map, and moved from the seed's
    with torch.no_grad():  # task prompt and compression embeddings, which the new model also starts from
        for tensor in saved.trainable_state().values():
            tensor.add_(0.5)
    save_checkpoint(saved, tmp_path)
    model = ComMer(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=2, bridge="mlp"))
    fresh_mlp = {n: t.clone() for n, t in model.trainable_state().items() if n.startswith("bridge.mlp")}
    load_trainable(model, tmp_path, fresh_bridge=True)
    own, theirs = model.trainable_state(), saved.trainable_state()
    shared = [n for n in theirs if not n.startswith("bridge.") or n == "bridge.task_prompt"]
    assert any("lora_B" in n for n in shared) and "compression_embeddings" in shared
    for name in shared:
        assert torch.equal(own[name], theirs[name]), name
    for name, tensor in fresh_mlp.items():  # the new map is as built: its output layer zero
        assert torch.equal(own[name], tensor), name
    assert not own["bridge.mlp.2.weight"].any()
    with pytest.raises(CheckpointError, match="fresh_bridge needs a bridge with a task prompt"):
        load_trainable(ComMer(tiny_backbone(), ComMerConfig(num_embeddings=2, lora_r=2, bridge="none")), tmp_path, True)


def test_the_shipped_compressor_is_small_documented_and_refuses_other_weights():
    assert resolve_checkpoint(PRETRAINED) == PRETRAINED_PATH
    meta = read_meta(PRETRAINED)
    assert meta["backbone"]["name"] == "smollm2-135m" and meta["config"]["bridge"] != "none"
    assert (PRETRAINED_PATH / WEIGHTS).stat().st_size <= 25 * 2**20
    assert "## How to reproduce" in (PRETRAINED_PATH / "MODEL_CARD.md").read_text()
    with pytest.raises(CheckpointError, match="trained on backbone 'smollm2-135m'.*not the same weights"):
        load_checkpoint(PRETRAINED, tiny_backbone())
