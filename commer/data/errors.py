"""The error bad data raises, and the file access that raises it with the file and record named."""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from commer.errors import CommerError

DATA_ENV = "COMMER_DATA"
DEFAULT_DATA_DIR = Path("..") / "shared" / "data"


class DataError(CommerError, ValueError):
    """A data file is missing or malformed; the message names the file and, where known, the record."""


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """The data directory: ``data_dir`` if given, else ``../shared/data`` if it exists, else ``$COMMER_DATA``."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"data directory {path} does not exist")
        return path
    if DEFAULT_DATA_DIR.is_dir():
        return DEFAULT_DATA_DIR
    if env := os.environ.get(DATA_ENV):
        return resolve_data_dir(env)
    raise DataError(
        f"no data directory: pass one explicitly, or create {DEFAULT_DATA_DIR} (relative to {Path.cwd()}), "
        f"or set ${DATA_ENV}"
    )


def require_file(path: Path, what: str) -> Path:
    """``path`` if it is a file, else a DataError saying which ``what`` was expected there."""
    if not path.is_file():
        raise DataError(f"missing {what}: expected the file {path}")
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
