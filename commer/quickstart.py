"""``commer quickstart``: the whole method on 2 CPU cores in 12 to 24 minutes (the personalization hinge included).

Start from the compressor shipped with the package (pretrained by auto-encoding), fine-tune it on LaMP-7 training
users (or on the synthetic recall probe, ``task="recall"``), then, on held-out users, compare the perplexity of the
gold answer with the user's own documents, with another user's documents, and with none, and show a few greedy answers
next to the gold ones. Every claim printed is computed from this run.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import typer

from commer.backbone import load_backbone
from commer.checkpoint import PRETRAINED, load_checkpoint, resolve_checkpoint
from commer.config import (
    DEFAULT_BACKBONE,
    DEFAULT_BRIDGE,
    DEFAULT_K,
    QUICKSTART_CONTRAST_WEIGHT,
    ComMerConfig,
    DataConfig,
    RunConfig,
    TrainConfig,
)
from commer.data.tasks import load_splits
from commer.errors import ConfigError
from commer.evaluate import NONE, OTHER, OWN, copy_input, document_variants, generate, perplexity
from commer.model import ComMer
from commer.text import Collator
from commer.train import cap_onednn_cache
from commer.train import run as train_run

# Differences under 1% in perplexity are within what another seed or another 64 users would change.
MARGIN = 0.01


def _verdict(ppl: dict[str, float]) -> list[str]:
    own, none, other = ppl[OWN], ppl[NONE], ppl[OTHER]
    if own < none * (1 - MARGIN):
        lines = [f"Documents help: perplexity {own:.2f} with the user's documents vs {none:.2f} without any."]
    elif own > none * (1 + MARGIN):
        lines = [f"Documents HURT in this run: perplexity {own:.2f} with them vs {none:.2f} without."]
    else:
        lines = [
            f"Documents make no clear difference in this run: perplexity {own:.2f} with them vs {none:.2f} without."
        ]
    if own < other * (1 - MARGIN):
        lines.append(
            f"Own documents beat another user's ({own:.2f} vs {other:.2f}): the soft prompt carries something personal."
        )
    else:
        lines.append(
            f"Own documents do not clearly beat another user's ({own:.2f} vs {other:.2f}, less than 1% apart): no "
            "personal signal in this run."
        )
    return lines


def quickstart(
    output_dir: Path = Path("runs/quickstart"),
    task: str = "lamp7",
    data_dir: str | None = None,
    backbone_spec: str = DEFAULT_BACKBONE,
    init: str | None = PRETRAINED,
    num_embeddings: int = DEFAULT_K,
    compression_norm: str = "none",
    bridge: str = DEFAULT_BRIDGE,
    n_docs: int = 2,
    pretrain_steps: int = 0,
    finetune_steps: int = 80,
    batch_size: int = 8,
    lr_lora: float = 1e-3,
    contrast_weight: float = QUICKSTART_CONTRAST_WEIGHT,
    val_users: int = 48,
    test_users: int = 64,
    activation_checkpointing: bool = True,
    trim_heap: bool = True,
    show: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the quickstart and return (and write to ``output_dir/results.json``) what it measured.

    ``init``: the checkpoint fine-tuning starts from (default the shipped pretrained compressor; its config fixes K,
    the LoRA rank and the bridge); ``None`` starts from an untrained ComMer of ``num_embeddings``,
    ``compression_norm`` and ``bridge``, pretrained here for ``pretrain_steps`` steps first.
    ``activation_checkpointing`` and ``trim_heap`` (on by default) keep the quickstart under 2.5 GB of resident memory
    instead of 7 GB, for about 1.1x the wall time (docs/benchmarks.md, session 9)."""
    if task not in ("lamp7", "recall"):
        raise ConfigError(f"task must be 'lamp7' or 'recall', got {task!r}")
    cap_onednn_cache()  # before the first evaluation: oneDNN reads it once
    start = time.perf_counter()
    torch.manual_seed(seed)
    backbone = load_backbone(backbone_spec)
    if init is not None:
        model = load_checkpoint(init, backbone)
        typer.echo(f"fine-tuning from {resolve_checkpoint(init)} ({model.config.to_dict()})")
    else:
        config = ComMerConfig(
            num_embeddings=num_embeddings, compression_norm=compression_norm, bridge=bridge, init_seed=seed
        )
        model = ComMer(backbone, config)
    train_cfg = TrainConfig(
        batch_size=batch_size,
        micro_batch_size=min(4, batch_size),
        lr_lora=lr_lora,
        contrast_weight=contrast_weight,
        activation_checkpointing=activation_checkpointing,
        trim_heap=trim_heap,
        log_every=5,
        seed=seed,
    )
    stages = {
        "pretrain": RunConfig(
            output_dir=str(output_dir / "pretrain"),
            backbone=backbone_spec,
            model=model.config,
            data=DataConfig(task="pretrain", data_dir=data_dir, n_docs=4, max_val_examples=32, split_seed=seed),
            train=replace(train_cfg, max_steps=pretrain_steps, eval_every=max(pretrain_steps, 1)),
        ),
        "finetune": RunConfig(
            output_dir=str(output_dir / task),
            backbone=backbone_spec,
            model=model.config,
            data=DataConfig(task=task, data_dir=data_dir, n_docs=n_docs, max_val_examples=val_users, split_seed=seed),
            # init_from is recorded (the model is already loaded): a rerun from another compressor in the same folder
            # is then refused instead of resuming this one
            train=replace(train_cfg, max_steps=finetune_steps, eval_every=max(finetune_steps // 3, 1), init_from=init),
        ),
    }
    # The task is read (LaMP-7: and ranked by BM25) once: fine-tuning and the final evaluation use the same split
    target, split_info = load_splits(task, data_dir, n_docs, seed)
    test = target["test"][:test_users]
    collator = Collator(backbone.tokenizer, model.config, model.max_length)
    variants = document_variants(test)
    # Where training starts from: with it, what does the generator make of the documents?
    before = {name: perplexity(model, collator, examples) for name, examples in variants.items()}

    for name, config in stages.items():
        if not config.train.max_steps:
            continue
        typer.secho(f"\n== {name}: {config.train.max_steps} steps of {batch_size} examples", bold=True)
        train_run(config, backbone, (target, split_info) if config.data.task == task else None, model)

    typer.secho(f"\n== evaluation on {test_users} held-out {task} users (never seen in training)", bold=True)
    ppl = {name: perplexity(model, collator, examples) for name, examples in variants.items()}
    for name, value in ppl.items():
        typer.echo(f"  perplexity with {name:26} {value:8.3f}   (before training {before[name]:.3f})")
    verdict = _verdict(ppl)
    for line in verdict:
        typer.secho(line, bold=True)

    shown = test[:show]
    answers = generate(model, collator, shown, max_new_tokens=48)
    plain = generate(model, collator, variants[NONE][:show], max_new_tokens=48)
    typer.secho("\n== personalized answers (greedy)", bold=True)
    samples = []
    for ex, answer, base in zip(shown, answers, plain, strict=True):
        typer.echo(f"request     : {copy_input(ex.instruction)}\ngold (user) : {ex.answer}")
        typer.echo(f"ComMer      : {answer}\nno documents: {base}\n")
        samples.append({"input": ex.instruction, "gold": ex.answer, "commer": answer, "no_documents": base})

    minutes = (time.perf_counter() - start) / 60
    results = {
        "perplexity": ppl,
        "perplexity_before_training": before,
        "verdict": verdict,
        "samples": samples,
        "test_users": len(test),
        "split": split_info.to_dict(with_users=False),
        "init": str(init),
        "config": {name: cfg.to_dict() for name, cfg in stages.items()},
        "backbone": {"name": backbone.name, "fingerprint": backbone.fingerprint},
        "minutes": round(minutes, 1),
        "torch_threads": torch.get_num_threads(),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    typer.echo(
        f"done in {minutes:.1f} min; results in {output_dir / 'results.json'}, model in {output_dir}/{task}/best"
    )
    return results
