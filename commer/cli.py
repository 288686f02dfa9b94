"""The ``commer`` command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from commer.config import (
    DEFAULT_BRIDGE,
    DEFAULT_K,
    MEMORIES,
    QUICKSTART_CONTRAST_WEIGHT,
    ComMerConfig,
    TrainConfig,
    help_of,
)
from commer.errors import CommerError
from commer.service.cli import BACKBONE, BF16_COMPRESS, CHECKPOINT, K, register

app = typer.Typer(help="ComMer: personalize a frozen LLM with each user's documents.", no_args_is_help=True)

DEMO_USERS = {
    "alice": [
        "Ran my first half marathon this morning, legs are jelly but so happy!",
        "Trail running in the hills again, nothing beats the sunrise up there.",
        "New running shoes arrived, testing them on a 10k tomorrow.",
    ],
    "bob": [
        "Spent the whole weekend baking sourdough, the crust finally came out right.",
        "Tried a new ramen recipe tonight, the broth took six hours and was worth it.",
        "Farmers market haul: tomatoes, basil and fresh mozzarella for pizza night.",
    ],
}
DEMO_INSTRUCTION = "Write a short tweet about my plans for Saturday."
SPLIT_SEED_HELP = (
    "The user split's seed (training's data.split_seed); default: the seed the checkpoint's run recorded in its "
    "split.json, else training's default. Users the checkpoint trained on are refused."
)


@app.command()
def demo(
    backbone: str = BACKBONE,
    checkpoint: str | None = CHECKPOINT,
    num_embeddings: int = K,
    max_new_tokens: int = typer.Option(48, help="Tokens to generate per answer."),
) -> None:
    """Compress a few documents for two users and generate a personalized answer for each."""
    from commer.serving import load_personalizer

    start = time.perf_counter()
    if checkpoint is None:
        typer.echo("no --checkpoint given: the compressor is untrained, so answers show the mechanics, not quality")
    personalizer = load_personalizer(checkpoint, backbone, num_embeddings)
    typer.echo(f"model loaded in {time.perf_counter() - start:.1f}s")
    k, d = personalizer.shape
    profiles = {}
    for user, docs in DEMO_USERS.items():
        t = time.perf_counter()
        profiles[user] = personalizer.profile(docs)
        typer.echo(f"{user}: {len(docs)} documents -> one {k}x{d} soft prompt in {time.perf_counter() - t:.2f}s")
    t = time.perf_counter()
    answers = personalizer.generate(
        [*profiles.values(), None], [DEMO_INSTRUCTION] * (len(profiles) + 1), max_new_tokens=max_new_tokens
    )
    typer.echo(f"generated {len(answers)} answers in one batch in {time.perf_counter() - t:.2f}s")
    typer.echo(f"\ninstruction: {DEMO_INSTRUCTION}")
    for user, answer in zip([*profiles, "(no documents)"], answers, strict=True):
        typer.echo(f"[{user}] {answer}")


@app.command()
def quickstart(
    output_dir: Path = typer.Option(Path("runs/quickstart"), help="Where checkpoints, logs and results go."),
    task: str = typer.Option(
        "lamp7", help="Fine-tune on 'lamp7' (`commer data download lamp7`) or 'recall' (synthetic: needs no data)."
    ),
    data_dir: str | None = typer.Option(None, help="The shared data folder (default ../shared/data)."),
    backbone: str = BACKBONE,
    init: str = typer.Option(
        "pretrained", help="Start from a checkpoint folder, 'pretrained' (the shipped compressor) or 'none'."
    ),
    k: int = typer.Option(DEFAULT_K, help=help_of(ComMerConfig, "num_embeddings") + " --init none only."),
    compression_norm: str = typer.Option("none", help=help_of(ComMerConfig, "compression_norm") + " --init none only."),
    bridge: str = typer.Option(DEFAULT_BRIDGE, help=help_of(ComMerConfig, "bridge") + " --init none only."),
    n_docs: int = typer.Option(2, help="Documents per user (LaMP-7: the top-n by BM25)."),
    pretrain_steps: int = typer.Option(0, help="FineWeb auto-encoding steps before fine-tuning."),
    finetune_steps: int = typer.Option(80),
    batch_size: int = typer.Option(8),
    lr_lora: float = typer.Option(1e-3, help="LoRA learning rate."),
    contrast_weight: float = typer.Option(QUICKSTART_CONTRAST_WEIGHT, help=help_of(TrainConfig, "contrast_weight")),
    test_users: int = typer.Option(64),
    activation_checkpointing: bool = typer.Option(True, help=help_of(TrainConfig, "activation_checkpointing")),
    trim_heap: bool = typer.Option(True, help=help_of(TrainConfig, "trim_heap")),
) -> None:
    """Fine-tune the shipped compressor on LaMP-7 (or the recall probe) and show on held-out users whether
    documents help (12 to 24 min on 2 CPU cores)."""
    from commer.quickstart import quickstart as run_quickstart

    run_quickstart(
        output_dir,
        task,
        data_dir,
        backbone,
        init=None if init == "none" else init,
        num_embeddings=k,
        compression_norm=compression_norm,
        bridge=bridge,
        n_docs=n_docs,
        pretrain_steps=pretrain_steps,
        finetune_steps=finetune_steps,
        batch_size=batch_size,
        lr_lora=lr_lora,
        contrast_weight=contrast_weight,
        test_users=test_users,
        activation_checkpointing=activation_checkpointing,
        trim_heap=trim_heap,
    )


@app.command()
def train(
    config: Path = typer.Argument(..., help="A run config, e.g. configs/lamp7.yaml."),
    overrides: list[str] = typer.Option(
        [], "--set", help="Dotted override, e.g. --set train.max_steps=100 (`commer config-keys` lists every key)."
    ),
    init: str | None = typer.Option(
        None, help="Start from a checkpoint folder or 'pretrained' (the shipped compressor): train.init_from."
    ),
) -> None:
    """Train ComMer or the prompt-tuning baseline as a run config says (resumes from OUTPUT_DIR/last)."""
    from commer.config import load_config
    from commer.train import run

    if init is not None:
        overrides = [*overrides, f"train.init_from={init}"]
    summary = run(load_config(config, overrides))
    typer.echo(json.dumps(summary, indent=2))


@app.command("config-keys")
def config_keys_command() -> None:
    """Every key of a run config (the YAML of `commer train`, or `--set key=value`): its default and what it does."""
    from commer.config import RunConfig, config_keys

    for key, default, text in config_keys(RunConfig):
        typer.echo(f"{key} = {default!r}\n    {text}")


@app.command()
def evaluate(
    checkpoint: str | None = typer.Argument(
        None, help="A checkpoint folder, 'pretrained' (the shipped compressor), or nothing: the frozen backbone alone."
    ),
    task: str = typer.Option("lamp7", help="lamp7, news, perltqa, recall or pretrain-mix (reconstruction)."),
    n_docs: int = typer.Option(2, help="Documents per user."),
    data_dir: str | None = typer.Option(None, help="The shared data folder (default ../shared/data)."),
    users: int = typer.Option(120, help="Held-out users to score (the first of the split)."),
    split: str = typer.Option("test", help="'validation' to choose settings, 'test' to report them once."),
    generate_users: int = typer.Option(0, help="Users whose greedy answers are generated and scored."),
    with_text: bool = typer.Option(False, help="Also score the documents folded into the request as text."),
    seed: int | None = typer.Option(None, help=SPLIT_SEED_HELP),
    users_matching: str = typer.Option("", help="Only users whose id starts with this (e.g. fineweb-page-)."),
    per_user: int = typer.Option(1, min=1, help="Examples per user (news: an author has many)."),
    output: Path | None = typer.Option(None, help="Write the numbers and what was run as JSON here."),
) -> None:
    """Do the documents carry the user? Held-out users with their own documents, another user's, and none."""
    from commer.evaluate import evaluate_heldout

    comparison, record = evaluate_heldout(
        checkpoint,
        task,
        n_docs,
        data_dir,
        users,
        split,
        generate_users,
        with_text,
        seed=seed,
        user_prefix=users_matching,
        per_user=per_user,
    )
    typer.echo(
        f"{task}, {record['examples']} examples of {record['users']} {split} users, {n_docs} documents each, "
        f"checkpoint {checkpoint}"
    )
    typer.echo(comparison.table())
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({**record, **comparison.to_dict()}, indent=2) + "\n")


@app.command("compress-corpus")
def compress_corpus(
    input_path: Path = typer.Argument(..., help="Documents: a .jsonl file, a .parquet file or a folder of them."),
    output: Path = typer.Option(..., help="New folder for profiles/ (and documents/) as Parquet."),
    checkpoint: str | None = CHECKPOINT,
    backbone: str = BACKBONE,
    num_embeddings: int = K,
    bf16_compress: bool = BF16_COMPRESS,
    engine: str = typer.Option("local", help="'local' (this process) or 'ray' (Ray Data on a cluster)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: a new local cluster)."),
    workers: int = typer.Option(2, min=1, help="Model replicas (Ray); each takes one GPU when the cluster has GPUs."),
    cpus_per_worker: float = typer.Option(1.0, help="CPUs reserved per model replica (Ray)."),
    batch_size: int = typer.Option(64, min=1, help="Documents per batch handed to a model."),
    per_document: bool = typer.Option(False, help="Also write every document's compression (exact store import)."),
    user_column: str = typer.Option("user_id", help="Input column holding the user id."),
    text_column: str = typer.Option("text", help="Input column holding the document text."),
    id_column: str | None = typer.Option(None, help="Input column holding a document id (default: SHA-256 of text)."),
) -> None:
    """Compress a corpus of users' documents into per-user profile sums (Parquet), locally or with Ray Data."""
    from commer.scale.corpus import Columns, ModelSpec
    from commer.scale.corpus import compress_corpus as run_corpus

    start = time.perf_counter()
    summary = run_corpus(
        input_path,
        output,
        ModelSpec(checkpoint, backbone, num_embeddings, bf16_compress),
        Columns(user_column, text_column, id_column),
        engine=engine,
        per_document=per_document,
        batch_size=batch_size,
        workers=workers,
        cpus_per_worker=cpus_per_worker,
        address=address,
    )
    seconds = time.perf_counter() - start
    typer.echo(
        f"{summary.documents} documents of {summary.users} users compressed by model {summary.fingerprint} "
        f"({engine}) in {seconds:.1f}s -> {summary.output}"
    )


@app.command()
def info(checkpoint: Path) -> None:
    """Print a checkpoint's config and the backbone it was trained on."""
    from commer.checkpoint import read_meta

    typer.echo(json.dumps(read_meta(checkpoint), indent=2))


@app.command()
def sweep(
    config: Path = typer.Argument(..., help="A sweep config, e.g. configs/sweep-lamp7-small.yaml."),
    overrides: list[str] = typer.Option([], "--set", help="Dotted override, e.g. --set eval.max_examples=16."),
    report: bool = typer.Option(True, help="Write report.md and the figures when the sweep ends."),
) -> None:
    """Train and evaluate a grid of methods, K and documents; rerun to resume (finished cells are skipped)."""
    from commer.experiments import load_sweep, run_sweep

    sweep_config = load_sweep(config, overrides)
    counts = run_sweep(sweep_config, report=report)
    typer.echo(f"{json.dumps(counts)}; results in {sweep_config.results_path}")


@app.command("report")
def report_command(results_dir: Path = typer.Argument(..., help="A folder holding a sweep's results.jsonl.")) -> None:
    """Write RESULTS_DIR/report.md and the paper's figures from a sweep's results table."""
    from commer.experiments import write_report

    if not (results_dir / "results.jsonl").is_file():
        raise CommerError(f"no results table at {results_dir / 'results.jsonl'}: run `commer sweep` first")
    typer.echo(f"wrote {write_report(results_dir)}")


@app.command()
def memories(
    commer_checkpoint: str = typer.Argument(..., help="A ComMer checkpoint trained on the task."),
    prompt_tuning: str | None = typer.Option(None, help="A prompt-tuning checkpoint trained on the task."),
    output_dir: Path = typer.Option(Path("runs/memories"), help="Where memories.json, .md and .png go."),
    task: str = typer.Option("perltqa", help="A task whose users have many documents (perltqa)."),
    n: list[int] = typer.Option(list(MEMORIES), help="Numbers of memories per question."),
    top_k: list[int] = typer.Option([2], help="Retrieval-merge's k (one row per value and relevance signal)."),
    split: str = typer.Option("test", help="'validation' to choose settings (top-k), 'test' to report them once."),
    min_margin: list[float] = typer.Option(
        [0.0],
        help="Retrieval-merge keeps its top k only if they stand out by this margin, else means all (one row "
        "per value; commer.merge.top_k_indices).",
    ),
    data_dir: str | None = typer.Option(None, help="The shared data folder."),
    max_examples: int | None = typer.Option(None, help="Questions per number of memories (default all)."),
    generate_examples: int = typer.Option(40, help="Questions whose greedy answers are generated and scored."),
    summary: bool = typer.Option(True, help="Include the text summary (the slowest: every update is a generation)."),
    text: bool = typer.Option(True, help="Include the documents as text (slow: prompts reach thousands of tokens)."),
    seed: int | None = typer.Option(None, help=SPLIT_SEED_HELP),
) -> None:
    """Figure 5: every way of reading a user's memories (mean, retrieval-merge, prompt tuning, text summary, text)
    against the number of memories, on held-out users."""
    from commer.experiments.memories import run_memories

    run_memories(
        commer_checkpoint, prompt_tuning, output_dir, task, n, top_k, split, min_margin, data_dir, max_examples,
        generate_examples, seed=seed, summary=summary, text=text, progress=typer.echo,
    )  # fmt: skip
    typer.echo(f"wrote {output_dir}/memories.json, memories.md and memories.png")


@app.command("memories-pool")
def memories_pool(
    records: list[Path] = typer.Argument(..., help="memories.json of runs that each held out other users (folds)."),
    output_dir: Path = typer.Option(Path("runs/memories-pool"), help="Where pooled.md and pooled.png go."),
) -> None:
    """Leave one persona out: each fold's perplexities side by side, their geometric mean, and the folds where each
    method beats commer-mean."""
    from commer.experiments.memories import pool_folds

    typer.echo(pool_folds(records, output_dir))
    typer.echo(f"wrote {output_dir}/pooled.md and pooled.png")


# sub-commands of other modules, registered after the app exists
from commer.data.cli import data_app  # noqa: E402

app.add_typer(data_app, name="data", help="Datasets: statistics of what you train on.")
register(app)


def main() -> None:
    """The ``commer`` entry point: bad input ends with one line naming the problem, not a traceback
    (``COMMER_DEBUG=1`` shows the traceback)."""
    import os

    from commer.train import return_freed_memory

    if os.environ.get("COMMER_LOW_MEMORY") == "1":  # less resident memory, slower training steps: docs/benchmarks.md
        return_freed_memory()
    try:
        app()
    except CommerError as err:
        if os.environ.get("COMMER_DEBUG") == "1":
            raise
        typer.secho(f"error: {err}", err=True, fg="red")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
