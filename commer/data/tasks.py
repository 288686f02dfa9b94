"""Every task by name: the examples it loads and their user-disjoint splits."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path

from commer.data.lamp import bm25_top, load_lamp7
from commer.data.news import load_news
from commer.data.perltqa import load_perltqa
from commer.data.pretrain import ICAE_CONTINUATION, fineweb_pretrain, mixed_pretrain
from commer.data.recall import recall_examples
from commer.data.splits import DEFAULT_FRACTIONS, MAX_EXAMPLE_CHARS, Loaded, SplitInfo, filter_by_length, split_users
from commer.errors import ConfigError
from commer.text import Example

TASKS = ("lamp7", "news", "perltqa", "pretrain", "pretrain-mix", "pretrain-mix-lm", "recall")
# n = the paper's largest for tweets, the middle of the sweeps elsewhere; for pretraining it is the most documents.
DEFAULT_N_DOCS = {
    "lamp7": 8,
    "news": 4,
    "perltqa": 4,
    "pretrain": 8,
    "pretrain-mix": 4,
    "pretrain-mix-lm": 4,
    "recall": 4,
}
PROFILE_TASKS = ("lamp7", "news")  # whose training users' profile documents join FineWeb in "pretrain-mix(-lm)"
PROFILE_DOCS = 32  # documents per profile read for pretraining (top-32 by BM25: most of a profile)
RECALL_USERS = 5000  # synthetic, so as many as a long run can use


def _one_example_per_user(examples: list[Example]) -> Loaded:
    return Loaded(examples, profile_sizes={e.user_id: len(e.documents) for e in examples})


def _training_profiles(task: str, data_dir: str | Path | None, seed: int) -> list[Example]:
    """The training users' examples of ``task`` under the split of ``load_splits(task, seed=seed)``: their documents
    are what pretraining may read (validation and test users' documents never are)."""
    loaded = LOADERS[task](data_dir, PROFILE_DOCS, seed)
    return split_users((e.user_id for e in loaded.examples), DEFAULT_FRACTIONS, seed).apply(loaded.examples)["train"]


def _pretrain_mix(data_dir: str | Path | None, n: int, seed: int, continuation: float = 0.0) -> Loaded:
    """FineWeb pieces plus the training users' profiles of ``PROFILE_TASKS`` (``mixed_pretrain``)."""
    profiles = {t: _training_profiles(t, data_dir, seed) for t in PROFILE_TASKS}
    return Loaded(mixed_pretrain(data_dir, n, seed, profiles, continuation))


LOADERS: dict[str, Callable[[str | Path | None, int, int], Loaded]] = {
    "lamp7": lambda data_dir, n, seed: load_lamp7(data_dir, n),
    "news": lambda data_dir, n, seed: load_news(data_dir, n),
    "perltqa": load_perltqa,
    "pretrain": lambda data_dir, n, seed: _one_example_per_user(
        list(fineweb_pretrain(data_dir, max_docs=n, seed=seed))
    ),
    "pretrain-mix": _pretrain_mix,
    # the same mix with ICAE's continuation objective on half the FineWeb examples (the ablation of issue 11)
    "pretrain-mix-lm": lambda data_dir, n, seed: _pretrain_mix(data_dir, n, seed, ICAE_CONTINUATION),
    # made in code: there is no data directory to read
    "recall": lambda data_dir, n, seed: _one_example_per_user(recall_examples(RECALL_USERS, n, seed)),
}


def load_task(task: str, data_dir: str | Path | None = None, n_docs: int | None = None, seed: int = 0) -> Loaded:
    """All examples of ``task`` (one of ``TASKS``) with ``n_docs`` documents (task default if None)."""
    if task not in LOADERS:
        raise ConfigError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    return LOADERS[task](data_dir, DEFAULT_N_DOCS[task] if n_docs is None else n_docs, seed)


def keep_retrieved(examples: Iterable[Example], k: int, share: float = 1.0, seed: int = 0) -> list[Example]:
    """Each example with only the ``k`` documents BM25 ranks highest against its request, in their original order:
    the documents a retrieval-merge with BM25 and ``top_k=k`` would mean at answer time (``commer.serving.bm25_profile``
    ranks with the same ``bm25_top``). With ``share`` < 1, a seeded ``share`` of the examples is cut and the others
    keep all their documents (the mean a retrieval-merge's ``min_margin`` falls back to)."""
    rng = random.Random(f"retrieve:{seed}")
    return [
        replace(e, documents=[e.documents[i] for i in sorted(bm25_top(e.instruction, e.documents, k))])
        if rng.random() < share
        else e
        for e in examples
    ]


def load_splits(
    task: str,
    data_dir: str | Path | None = None,
    n_docs: int | None = None,
    seed: int = 0,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    max_chars: int = MAX_EXAMPLE_CHARS,
    retrieve_top_k: int | None = None,
    retrieve_share: float = 1.0,
) -> tuple[dict[str, list[Example]], SplitInfo]:
    """``task``'s examples after the length filter, split by user into train/validation/test; with
    ``retrieve_top_k``, each (or a seeded ``retrieve_share`` of them) keeps only its top-k documents by BM25
    (``keep_retrieved``) before the filter."""
    loaded = load_task(task, data_dir, n_docs, seed)
    examples = (
        loaded.examples
        if retrieve_top_k is None
        else keep_retrieved(loaded.examples, retrieve_top_k, retrieve_share, seed)
    )
    kept, _ = filter_by_length(examples, max_chars)
    split = split_users((e.user_id for e in loaded.examples), fractions, seed)
    return split.apply(kept), split
