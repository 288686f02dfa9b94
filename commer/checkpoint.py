"""Checkpoints hold only what was trained: LoRA + compression embeddings (ComMer) or the soft prompt (prompt tuning),
as safetensors, plus a JSON file with the resolved config and the backbone it was trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from commer.backbone import Backbone, load_backbone
from commer.config import ComMerConfig
from commer.errors import CommerError
from commer.model import SoftPromptLM, build_model
from commer.version import __version__

WEIGHTS = "trainable.safetensors"
META = "commer.json"
FORMAT_VERSION = 1
# The compressor pretrained by this project for the embedded backbone, shipped inside the package (MODEL_CARD.md beside
# it); "pretrained" names it wherever a checkpoint path is taken. On other weights it fails the backbone check.
PRETRAINED = "pretrained"
PRETRAINED_PATH = Path(__file__).parent / "pretrained" / "smollm2-135m"


class CheckpointError(CommerError, ValueError):
    """A checkpoint is missing, malformed, or does not belong to the backbone it is loaded on."""


def model_fingerprint(model: SoftPromptLM) -> str:
    """A short hash of everything that determines a compression: the backbone's fingerprint, the config and every
    trainable tensor. Stored vectors are tagged with it, so vectors of another model are never served."""
    h = hashlib.sha256(model.backbone_fingerprint.encode())
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in sorted(model.trainable_state().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(model: SoftPromptLM, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s trainable weights and config to the folder ``path``; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: p.detach().to("cpu").contiguous() for name, p in model.trainable_state().items()}
    save_file(state, str(path / WEIGHTS))
    meta = {
        "format_version": FORMAT_VERSION,
        "commer_version": __version__,
        "config": model.config.to_dict(),
        "backbone": {"name": model.backbone_name, "fingerprint": model.backbone_fingerprint},
        "fingerprint": model_fingerprint(model),
        "trainable_parameters": sum(t.numel() for t in state.values()),
        **(extra or {}),
    }
    (path / META).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def resolve_checkpoint(spec: str | Path) -> Path:
    """A checkpoint folder: ``spec`` itself, or the shipped compressor for ``"pretrained"``."""
    return PRETRAINED_PATH if str(spec) == PRETRAINED else Path(spec)


def read_meta(path: str | Path) -> dict[str, Any]:
    """The JSON half of a checkpoint (``path`` may be ``"pretrained"``)."""
    path = resolve_checkpoint(path)
    if not (path / META).is_file() or not (path / WEIGHTS).is_file():
        raise CheckpointError(f"{path} is not a commer checkpoint: expected {META} and {WEIGHTS} in it")
    try:
        meta = json.loads((path / META).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / META} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path / META} is damaged: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    backbone = meta.get("backbone")
    if not isinstance(backbone, dict) or not all(isinstance(backbone.get(f), str) for f in ("name", "fingerprint")):
        raise CheckpointError(f"{path / META} is damaged: it names no backbone (name and fingerprint)")
    if not isinstance(meta.get("config"), dict):
        raise CheckpointError(f"{path / META} is damaged: it holds no model config")
    return meta


def _check_backbone(meta: dict[str, Any], path: str | Path, name: str, fingerprint: str) -> None:
    expected = meta["backbone"]
    if fingerprint != expected["fingerprint"]:
        raise CheckpointError(
            f"checkpoint {path} was trained on backbone {expected['name']!r} (fingerprint {expected['fingerprint']}), "
            f"but the backbone given is {name!r} (fingerprint {fingerprint}): they are not the same weights"
        )


# The config fields that fix the trainable tensors' names and shapes: a checkpoint loads only where they agree.
STRUCTURE_FIELDS = ("method", "num_embeddings", "lora_r", "lora_target_modules", "bridge")


def load_trainable(model: SoftPromptLM, path: str | Path, fresh_bridge: bool = False) -> dict[str, Any]:
    """Copy a checkpoint's trainable tensors into ``model`` (same backbone, method, K, LoRA rank, bridge); returns
    its meta. ``fresh_bridge``: the bridges may differ, and the model keeps its own (zero-output) bridge map; the task
    prompt, compression embeddings and LoRA are copied."""
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    _check_backbone(meta, path, model.backbone_name, model.backbone_fingerprint)
    saved, own_config = meta["config"], model.config.to_dict()
    fields = [f for f in STRUCTURE_FIELDS if not (fresh_bridge and f == "bridge")]
    differ = [f"{f}={saved.get(f)!r} (model: {own_config[f]!r})" for f in fields if saved.get(f) != own_config[f]]
    if differ:
        raise CheckpointError(f"checkpoint {path} was trained with {', '.join(differ)}: set the model to match")
    try:
        state = load_file(str(Path(path) / WEIGHTS), device=str(model.device))
    except SafetensorError as err:
        raise CheckpointError(f"{path / WEIGHTS} is damaged: {err}") from err
    own = model.trainable_state()
    if fresh_bridge:  # the model keeps its own bridge map (proj, gate or mlp); the task prompt is copied
        if "bridge.task_prompt" not in own or "bridge.task_prompt" not in state:
            raise CheckpointError(f"fresh_bridge needs a bridge with a task prompt in the model and in {path}")
        own, state = (
            {n: t for n, t in d.items() if not n.startswith("bridge.") or n == "bridge.task_prompt"}
            for d in (own, state)
        )
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, tensor in state.items():
            if own[name].shape != tensor.shape:
                raise CheckpointError(f"{name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(own[name].shape)}")
            own[name].copy_(tensor)
    return meta


def load_checkpoint(
    path: str | Path, backbone: Backbone | None = None, device: str | torch.device = "cpu"
) -> SoftPromptLM:
    """Rebuild the model saved at ``path`` (a folder, or ``"pretrained"`` for the shipped compressor) on ``backbone``
    (default: load the backbone the checkpoint names).

    Raises ``CheckpointError`` when the backbone's weights differ from those the checkpoint was trained on.
    """
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    if backbone is None:
        backbone = load_backbone(meta["backbone"]["name"], device=device)
    _check_backbone(meta, path, backbone.name, backbone.fingerprint)  # before the LoRA is injected into it
    model = build_model(backbone, ComMerConfig.from_dict(meta["config"]))
    load_trainable(model, path)
    return model
