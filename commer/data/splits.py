"""What every task shares: the loaded-examples record, the length filter, and user-disjoint splits."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commer.data.errors import DataError
from commer.errors import ConfigError
from commer.text import Example

MAX_EXAMPLE_CHARS = 2900
SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_FILE = "split.json"  # what training writes into its output folder, beside the checkpoints best/ and last/


@dataclass
class Loaded:
    """A task's examples, the candidate documents each user has, and the source records skipped, by reason."""

    examples: list[Example]
    profile_sizes: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)


def example_chars(example: Example) -> int:
    """Characters of an example's documents, instruction and answer together."""
    return sum(map(len, example.documents)) + len(example.instruction) + len(example.answer)


def filter_by_length(examples: Iterable[Example], max_chars: int = MAX_EXAMPLE_CHARS) -> tuple[list[Example], int]:
    """The examples of at most ``max_chars`` characters (the paper's 2,900), and how many were dropped."""
    kept, dropped = [], 0
    for example in examples:
        if example_chars(example) > max_chars:
            dropped += 1
        else:
            kept.append(example)
    return kept, dropped


@dataclass
class SplitInfo:
    """Which users are in which split; small enough to store in every results file."""

    seed: int
    fractions: dict[str, float]
    users: dict[str, list[str]]

    def split_of(self, user_id: str) -> str:
        """The split holding ``user_id``; KeyError for a user the split never saw."""
        for name, ids in self.users.items():
            if user_id in ids:
                return name
        raise KeyError(user_id)

    def apply(self, examples: Iterable[Example]) -> dict[str, list[Example]]:
        """The examples of each split, in their original order; examples of unknown users raise KeyError."""
        where = {uid: name for name, ids in self.users.items() for uid in ids}
        out: dict[str, list[Example]] = {name: [] for name in self.users}
        for example in examples:
            out[where[example.user_id]].append(example)
        return out

    def to_dict(self, with_users: bool = True) -> dict[str, Any]:
        """A JSON-ready form; ``with_users=False`` keeps only the counts (for splits of thousands of users)."""
        out: dict[str, Any] = {
            "seed": self.seed,
            "fractions": dict(self.fractions),
            "counts": {name: len(ids) for name, ids in self.users.items()},
        }
        if with_users:
            out["users"] = {name: list(ids) for name, ids in self.users.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SplitInfo:
        """The inverse of ``to_dict()`` (with its users)."""
        return cls(seed=data["seed"], fractions=data["fractions"], users=data["users"])


def recorded_split(checkpoint: str | Path) -> SplitInfo | None:
    """The split the training run of ``checkpoint`` recorded: ``split.json`` in the checkpoint's folder or in the run
    folder above it (``<output_dir>/best``), or None when there is none (the shipped compressor, a copied folder)."""
    for path in (Path(checkpoint) / SPLIT_FILE, Path(checkpoint).parent / SPLIT_FILE):
        if path.is_file():
            try:
                return SplitInfo.from_dict(json.loads(path.read_text()))
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise DataError(f"{path} is damaged ({err}): expected a split's seed, fractions and users") from err
    return None


def _rank_key(seed: int, user_id: str) -> str:
    # A hash rather than random.shuffle: the order of a user depends only on (seed, id), so it is the same
    # whatever the input order, Python version or other users present.
    return hashlib.sha256(f"{seed}\0{user_id}".encode()).hexdigest()


def split_users(
    user_ids: Iterable[str], fractions: tuple[float, float, float] = DEFAULT_FRACTIONS, seed: int = 0
) -> SplitInfo:
    """Split distinct users into train/validation/test by ``fractions``, deterministically from ``seed``.

    Validation and test get ``round(fraction * users)`` users but at least one when their fraction is positive (so
    the 7 PerLTQA personas still give a test persona); train gets the rest.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ConfigError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    ranked = sorted(set(user_ids), key=lambda uid: _rank_key(seed, uid))
    n_val, n_test = (max(1, round(f * len(ranked))) if f > 0 else 0 for f in fractions[1:])
    n_train = len(ranked) - n_val - n_test
    if n_train < (1 if fractions[0] > 0 else 0):
        raise ConfigError(f"{len(ranked)} users are too few to split by {fractions}")
    parts = (ranked[n_test + n_val :], ranked[n_test : n_test + n_val], ranked[:n_test])
    return SplitInfo(
        seed=seed,
        fractions=dict(zip(SPLITS, fractions, strict=True)),
        users={name: sorted(part) for name, part in zip(SPLITS, parts, strict=True)},
    )
