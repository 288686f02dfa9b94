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
import ctypes
import functools
import json
import math
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from commer.backbone import Backbone, load_backbone
from commer.batch import Batch
from commer.checkpoint import load_trainable, save_checkpoint
from commer.config import RunConfig, TrainConfig
from commer.data.splits import SPLIT_FILE, SplitInfo
from commer.data.tasks import load_splits
from commer.errors import ConfigError
from commer.evaluate import autocast, nll_totals
from commer.model import SoftPromptLM, build_model
from commer.text import IGNORE_INDEX, Collator, Example

if TYPE_CHECKING:
    from accelerate import Accelerator


# -- the loop ----------------------------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def return_freed_memory(mmap_threshold: int = 1 << 16) -> bool:
    """Make glibc's allocator give freed tensor memory back to the system (Linux; a no-op elsewhere); returns whether
    it could.

    Why: training allocates activations of a new shape at every micro batch. By default glibc serves blocks past
    128 KiB with mmap, then raises that threshold (up to 32 MiB) each time such a block is freed, so later
    activations come from the heap, which fragments and never shrinks: the quickstart's resident memory grew to
    6-7 GB for a 135M-parameter model. A fixed threshold keeps large blocks on mmap, returned to the system when
    freed. The price is a page fault per page of every large tensor: bench/memory_stages.py measured 4.7 -> 1.6 GB
    resident after 20 training steps, but 6.6 s per step against 4.0, so the ``commer`` command does it only with
    ``COMMER_LOW_MEMORY=1``."""
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameters, from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, mmap_threshold)) and bool(libc.mallopt(m_trim_threshold, 1 << 20))


def trim_heap() -> bool:
    """Give the heap's freed memory back to the system now (glibc's ``malloc_trim``; a no-op elsewhere); returns
    whether it could. ``train.trim_heap`` calls it after every optimizer step: the allocator keeps its defaults (no
    page fault per page of every large tensor, unlike ``return_freed_memory``), but what one step freed does not stay
    resident into the next (docs/benchmarks.md)."""
    malloc_trim = getattr(_glibc(), "malloc_trim", None)  # glibc only: not in every C library
    if malloc_trim is None:
        return False
    malloc_trim(0)  # its result says whether memory was released, not whether the call worked
    return True


# oneDNN primitives kept cached while training (its default is 1,024): docs/benchmarks.md, session 9
ONEDNN_CACHE_CAPACITY = 64


def cap_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> None:
    """Keep at most ``capacity`` oneDNN primitives cached, unless ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` is already set.

    Why: on a CPU, bfloat16 autocast runs matmuls through oneDNN, which builds and caches a kernel (a primitive, with
    its scratch memory) per input shape. Training meets new shapes at nearly every micro batch, and the default cache
    of 1,024 primitives held about 0.4 GB more at the loop's peak (bench/memory_stages.py: 2.15 -> 1.76 GB with
    checkpointing and trimming), with no slower steps at 64. oneDNN reads the variable once, at the process's first
    such matmul: later calls change nothing."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))


@functools.cache  # trim_heap runs after every optimizer step: load the library once
def _glibc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


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
    """The step's forward pass as ``forward``: DDP synchronises gradients of what runs through a wrapped module's
    forward. Returns each example's answer NLL and token count, ``(B,)`` each, and with ``partners`` (see
    ``contrast_partners``) also the NLL of its answer read with its partner's soft prompt, else ``None``."""

    def __init__(self, model: SoftPromptLM) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: Batch, partners: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        prefix = self.model.prefix(batch)  # (B, P, D), (B, P): the documents are compressed once
        nll, n_tokens = self.model.nll(batch, prefix)
        if partners is None:
            return nll, n_tokens, None
        other = tuple(t[partners.clamp(min=0)] for t in prefix)  # example b reads its partner's soft prompt
        return nll, n_tokens, self.model.nll(batch, other)[0]


def contrast_partners(users: Sequence[str]) -> torch.Tensor:
    """Whose soft prompt each example of a micro batch reads for the contrast hinge: ``(B,)`` the index of the
    nearest earlier example (cyclically) of another user, -1 where every example belongs to the same user (no
    hinge then: reading one's own user's soft prompt is no contrast)."""
    n = len(users)
    partners = []
    for b in range(n):
        others = [(b - shift) % n for shift in range(1, n) if users[(b - shift) % n] != users[b]]
        partners.append(others[0] if others else -1)
    return torch.tensor(partners, dtype=torch.long)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config dicts as dotted keys: ``{"train": {"seed": 0}}`` -> ``{"train.seed": 0}``."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def contrast_hinge(nll: torch.Tensor, nll_other: torch.Tensor, n_tokens: torch.Tensor, margin: float) -> torch.Tensor:
    """Per example, ``(B,)``: how far the answer is from being ``margin`` nats per token more likely with its own
    user's soft prompt than with another user's (0 once it is)."""
    gain = (nll_other - nll) / n_tokens.clamp(min=1)
    return torch.relu(margin - gain)


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
            raise ConfigError("no training examples: check the data config (task, data_dir, n_docs)")
        self.config, self.cfg = config, config.train
        self.model = model
        if self.cfg.activation_checkpointing:
            model.checkpoint_activations()
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
            raise ConfigError(f"commer train runs on one process or data-parallel (DDP), not {kind}")
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

    def _check_same_run(self) -> None:
        """A folder holding a run's state resumes only that run: with another config (another learning rate, or
        another checkpoint to start from) the result would be neither run, so that is an error naming what differs.
        Only ``device`` may change."""
        saved_file = self.out / "config.yaml"
        if not (self.out / "last" / "trainer_state.pt").is_file() or not saved_file.is_file():
            return
        saved, now = _flat(yaml.safe_load(saved_file.read_text()) or {}), _flat(self.config.to_dict())
        differ = [k for k in sorted(saved.keys() | now.keys()) if k != "device" and saved.get(k) != now.get(k)]
        if differ:
            changes = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in differ)
            raise ConfigError(
                f"{self.out} holds a run with another config ({changes}): rerun it with the same config to resume, "
                "or choose another output_dir"
            )

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
    def _step_indices(self) -> list[int]:
        """The examples of the next optimizer step (all processes together)."""
        epoch, offset = divmod(self.step, self.steps_per_epoch)
        order = _epoch_order(len(self.train_examples), self.cfg.seed, epoch)
        start = offset * self.cfg.batch_size
        return order[start : start + self.cfg.batch_size]

    def _train_step(self, indices: list[int]) -> tuple[float, int]:
        """One optimizer step over this process's share of ``indices``, accumulated over micro batches; returns its
        loss and the tokens read (this process's)."""
        acc, cfg, device = self.accelerator, self.cfg, self.model.device
        with acc.split_between_processes(indices) as share:
            share, weight = list(share), 1
        if not share:
            # Fewer examples than processes (an epoch's last step): this process still joins the gradient all-reduce,
            # with an example weighted 0.
            share, weight = indices[:1], 0
        micro = [share[j : j + cfg.micro_batch_size] for j in range(0, len(share), cfg.micro_batch_size)]
        batches = [self.collator([self.train_examples[i] for i in m]).to(device) for m in micro]
        answer_tokens = sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches) * weight
        total_answer_tokens = int(acc.reduce(torch.tensor(answer_tokens, device=acc.device), "sum"))
        # Another user's soft prompt needs another user's example in the micro batch.
        contrast = cfg.contrast_weight > 0 and cfg.micro_batch_size > 1
        step_loss, tokens = 0.0, 0
        for j, batch in enumerate(batches):
            partners = contrast_partners([self.train_examples[i].user_id for i in micro[j]]) if contrast else None
            if partners is not None and not bool((partners >= 0).any()):
                partners = None  # one user only: no hinge, so no second pass through the generator
            # Gradients are all-reduced once per step, in the last micro batch's backward.
            with contextlib.nullcontext() if j == len(batches) - 1 else acc.no_sync(self.loss_module):
                with autocast(device, cfg.bf16):
                    nll, n_tokens, nll_other = self.loss_module(
                        batch, None if partners is None else partners.to(device)
                    )
                # Normalise by the whole step's answer tokens on all processes: accumulation and data parallelism then
                # equal one big batch (DDP averages gradients over the processes, hence the factor).
                loss = nll.sum() * (weight * acc.num_processes) / max(total_answer_tokens, 1)
                if nll_other is not None:  # the hinge is a mean over the step's examples
                    paired = (partners >= 0).to(nll.device, nll.dtype)
                    hinge = (contrast_hinge(nll, nll_other, n_tokens, cfg.contrast_margin) * paired).sum()
                    loss = loss + cfg.contrast_weight * hinge * (weight * acc.num_processes) / len(indices)
                acc.backward(loss)
            step_loss += float(loss.detach())
            tokens += int(batch.input_mask.sum() + batch.doc_mask.sum()) * weight
        acc.clip_grad_norm_(self.model.trainable_state().values(), cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if cfg.trim_heap:
            trim_heap()
        self.step += 1
        return step_loss, tokens

    def _log_window(self, losses: list[float], tokens: int, seconds: float, bar: tqdm) -> None:
        """Log the mean loss and throughput of the steps since the last log line (all processes)."""
        acc = self.accelerator
        window = torch.tensor([sum(losses), tokens], dtype=torch.float64, device=acc.device)
        summed_loss, all_tokens = acc.reduce(window, "sum").tolist()
        mean_loss = summed_loss / acc.num_processes / len(losses)
        record = {
            "loss": mean_loss,
            "ppl": math.exp(min(mean_loss, 50)),
            "lr": {g["name"]: g["lr"] for g in self.optimizer.param_groups},
            "tokens_per_s": all_tokens / max(seconds, 1e-9),
        }
        bar.set_postfix(
            loss=f"{record['loss']:.3f}",
            ppl=f"{record['ppl']:.2f}",
            lr=f"{self.optimizer.param_groups[0]['lr']:.1e}",
            tok_s=f"{record['tokens_per_s']:.0f}",
        )
        self._log(record)

    def fit(self, stop_at_step: int | None = None) -> dict[str, Any]:
        """Train until ``total_steps`` or early stopping; returns a summary. ``stop_at_step`` ends the run right after
        the checkpoint of that step, as a kill would (for tests of resumption)."""
        acc, cfg = self.accelerator, self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        self._check_same_run()
        if self.main:
            (self.out / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        if self._resume():
            self._log({"event": "resumed"})
        self.model.train()
        stopped_early = False
        bar = tqdm(total=self.total_steps, initial=self.step, desc="train", dynamic_ncols=True, disable=not self.main)
        losses, tokens, window_start = [], 0, time.perf_counter()
        while self.step < self.total_steps and not stopped_early:
            loss, step_tokens = self._train_step(self._step_indices())
            losses.append(loss)
            tokens += step_tokens
            bar.update(1)
            last = self.step == self.total_steps
            if self.step % cfg.log_every == 0 or last:
                self._log_window(losses, tokens, time.perf_counter() - window_start, bar)
                losses, tokens, window_start = [], 0, time.perf_counter()
            if self.step % cfg.eval_every == 0 or last:
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
        load_trainable(model, config.train.init_from, fresh_bridge=config.train.init_fresh_bridge)
    return model, backbone


def run(
    config: RunConfig,
    backbone: Backbone | None = None,
    splits: tuple[dict[str, list[Example]], SplitInfo] | None = None,
    model: SoftPromptLM | None = None,
) -> dict[str, Any]:
    """A whole run, the one way every entry point (``commer train``, the quickstart, sweeps) trains: the data
    (``splits``, or the config's task loaded and split by user), the model (``model`` on ``backbone``, or built from the
    config), training, and the best checkpoint loaded back into the model. The split is written next to the
    checkpoints. Returns the training summary."""
    cap_onednn_cache()
    accelerator = make_accelerator(cpu=resolve_device(config.device).type == "cpu")
    torch.manual_seed(config.train.seed)  # LoRA dropout; the data order has its own seeded RNG
    if splits is None:
        data = config.data
        splits = load_splits(
            data.task,
            data.data_dir,
            data.n_docs,
            data.split_seed,
            retrieve_top_k=data.retrieve_top_k,
            retrieve_share=data.retrieve_share,
        )
    examples, split_info = splits
    train_examples = examples["train"][: config.data.max_train_examples]
    val_examples = examples["validation"][: config.data.max_val_examples]
    if model is None:
        # "auto" under a launcher: each process's own GPU (the launcher's device is the single-process "auto" too).
        model, backbone = build(config, backbone, accelerator.device if config.device == "auto" else None)
    elif backbone is None:
        raise ValueError("a run given a model needs its backbone too (for the tokenizer)")
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        (out / SPLIT_FILE).write_text(json.dumps(split_info.to_dict(), indent=1) + "\n")
        tqdm.write(
            f"{config.data.task}: {len(train_examples)} training and {len(val_examples)} validation examples, "
            f"{config.model.method} K={config.model.num_embeddings} on {backbone.name}, output {out}, "
            f"{accelerator.num_processes} process(es)"
        )
    summary = Trainer(config, model, backbone.tokenizer, train_examples, val_examples, accelerator).fit()
    load_trainable(model, out / "best")
    return summary
