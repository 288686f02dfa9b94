"""The results table of a sweep: one row per evaluated cell, appended to ``results.jsonl`` (everything, including the
resolved config and split) and mirrored to ``results.csv`` (the scalar columns, for a spreadsheet)."""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import warnings
from pathlib import Path
from typing import Any

import torch

JSONL = "results.jsonl"
CSV = "results.csv"
RUN_INFO = "run_info.json"

# The CSV's columns, in order: what identifies a cell, then what was measured.
COLUMNS = (
    "key",
    "task",
    "method",
    "k",
    "train_docs",
    "test_docs",
    "seed",
    "split",
    "pretrained",
    "trained_variant",
    "perplexity",
    "rouge1",
    "rougeL",
    "copy_rouge1",
    "copy_rougeL",
    "n_examples",
    "n_rouge",
    "soft_prompt_tokens",
    "generator_prompt_tokens",
    "compressor_tokens",
    "train_steps",
    "eval_seconds",
    "checkpoint",
)


class ResultsTable:
    """Rows of ``directory/results.jsonl``; ``append`` adds one durably and rewrites the CSV."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)

    @property
    def jsonl(self) -> Path:
        return self.directory / JSONL

    def rows(self) -> list[dict[str, Any]]:
        """All complete rows; a line cut short by a kill while writing is skipped with a warning."""
        if not self.jsonl.is_file():
            return []
        rows = []
        for number, line in enumerate(self.jsonl.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                warnings.warn(f"{self.jsonl}:{number} is an incomplete row (interrupted write?); skipped", stacklevel=2)
        return rows

    def finished_keys(self) -> set[str]:
        return {row["key"] for row in self.rows()}

    def append(self, row: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row, allow_nan=True) + "\n")
            f.flush()
            os.fsync(f.fileno())  # a finished cell must survive a kill right after it, or a rerun repeats it
        self.write_csv()

    def write_csv(self) -> Path:
        path = self.directory / CSV
        tmp = path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows():
                writer.writerow({c: _cell(row.get(c)) for c in COLUMNS})
        tmp.replace(path)
        return path


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def read_run_info(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / RUN_INFO
    return json.loads(path.read_text()) if path.is_file() else {}


def write_run_info(directory: str | Path, info: dict[str, Any]) -> None:
    path = Path(directory) / RUN_INFO
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=1) + "\n")
    tmp.replace(path)
