"""Sweeps: train ComMer and prompt-tuning models over K and numbers of documents, evaluate every method the same way,
and append one row per evaluated cell to the results table.

A sweep YAML (``configs/sweep-*.yaml``) lists *studies*; each is a grid of methods x K x documents at training time x
documents at test time x merge variants (x pretraining). Trained models are identified by their resolved run config,
shared between studies and reused on rerun; an evaluation cell whose key is already in the table is skipped, so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from commer.backbone import Backbone, load_backbone
from commer.checkpoint import load_checkpoint
from commer.config import (
    DEFAULT_BACKBONE,
    DEFAULT_K,
    ComMerConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
    from_dict,
    load_yaml,
)
from commer.data.splits import SplitInfo
from commer.data.tasks import load_splits
from commer.errors import ConfigError
from commer.evaluate import copy_input, evaluate_examples, rouge
from commer.experiments.table import ResultsTable, machine, read_run_info, write_run_info
from commer.text import Collator, Example
from commer.train import resolve_device
from commer.train import run as train_run

METHODS = ("commer", "prompt_tuning")
# How a trained ComMer turns a user's documents into a soft prompt at test time (Figure 7 of the paper).
VARIANTS = ("mean", "concat", "concat-compress")

Splits = tuple[dict[str, list[Example]], SplitInfo]
DataLoader = Callable[[str, int, int], Splits]  # (task, n_docs, split_seed) -> splits


def concat_documents(example: Example, separator: str = "\n") -> Example:
    """The concat-then-compress variant: a user's documents joined into one document, compressed at once."""
    return replace(example, documents=[separator.join(example.documents)] if example.documents else [])


def method_name(method: str, variant: str) -> str:
    """The results table's name of a method: ``commer-mean``, ``commer-concat``, ``commer-concat-compress`` or
    ``prompt-tuning`` (which has no merge variants)."""
    return f"commer-{variant}" if method == "commer" else "prompt-tuning"


# -- the sweep config ------------------------------------------------------------------------------------------------
@dataclass
class Study:
    """A grid of cells. ``test_docs: same`` tests each model with as many documents as it was trained with."""

    name: str
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    k: list[int] = field(default_factory=lambda: [DEFAULT_K])
    train_docs: list[int] = field(default_factory=lambda: [2])
    test_docs: list[int] | str = "same"
    variants: list[str] = field(default_factory=lambda: ["mean"])  # ComMer only; prompt tuning has none
    pretrain: list[bool] = field(default_factory=lambda: [False])
    train_variant: bool = False  # train a model per variant instead of evaluating the mean-trained one

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS] + [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"study {self.name!r}: unknown method(s)/variant(s) {bad}; known {METHODS}, {VARIANTS}")
        if isinstance(self.test_docs, str) and self.test_docs != "same":
            raise ConfigError(f"study {self.name!r}: test_docs must be a list of numbers or 'same'")
        if "commer" in self.methods and 0 in self.train_docs:
            raise ConfigError(
                f"study {self.name!r}: ComMer cannot train with 0 documents (nothing would reach its weights); "
                "use test_docs: [0, ...] for the no-personalization baseline"
            )


@dataclass
class PretrainConfig:
    """The brief FineWeb auto-encoding pretraining a study with ``pretrain: [true]`` starts from."""

    steps: int = 30
    n_docs: int = 4  # at most this many documents per example


@dataclass
class EvalConfig:
    split: str = "test"
    max_examples: int | None = 64  # users evaluated for perplexity and cost
    rouge_examples: int = 32  # the first this many of them are also generated for ROUGE
    rouge_test_docs: list[int] | None = None  # generate only at these numbers of test documents (None: all)
    max_new_tokens: int = 48
    batch_size: int = 8
    bf16: bool = True


@dataclass
class SweepConfig:
    """A whole sweep; ``model`` and ``train`` hold ``ComMerConfig`` and ``TrainConfig`` fields shared by all runs."""

    output_dir: str = "runs/sweep"  # checkpoints
    results_dir: str | None = None  # table, figures, report (default <output_dir>/results)
    backbone: str = DEFAULT_BACKBONE
    device: str = "auto"
    task: str = "lamp7"
    data_dir: str | None = None
    split_seed: int = 0
    seeds: list[int] = field(default_factory=lambda: [0])
    val_examples: int = 48
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    studies: list[Study] = field(default_factory=list)

    def __post_init__(self) -> None:
        reserved = {"method", "num_embeddings", "merge", "init_seed"} & set(self.model)
        if reserved:
            raise ConfigError(f"model.{sorted(reserved)[0]} is set per cell by the studies, not in model:")
        from_dict(ComMerConfig, self.model, "model.")  # unknown or invalid fields fail here, before any training
        reserved = {"seed", "init_from"} & set(self.train)
        if reserved:
            raise ConfigError(f"train.{sorted(reserved)[0]} is set per cell (seeds:, pretrain:), not in train:")
        from_dict(TrainConfig, self.train, "train.")
        if not self.studies:
            raise ConfigError("the sweep has no studies: nothing to run")

    @property
    def results_path(self) -> Path:
        return Path(self.results_dir) if self.results_dir else Path(self.output_dir) / "results"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_sweep(path: str | Path | None = None, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read a sweep YAML and apply ``key.sub=value`` overrides (values parsed as YAML: ``eval.max_examples=16``,
    ``studies.0.k=[4,8]``: a number indexes the list of studies)."""
    values = dict(load_yaml(path, overrides))
    values["studies"] = [from_dict(Study, s, f"studies.{i}.") for i, s in enumerate(values.get("studies") or [])]
    return from_dict(SweepConfig, values)


# -- cells --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelCell:
    """One model to train. ``variant`` is what it is trained with (``mean`` unless a study sets ``train_variant``)."""

    method: str
    k: int
    train_docs: int
    seed: int
    pretrained: bool
    variant: str = "mean"

    @property
    def name(self) -> str:
        trained = "" if self.variant == "mean" else f"-{self.variant}"
        return f"{self.method}-k{self.k}-n{self.train_docs}-s{self.seed}{'-pre' if self.pretrained else ''}{trained}"


@dataclass(frozen=True)
class EvalCell:
    model: ModelCell
    variant: str
    test_docs: int

    @property
    def method(self) -> str:
        return method_name(self.model.method, self.variant)


def expand(config: SweepConfig) -> list[EvalCell]:
    """Every evaluation cell of the sweep, without duplicates, in study order."""
    cells: dict[EvalCell, None] = {}
    for study in config.studies:
        for method in study.methods:
            variants = study.variants if method == "commer" else ["mean"]
            for k in study.k:
                for n in study.train_docs:
                    for seed in config.seeds:
                        for pre in study.pretrain:
                            for variant in variants:
                                trained = variant if study.train_variant else "mean"
                                model = ModelCell(method, k, n, seed, pre, trained)
                                tests = [n] if study.test_docs == "same" else study.test_docs
                                cells.update((EvalCell(model, variant, t), None) for t in tests)
    return list(cells)


def _digest(value: Any) -> str:
    """A short stable hash of a config or a cell's settings (dataclasses by their fields)."""
    if is_dataclass(value):
        value = asdict(value)
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:10]


# -- the runner ---------------------------------------------------------------------------------------------------
class Sweep:
    """Runs a ``SweepConfig``: trains what is missing, evaluates what is not in the table yet.

    ``backbone_factory`` and ``load_data`` default to the config's backbone and ``load_splits``; tests pass a tiny
    model and synthetic examples. A fresh backbone is built per model, because ComMer injects its LoRA in place.
    """

    def __init__(
        self,
        config: SweepConfig,
        backbone_factory: Callable[[], Backbone] | None = None,
        load_data: DataLoader | None = None,
    ) -> None:
        self.config = config
        self.backbone_factory = backbone_factory or (
            lambda: load_backbone(config.backbone, device=resolve_device(config.device))
        )
        self.load_data = load_data or (lambda task, n, seed: load_splits(task, config.data_dir, n, seed))
        self.table = ResultsTable(config.results_path)
        self._splits: dict[tuple[str, int], Splits] = {}
        self.counts = {"trained": 0, "evaluated": 0, "skipped": 0}

    # -- data and configs -------------------------------------------------------------------------------------------
    def splits(self, task: str, n_docs: int) -> Splits:
        if (task, n_docs) not in self._splits:
            self._splits[task, n_docs] = self.load_data(task, n_docs, self.config.split_seed)
        return self._splits[task, n_docs]

    def _run_config(self, name: str, model: ComMerConfig, data: DataConfig, train: dict[str, Any]) -> RunConfig:
        """A run config whose output folder ends in a digest of the config: a changed setting trains a new model
        instead of resuming an old one."""
        c = self.config
        config = RunConfig("", c.backbone, c.device, model=model, data=data, train=TrainConfig(**train))
        return replace(config, output_dir=str(Path(c.output_dir) / "models" / f"{name}-{_digest(config)}"))

    def pretrain_config(self, cell: ModelCell) -> RunConfig:
        c = self.config
        model = ComMerConfig.from_dict(
            {**c.model, "method": cell.method, "num_embeddings": cell.k, "init_seed": cell.seed}
        )
        data = DataConfig(
            "pretrain", c.data_dir, c.pretrain.n_docs, max_val_examples=c.val_examples, split_seed=c.split_seed
        )
        steps = {"max_steps": c.pretrain.steps, "eval_every": c.pretrain.steps}
        return self._run_config(
            f"pretrain-{cell.method}-k{cell.k}-s{cell.seed}", model, data, {**c.train, **steps, "seed": cell.seed}
        )

    def run_config(self, cell: ModelCell) -> RunConfig:
        """The resolved run config of a model cell (fine-tuned from its pretraining run's best checkpoint)."""
        c = self.config
        merge = "concat" if cell.variant == "concat" else "mean"
        model = ComMerConfig.from_dict(
            {**c.model, "method": cell.method, "num_embeddings": cell.k, "merge": merge, "init_seed": cell.seed}
        )
        data = DataConfig(c.task, c.data_dir, cell.train_docs, max_val_examples=c.val_examples, split_seed=c.split_seed)
        init_from = str(Path(self.pretrain_config(cell).output_dir) / "best") if cell.pretrained else None
        return self._run_config(cell.name, model, data, {**c.train, "seed": cell.seed, "init_from": init_from})

    def eval_key(self, cell: EvalCell) -> str:
        e = self.config.eval
        return _digest(
            {
                "model": Path(self.run_config(cell.model).output_dir).name,
                "variant": cell.variant,
                "test_docs": cell.test_docs,
                "split": e.split,
                "max_examples": e.max_examples,
                "rouge_examples": self._rouge_examples(cell.test_docs),
                "max_new_tokens": e.max_new_tokens,
                "bf16": e.bf16,
            }
        )

    def _rouge_examples(self, test_docs: int) -> int:
        wanted = self.config.eval.rouge_test_docs
        return self.config.eval.rouge_examples if wanted is None or test_docs in wanted else 0

    # -- training ---------------------------------------------------------------------------------------------------
    def train(self, config: RunConfig, transform: Callable[[Example], Example] | None = None) -> Path:
        """Train the model of ``config`` unless a finished run is in its folder; returns its best checkpoint."""
        out = Path(config.output_dir)
        if _finished(out):
            return out / "best"
        splits, info = self.splits(config.data.task, config.data.n_docs)
        if transform is not None:
            splits = {name: [transform(e) for e in examples] for name, examples in splits.items()}
        tqdm.write(f"training {out.name}: {config.train.max_steps or 'all'} steps")
        train_run(config, self.backbone_factory(), (splits, info))
        self.counts["trained"] += 1
        return out / "best"

    def ensure_model(self, cell: ModelCell) -> tuple[Path, RunConfig]:
        if cell.pretrained:
            self.train(self.pretrain_config(cell))
        config = self.run_config(cell)
        transform = concat_documents if cell.variant == "concat-compress" else None
        return self.train(config, transform), config

    # -- evaluation -------------------------------------------------------------------------------------------------
    def evaluate(self, cells: Sequence[EvalCell], checkpoint: Path, config: RunConfig, bar: tqdm) -> None:
        """Evaluate ``cells`` (all of one model) on one load of its checkpoint."""
        e = self.config.eval
        backbone = self.backbone_factory()
        trained = load_checkpoint(checkpoint, backbone)
        for cell in cells:
            splits, info = self.splits(self.config.task, cell.test_docs)
            examples = splits[e.split][: e.max_examples]
            if cell.variant == "concat-compress":
                examples = [concat_documents(ex) for ex in examples]
            model = trained.with_merge("concat" if cell.variant == "concat" else "mean")
            collator = Collator(backbone.tokenizer, model.config, model.max_length)
            bar.set_postfix_str(f"{cell.method} K={cell.model.k} n={cell.model.train_docs}->{cell.test_docs}")
            start = time.perf_counter()
            result = evaluate_examples(
                model, collator, examples, self._rouge_examples(cell.test_docs), e.batch_size, e.max_new_tokens, e.bf16
            )
            self.table.append(
                {
                    "key": self.eval_key(cell),
                    "task": self.config.task,
                    "method": cell.method,
                    "k": cell.model.k,
                    "train_docs": cell.model.train_docs,
                    "test_docs": cell.test_docs,
                    "seed": cell.model.seed,
                    "split": e.split,
                    "pretrained": cell.model.pretrained,
                    "trained_variant": cell.model.variant,
                    "perplexity": result.perplexity,
                    "rouge1": result.rouge1,
                    "rougeL": result.rougeL,
                    "copy_rouge1": result.copy_rouge1,
                    "copy_rougeL": result.copy_rougeL,
                    "n_examples": result.n_examples,
                    "n_rouge": result.n_rouge,
                    "soft_prompt_tokens": result.cost.soft_prompt,
                    "generator_prompt_tokens": result.cost.generator,
                    "compressor_tokens": result.cost.compressor,
                    "train_steps": _trained_steps(Path(config.output_dir)),
                    "eval_seconds": round(time.perf_counter() - start, 1),
                    "checkpoint": str(checkpoint),
                    "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "config": config.to_dict(),
                    "eval_config": asdict(e),
                    "split_info": {**info.to_dict(with_users=False), "users_digest": _digest(info.users)},
                    "samples": result.samples,
                }
            )
            self.counts["evaluated"] += 1
            bar.update(1)

    def copy_baseline(self) -> None:
        """One ``copy-input`` row: ROUGE of returning the input's text, on the users every ROUGE row is scored on."""
        e = self.config.eval
        key = _digest({"copy-input": self.config.task, "split": e.split, "rouge_examples": e.rouge_examples})
        if e.rouge_examples < 1 or key in self.table.finished_keys():
            return
        splits, info = self.splits(self.config.task, 0)
        examples = splits[e.split][: e.rouge_examples]
        scores = rouge([copy_input(ex.instruction) for ex in examples], [ex.answer for ex in examples])
        self.table.append(
            {
                "key": key,
                "task": self.config.task,
                "method": "copy-input",
                "test_docs": 0,
                "split": e.split,
                "rouge1": scores["rouge1"],
                "rougeL": scores["rougeL"],
                "n_rouge": len(examples),
                "soft_prompt_tokens": 0,
                "generator_prompt_tokens": 0,  # no generator runs
                "compressor_tokens": 0,
                "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "split_info": {**info.to_dict(with_users=False), "users_digest": _digest(info.users)},
            }
        )

    def run(self) -> dict[str, int]:
        """Train and evaluate everything missing; returns how many models were trained and cells evaluated/skipped."""
        results = self.config.results_path
        results.mkdir(parents=True, exist_ok=True)
        (results / f"sweep-{self.config.task}.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        info = read_run_info(results)
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
        invocation = {"command": command, "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine()}
        info.setdefault("invocations", []).append(invocation)
        start = time.perf_counter()

        def record(finished: bool) -> None:
            # after every model and at the end: a killed sweep still leaves its wall time and progress on record
            invocation.update(self.counts, wall_s=round(time.perf_counter() - start, 1), finished=finished)
            write_run_info(results, info)

        done = self.table.finished_keys()
        cells = expand(self.config)
        pending = [c for c in cells if self.eval_key(c) not in done]
        self.counts["skipped"] = len(cells) - len(pending)
        tqdm.write(f"sweep: {len(cells)} cells, {self.counts['skipped']} already in {self.table.jsonl}")
        self.copy_baseline()
        record(False)
        by_model: dict[ModelCell, list[EvalCell]] = {}
        for cell in pending:
            by_model.setdefault(cell.model, []).append(cell)
        with tqdm(total=len(pending), desc="evaluate", dynamic_ncols=True) as bar:
            for model_cell, model_cells in by_model.items():
                checkpoint, config = self.ensure_model(model_cell)
                self.evaluate(model_cells, checkpoint, config, bar)
                record(False)
        record(True)
        return dict(self.counts)


def _log_events(out: Path) -> list[dict[str, Any]]:
    log = out / "log.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


def _finished(out: Path) -> bool:
    """A training run is finished when its log says so and its best checkpoint exists (a killed one resumes)."""
    return (out / "best" / "commer.json").is_file() and any(r.get("event") == "done" for r in _log_events(out))


def _trained_steps(out: Path) -> int | None:
    return next((r["steps"] for r in reversed(_log_events(out)) if r.get("event") == "done"), None)


def run_sweep(
    config: SweepConfig,
    backbone_factory: Callable[[], Backbone] | None = None,
    load_data: DataLoader | None = None,
    report: bool = True,
) -> dict[str, int]:
    """Run a sweep (see ``Sweep``) and, with ``report``, write the report and figures next to its results."""
    counts = Sweep(config, backbone_factory, load_data).run()
    if report:
        from commer.experiments.report import write_report

        write_report(config.results_path)
    return counts
