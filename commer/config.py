"""Every configuration of commer, typed, in one place: the method (``ComMerConfig``), and a training run's data,
optimisation and whole run (``DataConfig``, ``TrainConfig``, ``RunConfig``).

A config is plain data. Each field carries its help text (``field(metadata={"help": ...})``, as in peft), which the
command line shows; each default is defined here once and imported wherever it is needed (``DEFAULT_K``). A config is
validated once, in ``__post_init__``, with errors that name the field and the value, and it round-trips through a dict:
``from_dict`` builds any of them (unknown keys named), ``load_yaml`` reads a YAML file with dotted overrides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from commer.errors import ConfigError

Method = Literal["commer", "prompt_tuning"]
MergeStrategy = Literal["mean", "concat"]
PromptFormat = Literal["chat", "plain"]
CompressionNorm = Literal["none", "embedding"]
Bridge = Literal["none", "linear", "gate", "mlp"]
BRIDGES = ("none", "linear", "gate", "mlp")
DEFAULT_K = 16  # compression embeddings per document: the one default of K, everywhere
# A new model's bridge: the one that measured best trained from scratch (recall probe, validation users:
# docs/results.md, session 5). A checkpoint keeps its own; the shipped compressor's is "linear" (session 6: moving it
# to "mlp" with 500 more pretraining steps did not beat it on validation users).
DEFAULT_BRIDGE: Bridge = "mlp"
DEFAULT_BACKBONE = "smollm2-135m"  # the embedded SmolLM2-135M-Instruct (commer.backbone)
# The quickstart's personalization-hinge weight, chosen on LaMP-7 validation users (docs/results.md, session 3): 0, 1
# and 3 gave own vs another user's documents 1.1%, 2.9% and 3.8% apart (own-document perplexity 16.77, 16.67, 17.62).
QUICKSTART_CONTRAST_WEIGHT = 3.0
MEMORIES = (1, 2, 4, 8, 16)  # numbers of memories per question of the memories experiment (the paper's Figure 5)

C = TypeVar("C")


def setting(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - peft's name for it
    """A dataclass field with its help text; a list or dict default is copied per instance."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def help_of(cls: type, name: str) -> str:
    """The help text of a config field, for the command line's options."""
    return {f.name: f for f in fields(cls)}[name].metadata["help"]


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, Any, str]]:
    """``(dotted key, default, help)`` of every leaf field of the config dataclass ``cls``, nested configs walked."""
    keys = []
    for f in fields(cls):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{f.name}.")
        else:
            keys.append((prefix + f.name, default, f.metadata.get("help", "")))
    return keys


def _positive(name: str, value: float) -> None:
    if value < 1:
        raise ConfigError(f"{name} must be >= 1, got {value!r}")


def _one_of(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class ComMerConfig:
    """Hyper-parameters of ComMer and of the prompt-tuning baseline.

    Defaults follow the paper (appendix A.1): LoRA rank 64, alpha 16, dropout 0.1 on every attention and MLP
    projection; K is one of 4..128 in the paper.
    """

    method: Method = setting("commer", "'commer', or 'prompt_tuning' (the baseline: one trained soft prompt).")
    num_embeddings: int = setting(DEFAULT_K, "K: compression embeddings per document (soft-prompt vectors per user).")
    merge: MergeStrategy = setting("mean", "How a user's compressions merge: 'mean' (O(1) updates) or 'concat'.")
    lora_r: int = setting(64, "LoRA rank of the compressor.")
    lora_alpha: float = setting(16.0, "LoRA alpha (the adapter's scale is alpha / r).")
    lora_dropout: float = setting(0.1, "LoRA dropout while training.")
    # "all-linear" is peft's name for every linear layer but the LM head: the attention and MLP projections.
    lora_target_modules: str | list[str] = setting("all-linear", "Modules that get a LoRA (peft's names).")
    prompt_format: PromptFormat = setting(
        "chat", "How instructions become tokens: 'chat' uses the tokenizer's chat template when it has one."
    )
    # The raw last-layer states have a norm the final RMSNorm pins far above that of any token (about 51 against 3.2
    # on SmolLM2): read as input embeddings they are unlike anything the generator was trained on.
    compression_norm: CompressionNorm = setting(
        "none", "'embedding' rescales every compression vector to the mean norm of the token embeddings."
    )
    # With every bridge but "none" the untrained model is exactly prompt tuning without documents (the raw states
    # read as input embeddings wreck the frozen generator: docs/results.md), a user without documents gets the task
    # prompt, and the personal part grows from the first step. The bridge maps the merged mean, so the store keeps
    # raw sums and O(1) updates stay exact.
    bridge: Bridge = setting(
        DEFAULT_BRIDGE,
        "How merged compressions become the soft prompt (commer.model.Bridge): 'none' the raw states (the paper); "
        "'linear' task_prompt + W @ merged, W zero-init; 'gate' task_prompt + g * merged, g zero-init; 'mlp' "
        "task_prompt + MLP(merged), output layer zero-init.",
    )
    init_seed: int = setting(0, "Seed of the initial compression embeddings and task prompt.")

    def __post_init__(self) -> None:
        _one_of("method", self.method, ("commer", "prompt_tuning"))
        if not isinstance(self.num_embeddings, int) or self.num_embeddings < 1:
            raise ConfigError(f"num_embeddings (K) must be an integer >= 1, got {self.num_embeddings!r}")
        _one_of("merge", self.merge, ("mean", "concat"))
        _positive("lora_r", self.lora_r)
        if self.lora_alpha <= 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        _one_of("compression_norm", self.compression_norm, ("none", "embedding"))
        _one_of("bridge", self.bridge, BRIDGES)
        _one_of("prompt_format", self.prompt_format, ("chat", "plain"))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComMerConfig:
        return from_dict(cls, data)


@dataclass
class DataConfig:
    """Which examples to train on (see ``commer.data.tasks``)."""

    task: str = setting(
        "lamp7", "One of commer.data.tasks.TASKS: lamp7, news, perltqa, pretrain, pretrain-mix(-lm), recall."
    )
    data_dir: str | None = setting(None, "The data folder (default: ../shared/data when it exists, else $COMMER_DATA).")
    n_docs: int = setting(4, "Documents per example (the top-n by BM25 for LaMP; the most for pretraining).")
    max_train_examples: int | None = setting(None, "Train on at most this many examples.")
    max_val_examples: int = setting(1024, "Validate on at most this many examples.")
    max_test_examples: int | None = setting(None, "Test on at most this many examples.")
    split_seed: int = setting(0, "Seed of the user-disjoint train/validation/test split.")
    retrieve_top_k: int | None = setting(
        None,
        "Keep only each example's top-k documents by BM25 against its request: train and validate on the "
        "retrieval-merged prompts that merge={'top_k': k} gives at answer time (None keeps all n_docs).",
    )
    retrieve_share: float = setting(
        1.0,
        "With retrieve_top_k, the share of examples (seeded by split_seed) cut to their top k; the others keep all "
        "n_docs, so the model also reads the mean that merge={'min_margin': m} falls back to.",
    )

    def __post_init__(self) -> None:
        if self.retrieve_top_k is not None and self.retrieve_top_k < 1:
            raise ConfigError(f"retrieve_top_k must be >= 1 (or None for all documents), got {self.retrieve_top_k}")
        if not 0.0 <= self.retrieve_share <= 1.0:
            raise ConfigError(f"retrieve_share must be in [0, 1], got {self.retrieve_share!r}")


@dataclass
class TrainConfig:
    """The optimisation of one run; the defaults are the paper's recipe."""

    lr_compression: float = setting(1e-2, "Learning rate of the compression embeddings.")
    lr_lora: float = setting(1e-4, "Learning rate of the LoRA.")
    lr_soft_prompt: float = setting(3e-2, "Learning rate of prompt tuning's soft prompt and ComMer's task prompt.")
    lr_bridge: float = setting(1e-3, "Learning rate of the bridge's map from merged compressions (W, gate or MLP).")
    contrast_weight: float = setting(
        0.0,
        "Weight of the personalization hinge: each answer should be contrast_margin nats per token more likely with "
        "its user's soft prompt than with another user's of the same micro batch (ComMer; 0 turns it off).",
    )
    contrast_margin: float = setting(0.1, "The margin of the personalization hinge, in nats per answer token.")
    weight_decay: float = setting(0.001, "AdamW weight decay.")
    max_grad_norm: float = setting(0.3, "Gradient clipping norm.")
    warmup_ratio: float = setting(0.03, "Fraction of the steps spent warming the learning rate up.")
    batch_size: int = setting(16, "Examples per optimizer step.")
    micro_batch_size: int = setting(4, "Examples per forward pass (batch_size / micro_batch_size accumulation steps).")
    epochs: int = setting(20, "Epochs to train (max_steps overrides it).")
    max_steps: int | None = setting(None, "Optimizer steps to train; overrides epochs when set.")
    eval_every: int = setting(100, "Optimizer steps between validations (and checkpoints).")
    patience: int = setting(3, "Validations without improvement before stopping; 0 disables early stopping.")
    log_every: int = setting(10, "Optimizer steps between log lines.")
    seed: int = setting(0, "Seed of the data order and LoRA dropout.")
    bf16: bool = setting(True, "bfloat16 autocast on a GPU and on a CPU with native bf16 (3x faster on AVX512-BF16).")
    activation_checkpointing: bool = setting(
        False,
        "Recompute each decoder layer's activations in the backward pass instead of keeping them: much less memory "
        "per step for about one more forward pass (docs/benchmarks.md).",
    )
    trim_heap: bool = setting(
        False,
        "After every optimizer step, give the heap's freed memory back to the system (glibc's malloc_trim): less "
        "resident memory over a long run for some time per step (docs/benchmarks.md).",
    )
    init_from: str | None = setting(
        None, "A checkpoint to start from: a folder, or 'pretrained' (the compressor shipped with the package)."
    )
    init_fresh_bridge: bool = setting(
        False,
        "Take init_from's compressor (LoRA, compression embeddings, task prompt) but start the bridge's map as new "
        "(zero output): moves a compressor trained with one model.bridge to another.",
    )

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.contrast_weight < 0 or self.contrast_margin < 0:
            raise ConfigError(
                f"contrast_weight and contrast_margin must be >= 0, got {self.contrast_weight}, {self.contrast_margin}"
            )
        if self.eval_every < 1:
            raise ConfigError(f"eval_every must be >= 1, got {self.eval_every}")


@dataclass
class RunConfig:
    """Everything one run needs; written as ``config.yaml`` next to its checkpoints and results."""

    output_dir: str = setting("runs/default", "Where checkpoints, logs and results go.")
    backbone: str = setting(DEFAULT_BACKBONE, "Backbone: 'smollm2-135m', a local model folder or a hub id.")
    device: str = setting("auto", "'auto' (a GPU when there is one), 'cpu', 'cuda', ...")
    model: ComMerConfig = field(default_factory=ComMerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- dicts and YAML -> configs ------------------------------------------------------------------------------------
def from_dict(cls: type[C], values: dict[str, Any], where: str = "") -> C:
    """Build the config dataclass ``cls`` from ``values``, nested configs included. Unknown keys are named (with
    ``where`` as their prefix); a float field takes a number written as a string (YAML reads ``1e-3`` as one)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where.rstrip('.') or 'the config'} must be a mapping of keys to values, got {values!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(known)}")
    kwargs = {}
    for name, value in values.items():
        f = known[name]
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            value = from_dict(type(default), value or {}, f"{where}{name}.")
        elif isinstance(default, float) and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}{name} must be a number, got {value!r}") from None
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as err:  # a value of the wrong kind that __post_init__ did not name
        raise ConfigError(f"{where or cls.__name__}: {err}") from err


def load_yaml(path: str | Path | None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """A YAML file (or nothing) with ``key.sub=value`` overrides applied; values are parsed as YAML (16, 1e-4, true,
    null, [4, 8]) and a number in a key indexes a list (``studies.0.k=[4,8]``)."""
    values: Any = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"no config file at {path}")
        try:
            values = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of keys to values")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        node: Any = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply dotted overrides (see ``load_yaml``)."""
    return from_dict(RunConfig, load_yaml(path, overrides))
