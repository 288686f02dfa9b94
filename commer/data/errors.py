"""The error bad data raises, and the file access that raises it with the file and record named."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from commer.errors import CommerError
from commer.fetch import commer_home

DATA_ENV = "COMMER_DATA"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"  # this project's development layout
# Each data set's folder in a data directory, and the task name ``commer data download`` takes for it.
DATA_FOLDERS = {"lamp7": "lamp7", "news_headlines": "news", "fineweb": "fineweb", "perltqa": "perltqa"}


class DataError(CommerError, ValueError):
    """A data file is missing or malformed; the message names the file and, where known, the record."""


def data_home() -> Path:
    """Where ``commer data download`` writes when ``$COMMER_DATA`` is not set: ``data/`` in commer's home."""
    return commer_home() / "data"


def download_target() -> Path:
    """The data directory ``commer data download`` fills: ``$COMMER_DATA``, else the data home."""
    return Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else data_home()


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory, by the one rule every command follows: ``data_dir`` (``--data-dir``) > ``$COMMER_DATA`` >
    the data home (where ``commer data download`` writes), when it exists > ``../shared/data``, when it exists (this
    project's development layout)."""
    for given, where in ((data_dir, "the data directory"), (os.environ.get(DATA_ENV) or None, f"${DATA_ENV}")):
        if given is not None:
            if not Path(given).is_dir():
                raise DataError(f"{where} {given} does not exist: `commer data download TASK` creates it")
            return Path(given)
    for candidate in (data_home(), DEFAULT_DATA_DIR):
        if candidate.is_dir():
            return candidate
    raise DataError(
        f"no data directory: run `commer data download TASK` (it writes to {data_home()}), pass --data-dir, or set "
        f"${DATA_ENV}"
    )


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a DataError saying which ``what`` was expected there and, for a data set that
    ``commer data download`` fetches, the command that fixes it."""
    if not path.is_file():
        task = DATA_FOLDERS.get(path.parent.name)
        fix = f": `commer data download {task}` fetches it" if task else ""
        raise DataError(f"missing {what}: expected the file {path}{fix}")
    return path


def read_json(path: Path, what: str = "JSON file") -> Any:
    """The parsed content of a JSON file; a syntax error is reported with the file, line and column."""
    require_file(path, what)
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON: {e.msg}") from e


def iter_jsonl(path: Path, what: str = "JSON-lines file") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSON-lines file, gzipped if it ends in ``.gz``.

    Streams: FineWeb is too large to hold as parsed objects.
    """
    require_file(path, what)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}:{e.colno}: malformed JSON: {e.msg}") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record
