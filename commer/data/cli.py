"""``commer data ...``: inspect the datasets."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from commer.backbone import load_tokenizer
from commer.config import DEFAULT_BACKBONE
from commer.data.errors import DataError
from commer.data.stats import compute_stats, format_stats
from commer.data.tasks import DEFAULT_N_DOCS, load_task

data_app = typer.Typer(help="Inspect the datasets (LaMP-7, news headlines, PerLTQA, FineWeb pretraining).")


class Task(StrEnum):
    """The tasks ``stats`` knows."""

    lamp7 = "lamp7"
    news = "news"
    perltqa = "perltqa"
    pretrain = "pretrain"
    recall = "recall"


# A callback keeps "stats" a named subcommand even while it is the only one.
@data_app.callback()
def _group() -> None:
    """Inspect the datasets."""


@data_app.command()
def stats(
    task: Annotated[Task, typer.Argument(help="Which task's examples to count.")],
    data_dir: Annotated[
        Path | None,
        typer.Option(help="Data directory (default: ../shared/data if it exists, else $COMMER_DATA)."),
    ] = None,
    n_docs: Annotated[
        int | None,
        typer.Option(
            help="Documents per example (pretrain: the most); default lamp7 8, news 4, perltqa 4, pretrain 8."
        ),
    ] = None,
    tokenizer: Annotated[str, typer.Option(help="Backbone whose tokenizer measures token lengths.")] = DEFAULT_BACKBONE,
    seed: Annotated[int, typer.Option(help="Seed of the user split and of random document choices.")] = 0,
) -> None:
    """Print counts of users, examples per split, documents per user and token lengths for TASK."""
    n = DEFAULT_N_DOCS[task.value] if n_docs is None else n_docs
    try:
        loaded = load_task(task.value, data_dir, n, seed)
    except DataError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e
    typer.echo(format_stats(task.value, n, tokenizer, compute_stats(loaded, load_tokenizer(tokenizer), seed)))
