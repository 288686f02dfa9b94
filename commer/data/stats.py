"""Counts and token lengths of a task's examples, as printed by ``commer data stats``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from commer.data.splits import DEFAULT_FRACTIONS, MAX_EXAMPLE_CHARS, Loaded, filter_by_length, split_users


def _summary(values: Sequence[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values)
    return {
        "count": len(a),
        "min": int(a.min()),
        "mean": round(float(a.mean()), 1),
        "p95": round(float(np.percentile(a, 95)), 1),
        "max": int(a.max()),
    }


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def compute_stats(
    loaded: Loaded,
    tokenizer: Any,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_chars: int = MAX_EXAMPLE_CHARS,
) -> dict[str, Any]:
    """Counts of users, examples (after the length filter) per user-disjoint split, documents and token lengths."""
    kept, dropped = filter_by_length(loaded.examples, max_chars)
    split = split_users((e.user_id for e in loaded.examples), fractions, seed)
    per_split = split.apply(kept)
    return {
        "users": len(loaded.profile_sizes),
        "skipped_records": {k: v for k, v in loaded.skipped.items() if v},
        "examples_loaded": len(loaded.examples),
        f"examples_over_{max_chars}_chars_dropped": dropped,
        "split": split.to_dict(with_users=False),
        "examples_per_split": {name: len(examples) for name, examples in per_split.items()},
        "documents_per_user": _summary(list(loaded.profile_sizes.values())),
        "documents_per_example": _summary([len(e.documents) for e in kept]),
        "tokens": {
            "document": _summary(_token_lengths(tokenizer, [d for e in kept for d in e.documents])),
            "instruction": _summary(_token_lengths(tokenizer, [e.instruction for e in kept])),
            "answer": _summary(_token_lengths(tokenizer, [e.answer for e in kept])),
        },
    }


def format_stats(task: str, n_docs: int, tokenizer_name: str, stats: dict[str, Any]) -> str:
    """The stats as aligned plain-text lines."""

    def line(label: str, value: Any) -> str:
        if isinstance(value, dict):
            value = "  ".join(f"{k}={v}" for k, v in value.items()) or "none"
        return f"{label:<34} {value}"

    split = stats["split"]
    lines = [
        f"task {task}  n_docs={n_docs}  tokenizer={tokenizer_name}",
        line("users", stats["users"]),
        line("skipped source records", stats["skipped_records"]),
        line("examples", stats["examples_loaded"]),
        *(line(k.replace("_", " "), v) for k, v in stats.items() if k.startswith("examples_over")),
        line(f"split (seed {split['seed']}) users", split["counts"]),
        line("examples per split", stats["examples_per_split"]),
        line("documents per user", stats["documents_per_user"]),
        line("documents per example", stats["documents_per_example"]),
        *(line(f"tokens per {kind}", s) for kind, s in stats["tokens"].items()),
    ]
    return "\n".join(lines)
