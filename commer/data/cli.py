"""``commer data ...``: inspect the datasets."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from commer.backbone import load_tokenizer
from commer.config import DEFAULT_BACKBONE
from commer.data.errors import DataError, resolve_data_dir
from commer.data.stats import compute_stats, format_stats
from commer.data.tasks import DEFAULT_N_DOCS, load_task
from commer.errors import CommerError

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
        typer.Option(help="Data directory (default: $COMMER_DATA, else the data home, else ../shared/data)."),
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


@data_app.command()
def download(
    tasks: Annotated[list[str], typer.Argument(help="lamp7, news (lamp4), fineweb, perltqa, or all.")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Where to write (default: $COMMER_DATA, else the data home).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Download again a data set that is already there.")] = False,
    mirror: Annotated[
        str | None,
        typer.Option(help="Fetch every file from this base URL + its name in the data set (a mirror)."),
    ] = None,
) -> None:
    """Download data sets from their public sources into the layout the loaders read (licence printed first)."""
    from commer.data.download import download as fetch_dataset
    from commer.data.download import resolve_tasks, with_base_url

    try:
        for dataset in resolve_tasks(tasks):
            if data_dir is None and not force and (found := _already_there(dataset.folder)) is not None:
                typer.echo(f"{dataset.task}: already in {found} (the data directory by the rule; --force fetches it)")
                continue
            typer.echo(f"{dataset.task}: {dataset.source}\n  licence: {dataset.licence}")
            if mirror is not None:
                dataset = with_base_url(dataset, mirror)
            folder = fetch_dataset(dataset, data_dir, force)
            typer.echo(f"  -> {folder} (SHA-256 of every file in {folder / 'SHA256SUMS'})")
    except CommerError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from e


def _already_there(folder: str) -> Path | None:
    """The data set's folder in the data directory the loaders would read, if it is there."""
    try:
        path = resolve_data_dir() / folder
    except DataError:
        return None
    return path if path.is_dir() else None
