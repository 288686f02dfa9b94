"""One training loop for ComMer and the prompt-tuning baseline, with the paper's recipe as defaults.

AdamW (weight decay 0.001) with two learning rates (compression embeddings 1e-2, LoRA 1e-4; soft prompt 3e-2),
gradient clipping at 0.3, cosine schedule with 3% warm-up, gradient accumulation, early stopping on validation
perplexity, bf16 autocast on a GPU. Only trainable weights are checkpointed: ``best/`` (lowest validation perplexity)
and ``last/`` (plus optimizer, schedule, RNG and data position, so a killed run resumes to the same result).

Data-parallel: ``accelerate launch -m commer train CONFIG`` runs the same loop in N processes (DDP through Hugging
Face Accelerate). Each optimizer step's ``batch_size`` examples are split across the processes, the loss is normalised
by the answer tokens of the whole step on all processes and gradients are all-reduced, so N processes take the same
steps as one, up to floating-point reduction order (and LoRA dropout masks, which each process draws on its own).
Validation perplexity is summed over the processes' shares; only the main process writes checkpoints and logs.
Launched without Accelerate, the loop is a single process, as before.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from commer.backbone import Backbone, load_backbone
from commer.batch import Batch
from commer.checkpoint import load_trainable, save_checkpoint
from commer.config import ComMerConfig
from commer.data.collate import Collator
from commer.data.example import Example
from commer.data.tasks import load_splits
from commer.evaluate import autocast, nll_totals
from commer.model import SoftPromptLM, build_model

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class DataConfig:
    """Which examples to train on (see ``commer.data.tasks``)."""

    task: str = "lamp7"  # one of commer.data.tasks.TASKS: lamp7, news, perltqa, pretrain, pretrain-mix, recall
    data_dir: str | None = None  # default: ../shared/data when it exists, else $COMMER_DATA
    n_docs: int = 4  # documents per example (top-n by BM25 for LaMP)
    max_train_examples: int | None = None
    max_val_examples: int = 1024
    max_test_examples: int | None = None
    split_seed: int = 0


@dataclass
class TrainConfig:
    lr_compression: float = 1e-2
    lr_lora: float = 1e-4
    lr_soft_prompt: float = 3e-2  # prompt tuning's soft prompt and ComMer's task prompt (its bridge)
    lr_bridge: float = 1e-3  # the bridge's map from merged compressions (W, gate or MLP)
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    warmup_ratio: float = 0.03
    batch_size: int = 16  # examples per optimizer step
    micro_batch_size: int = 4  # examples per forward pass; batch_size / micro_batch_size accumulation steps
    epochs: int = 20
    max_steps: int | None = None  # overrides epochs when set
    eval_every: int = 100  # optimizer steps between validations (and checkpoints)
    patience: int = 3  # validations without improvement before stopping; 0 disables early stopping
    log_every: int = 10
    seed: int = 0
    bf16: bool = True  # autocast to bfloat16 on a GPU, and on a CPU with native bf16 (3x faster on AVX512-BF16)
    init_from: str | None = None  # a checkpoint to start from: a folder, or "pretrained" (the shipped compressor)

    def __post_init__(self) -> None:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size ({self.micro_batch_size})"
            )
        if self.eval_every < 1:
            raise ValueError(f"eval_every must be >= 1, got {self.eval_every}")


@dataclass
class RunConfig:
    """Everything one run needs; written as ``config.yaml`` next to its checkpoints and results."""

    output_dir: str = "runs/default"
    backbone: str = "smollm2-135m"
    device: str = "auto"
    model: ComMerConfig = field(default_factory=ComMerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- configs: YAML + dotted overrides ------------------------------------------------------------------------------
def _build(cls, values: dict[str, Any], where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; known: {', '.join(known)}")
    kwargs = {}
    defaults = cls()
    for name, value in values.items():
        default = getattr(defaults, name)
        if is_dataclass(default):
            value = _build(type(default), value or {}, f"{where}{name}.")
        elif isinstance(default, float) and isinstance(value, str):
            # YAML reads 1e-3 (no dot) as a string: a float field takes any number a user writes
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where}{name} must be a number, got {value!r}") from None
        kwargs[name] = value
    return cls(**kwargs)


def read_yaml_with_overrides(path: str | Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """A YAML file (or nothing) with ``key.sub=value`` overrides applied; values are parsed as YAML (16, 1e-4, true,
    null, [4, 8]) and a number in a key indexes a list (``studies.0.k=[4,8]``)."""
    values: dict[str, Any] = (yaml.safe_load(Path(path).read_text()) or {}) if path is not None else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key.sub=value")
        node: Any = values
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = yaml.safe_load(raw)
    return values


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a YAML run config and apply dotted overrides (see ``read_yaml_with_overrides``)."""
    return _build(RunConfig, read_yaml_with_overrides(path, overrides), "")


# -- the loop ----------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def param_groups(model: SoftPromptLM, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group per learning rate: the paper found one shared rate worse."""
    groups: dict[str, list[torch.nn.Parameter]] = {"compression": [], "lora": [], "soft_prompt": [], "bridge": []}
    for name, p in model.trainable_state().items():
        if name == "compression_embeddings":
            groups["compression"].append(p)
        elif name in ("soft_prompt", "bridge.task_prompt"):
            groups["soft_prompt"].append(p)
        elif name.startswith("bridge."):
            groups["bridge"].append(p)
        elif "lora_" in name:
            groups["lora"].append(p)
        else:
            raise ValueError(f"no learning rate is defined for trainable parameter {name!r}")
    lrs = {
        "compression": cfg.lr_compression,
        "lora": cfg.lr_lora,
        "soft_prompt": cfg.lr_soft_prompt,
        "bridge": cfg.lr_bridge,
    }
    return [
        {"name": name, "params": params, "lr": lrs[name], "weight_decay": cfg.weight_decay}
        for name, params in groups.items()
        if params
    ]


def make_accelerator(cpu: bool) -> Accelerator:
    """The Accelerator of a run: the launcher's processes (one when not launched by ``accelerate launch``).

    ``cpu``: the model runs on CPUs, so processes talk through gloo (e.g. ``accelerate launch --multi_gpu
    --num_processes 2`` or ``torchrun --nproc_per_node 2`` on a machine without GPUs). Mixed precision stays
    ``train.bf16``'s autocast and the run config places the model, whatever an accelerate config file says, so a
    launched run computes what a single process does."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # A micro batch whose users have no documents leaves the LoRA and compression embeddings without gradient: DDP
    # must look for unused parameters rather than wait for their gradients forever.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(device_placement=False, mixed_precision="no", cpu=cpu, kwargs_handlers=[ddp])


class _StepLoss(torch.nn.Module):
    """``model.nll`` as ``forward``: DDP synchronises gradients of what runs through a wrapped module's forward."""

    def __init__(self, model: SoftPromptLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.nll(batch)


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The data order of an epoch depends only on (seed, epoch): a resumed run replays it exactly."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


class Trainer:
    """Trains ``model`` on examples; ``fit`` resumes from ``output_dir/last`` when it exists."""

    def __init__(
        self,
        config: RunConfig,
        model: SoftPromptLM,
        tokenizer,
        train_examples: Sequence[Example],
        val_examples: Sequence[Example],
        accelerator: Accelerator | None = None,
    ) -> None:
        if not train_examples:
            raise ValueError("no training examples: check the data config (task, data_dir, n_docs)")
        self.config, self.cfg = config, config.train
        self.model = model
        self.collator = Collator(tokenizer, model.config, model.max_length)
        self.train_examples, self.val_examples = list(train_examples), list(val_examples)
        self.out = Path(config.output_dir)
        self.steps_per_epoch = math.ceil(len(self.train_examples) / self.cfg.batch_size)
        self.total_steps = self.cfg.max_steps or self.cfg.epochs * self.steps_per_epoch
        self.optimizer = torch.optim.AdamW(param_groups(model, self.cfg))
        self.scheduler = get_cosine_schedule_with_warmup(
            self.optimizer, math.ceil(self.cfg.warmup_ratio * self.total_steps), self.total_steps
        )
        self.step = 0
        self.best_ppl = math.inf
        self.bad_evals = 0
        self.accelerator = accelerator or make_accelerator(cpu=model.device.type == "cpu")
        kind = self.accelerator.distributed_type.value
        if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
            # FSDP and DeepSpeed shard parameters and optimizer state: checkpoints written from the main process's
            # trainable_state() would hold one shard. See docs/scaling.md.
            raise ValueError(f"commer train runs on one process or data-parallel (DDP), not {kind}")
        self.main = self.accelerator.is_main_process
        self.loss_module = self.accelerator.prepare(_StepLoss(model))

    # -- state ------------------------------------------------------------------------------------------------------
    def _save_last(self) -> None:
        last = self.out / "last"
        save_checkpoint(self.model, last, extra={"step": self.step})
        torch.save(
            {
                "step": self.step,
                "best_ppl": self.best_ppl,
                "bad_evals": self.bad_evals,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            last / "trainer_state.pt.tmp",
        )
        # rename last: a kill while saving leaves the previous complete state in place
        (last / "trainer_state.pt.tmp").replace(last / "trainer_state.pt")

    def _resume(self) -> bool:
        state_file = self.out / "last" / "trainer_state.pt"
        if not state_file.is_file():
            return False
        load_trainable(self.model, self.out / "last")
        state = torch.load(state_file, weights_only=True)  # never unpickle code from a run folder
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.best_ppl, self.bad_evals = state["step"], state["best_ppl"], state["bad_evals"]
        return True

    def _log(self, record: dict[str, Any]) -> None:
        if not self.main:
            return
        with (self.out / "log.jsonl").open("a") as f:
            f.write(json.dumps({"step": self.step, "time": round(time.time(), 3), **record}) + "\n")

    # -- loop -------------------------------------------------------------------------------------------------------
    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` or early stopping; returns a summary. ``stop_at_step`` simulates a kill right
        after the checkpoint of that step (for tests of resumption)."""
        acc = self.accelerator
        self.out.mkdir(parents=True, exist_ok=True)
        if self.main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        resumed = self._resume()
        if resumed:
            self._log({"event": "resumed"})
        cfg, device = self.cfg, self.model.device
        self.model.train()
        stopped_early = False
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.main)
        window_tokens, window_start, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
        while self.step < self.total_steps and not stopped_early:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            order = _epoch_order(len(self.train_examples), cfg.seed, epoch)
            start = offset * cfg.batch_size
            indices = order[start : start + cfg.batch_size]
            with acc.split_between_processes(indices) as share:
                share, weight = list(share), 1
            if not share:
                # Fewer examples than processes (an epoch's last step): this process still joins the gradient
                # all-reduce, with an example weighted 0.
                share, weight = indices[:1], 0
            micro = [share[i : i + cfg.micro_batch_size] for i in range(0, len(share), cfg.micro_batch_size)]
            answer_tokens = 0
            batches = []
            for idx in micro:
                batch = self.collator([self.train_examples[i] for i in idx]).to(device)
                answer_tokens += int((batch.labels != -100).sum()) * weight
                batches.append(batch)
            total_answer_tokens = int(acc.reduce(torch.tensor(answer_tokens, device=acc.device), "sum"))
            step_loss = 0.0
            for j, batch in enumerate(batches):
                # Gradients are all-reduced once per step, in the last micro batch's backward.
                with contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(self.loss_module):
                    with autocast(device, cfg.bf16):
                        nll, _ = self.loss_module(batch)
                    # Normalise by the whole step's answer tokens on all processes: accumulation and data parallelism
                    # then equal one big batch (DDP averages gradients over the processes, hence the factor).
                    loss = nll.sum() * (weight * acc.num_processes) / max(total_answer_tokens, 1)
                    acc.backward(loss)
                step_loss += float(loss.detach())
                window_tokens += int(batch.input_mask.sum() + batch.doc_mask.sum()) * weight
            acc.clip_grad_norm_(self.model.trainable_state().values(), cfg.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            window_loss += step_loss
            window_n += 1
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                elapsed = time.perf_counter() - window_start
                window = torch.tensor([window_loss, window_tokens], dtype=torch.float64, device=acc.device)
                summed_loss, all_tokens = acc.reduce(window, "sum").tolist()
                mean_loss = summed_loss / acc.num_processes / window_n
                record = {
                    "loss": mean_loss,
                    "ppl": math.exp(min(mean_loss, 50)),
                    "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
                    "tokens_per_s": all_tokens / max(elapsed, 1e-9),
                }
                bar.set_postfix(
                    loss=f"{record['loss']:.3f}",
                    ppl=f"{record['ppl']:.2f}",
                    lr=f"{self.optimizer.param_groups[0]['lr']:.1e}",
                    tok_s=f"{record['tokens_per_s']:.0f}",
                )
                self._log(record)
                window_tokens, window_start, window_loss, window_n = 0, time.perf_counter(), 0.0, 0
            if self.step % cfg.eval_every == 0 or self.step == self.total_steps:
                stopped_early = self._validate()
                if self.main:
                    self._save_last()
                if stop_at_step is not None and self.step >= stop_at_step:
                    bar.close()
                    acc.wait_for_everyone()
                    return {"killed_at": self.step}
        bar.close()
        acc.wait_for_everyone()  # every process returns once the main one has written the checkpoints
        summary = {
            "steps": self.step,
            "best_val_ppl": self.best_ppl,
            "stopped_early": stopped_early,
            "best_checkpoint": str(self.out / "best"),
        }
        self._log({"event": "done", **summary})
        return summary

    @torch.no_grad()
    def _perplexity(self) -> float:
        """Token-weighted perplexity of the validation answers, each process scoring its share."""
        acc = self.accelerator
        with acc.split_between_processes(self.val_examples) as share:
            totals = nll_totals(self.model, self.collator, list(share), self.cfg.micro_batch_size, self.cfg.bf16)
        summed_nll, tokens = acc.reduce(torch.tensor(totals, dtype=torch.float64, device=acc.device), "sum").tolist()
        return math.exp(summed_nll / max(tokens, 1))

    def _validate(self) -> bool:
        """Validate, keep the best checkpoint; True when early stopping says stop."""
        if not self.val_examples:
            if self.main:
                save_checkpoint(self.model, self.out / "best", extra={"step": self.step})
            return False
        ppl = self._perplexity()
        improved = ppl < self.best_ppl
        if improved:
            self.best_ppl, self.bad_evals = ppl, 0
            if self.main:
                save_checkpoint(self.model, self.out / "best", extra={"step": self.step, "val_ppl": ppl})
        else:
            self.bad_evals += 1
        self._log({"event": "eval", "val_ppl": ppl, "best_val_ppl": self.best_ppl})
        if self.main:
            tqdm.write(f"step {self.step}: validation perplexity {ppl:.3f} (best {self.best_ppl:.3f})")
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience


def build(
    config: RunConfig, backbone: Backbone | None = None, device: torch.device | None = None
) -> tuple[SoftPromptLM, Backbone]:
    """The model a run config describes, on its backbone, initialised from ``train.init_from`` when set.
    ``device`` (default: ``config.device``) is where a backbone loaded here goes."""
    device = device or resolve_device(config.device)
    backbone = backbone or load_backbone(config.backbone, device=device)
    model = build_model(backbone, config.model)
    if config.train.init_from:
        load_trainable(model, config.train.init_from)
    return model, backbone


def run(config: RunConfig, backbone: Backbone | None = None) -> dict[str, Any]:
    """Load the data a run config names, build its model and train it; the split is written next to the checkpoints."""
    accelerator = make_accelerator(cpu=resolve_device(config.device).type == "cpu")
    torch.manual_seed(config.train.seed)  # LoRA dropout; the data order has its own seeded RNG
    splits, split_info = load_splits(config.data.task, config.data.data_dir, config.data.n_docs, config.data.split_seed)
    train_examples = splits["train"][: config.data.max_train_examples]
    val_examples = splits["validation"][: config.data.max_val_examples]
    # "auto" under a launcher: each process's own GPU (the launcher's device is the single-process "auto" too).
    model, backbone = build(config, backbone, accelerator.device if config.device == "auto" else None)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (out / "split.json").write_text(json.dumps(split_info.to_dict(), indent=1) + "\n")
        tqdm.write(
            f"{config.data.task}: {len(train_examples)} training and {len(val_examples)} validation examples, "
            f"{config.model.method} K={config.model.num_embeddings} on {backbone.name}, output {out}, "
            f"{accelerator.num_processes} process(es)"
        )
    return Trainer(config, model, backbone.tokenizer, train_examples, val_examples, accelerator).fit()
