"""LaMP tasks 7 (tweet paraphrasing) and 4 (news headlines) from files in the official LaMP schema.

``*_questions.json`` is a list of ``{"id", "input", "profile": [{"id", "text", ...}]}``; ``*_outputs.json`` is
``{"task", "golds": [{"id", "output"}]}``. A question may carry an extra ``"user_id"`` (the news builder writes one,
since one author asks many questions); otherwise the question id is the user, as in LaMP's user-based split.
An example's documents are the top-n profile items by BM25 against the input, best first.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bm25s
import numpy as np

from commer.data.errors import DataError, read_json, resolve_data_dir
from commer.data.splits import Loaded
from commer.errors import ConfigError
from commer.text import Example

TASK_PREFIXES = {
    "LaMP_7": "Paraphrase the following tweet without any explanation before or after it: ",
    "LaMP_4": "Generate a headline for the following article: ",
}
PROFILE_FIELDS = {"LaMP_7": ("text",), "LaMP_4": ("text", "title")}
DEFAULT_N_DOCS = 4


def normalize_task(task: str) -> str:
    """``"LaMP_7"`` for any of ``LaMP_7``, ``LaMP-7``, ``lamp7``; DataError for a task this module cannot read."""
    digits = "".join(ch for ch in task if ch.isdigit())
    name = f"LaMP_{digits}"
    if name not in TASK_PREFIXES:
        raise DataError(f"unsupported LaMP task {task!r}: supported are {', '.join(TASK_PREFIXES)}")
    return name


def format_document(task: str, item: dict[str, Any]) -> str:
    """A profile item as a document string: the tweet (LaMP-7) or ``Text: <text> Title: <title>`` (LaMP-4)."""
    if task == "LaMP_4":
        return f"Text: {item['text']} Title: {item['title']}"
    return item["text"]


def tokenize(texts: Sequence[str]) -> list[list[str]]:
    """BM25 tokens of each text: lower-cased words of two or more characters, English stopwords removed."""
    return bm25s.tokenize(list(texts), stopwords="en", return_ids=False, show_progress=False)


def rank_tokens(query: list[str], documents: Sequence[list[str]], n: int) -> list[int]:
    """Indices of the ``n`` best documents by BM25 against ``query`` (all pre-tokenized), best first.

    Ties (including a query sharing no word with the profile) keep profile order, so results are deterministic.
    """
    n = min(n, len(documents))
    if n <= 0:
        return []
    return np.argsort(-score_tokens(query, documents), kind="stable")[:n].tolist()


def score_tokens(query: list[str], documents: Sequence[list[str]]) -> np.ndarray:
    """``(n,)`` BM25 scores of the documents against ``query`` (all pre-tokenized): 0 for a document sharing no word
    with it, and for every document when the query or all documents are empty."""
    if not query or not any(documents):
        return np.zeros(len(documents))
    retriever = bm25s.BM25()
    retriever.index(list(documents), show_progress=False)
    return retriever.get_scores(query) if retriever.get_tokens_ids(query) else np.zeros(len(documents))


def bm25_top(query: str, texts: Sequence[str], n: int) -> list[int]:
    """Indices of the ``n`` texts scoring highest by BM25 against ``query``, best first."""
    query_tokens, *doc_tokens = tokenize([query, *texts])
    return rank_tokens(query_tokens, doc_tokens, n)


def find_lamp_files(path: str | Path, split: str | None = None) -> tuple[Path, Path]:
    """The (questions, outputs) files for ``path``: a ``*_questions.json`` file, or a directory holding one.

    In a directory with several question files (a full LaMP download: ``train_questions.json``,
    ``dev_questions.json``...), ``split`` picks ``<split>_questions.json``. The outputs file is the one with the same
    name ending ``_outputs.json``.
    """
    path = Path(path)
    if path.is_dir():
        candidates = sorted(path.glob(f"{split}_questions.json" if split else "*_questions.json"))
        if not candidates:
            pattern = f"{split}_questions.json" if split else "*_questions.json"
            raise DataError(f"missing LaMP questions: no file matching {path / pattern}")
        if len(candidates) > 1:
            names = ", ".join(c.name for c in candidates)
            raise DataError(f"several question files in {path} ({names}): choose one with split=")
        path = candidates[0]
    if not path.name.endswith("_questions.json"):
        raise DataError(f"{path} is not a LaMP questions file (expected a name ending in _questions.json)")
    return path, path.with_name(path.name.removesuffix("_questions.json") + "_outputs.json")


def read_lamp_outputs(path: Path) -> tuple[str, dict[str, str]]:
    """The task name and the gold output of each question id of an ``*_outputs.json`` file."""
    data = read_json(path, "LaMP outputs file")
    if not isinstance(data, dict) or not isinstance(data.get("golds"), list):
        raise DataError(f'{path}: expected an object {{"task", "golds": [...]}}')
    golds: dict[str, str] = {}
    for k, gold in enumerate(data["golds"]):
        if not isinstance(gold, dict) or "id" not in gold or not isinstance(gold.get("output"), str):
            raise DataError(f'{path}: golds[{k}] is not {{"id", "output": <text>}}: {str(gold)[:200]}')
        golds[str(gold["id"])] = gold["output"]
    return str(data.get("task", "")), golds


def read_lamp_questions(path: Path) -> list[dict[str, Any]]:
    """The question records of a ``*_questions.json`` file (checked by ``lamp_examples``)."""
    data = read_json(path, "LaMP questions file")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of questions, got {type(data).__name__}")
    return data


def _check_question(record: Any, k: int, task: str, source: str) -> None:
    where = f"{source}: question [{k}]"
    if not isinstance(record, dict) or "id" not in record:
        raise DataError(f"{where} has no id: {str(record)[:200]}")
    where += f" (id {record['id']})"
    if not isinstance(record.get("input"), str):
        raise DataError(f"{where} has no text input")
    profile = record.get("profile")
    if not isinstance(profile, list):
        raise DataError(f"{where} has no profile list")
    for j, item in enumerate(profile):
        missing = [f for f in PROFILE_FIELDS[task] if not isinstance(item, dict) or not isinstance(item.get(f), str)]
        if missing:
            raise DataError(f"{where}: profile item [{j}] lacks text field(s) {', '.join(missing)}")


def lamp_examples(
    questions: Sequence[dict[str, Any]],
    golds: dict[str, str],
    task: str,
    n_docs: int = DEFAULT_N_DOCS,
    source: str = "<in memory>",
) -> Loaded:
    """Examples from LaMP question records and gold outputs; questions with an empty profile are skipped.

    ``source`` names the questions in error messages. Every question must have a gold output.
    """
    if n_docs < 0:
        raise ConfigError(f"n_docs must be >= 0, got {n_docs}")
    task = normalize_task(task)
    for k, record in enumerate(questions):
        _check_question(record, k, task, source)
    missing = [str(q["id"]) for q in questions if str(q["id"]) not in golds]
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{source}: {len(missing)} question id(s) have no gold output: {shown}")

    prefix = TASK_PREFIXES[task]
    # Profiles overlap heavily (news: each question re-lists its author's history), so each distinct document is
    # tokenized once for the whole set.
    docs_of = [[format_document(task, item) for item in q["profile"]] for q in questions]
    distinct = list(dict.fromkeys(d for docs in docs_of for d in docs))
    tokens_of = dict(zip(distinct, tokenize(distinct), strict=True))
    queries = tokenize([q["input"].removeprefix(prefix) for q in questions])

    loaded = Loaded(examples=[], skipped={"empty_profile": 0})
    for q, docs, query in zip(questions, docs_of, queries, strict=True):
        if not docs:
            loaded.skipped["empty_profile"] += 1
            continue
        user = str(q.get("user_id", q["id"]))
        top = rank_tokens(query, [tokens_of[d] for d in docs], n_docs)
        loaded.examples.append(
            Example(user, [docs[i] for i in top], instruction=q["input"], answer=golds[str(q["id"])])
        )
        loaded.profile_sizes[user] = max(loaded.profile_sizes.get(user, 0), len(docs))
    return loaded


def load_lamp(
    path: str | Path,
    outputs: str | Path | None = None,
    *,
    task: str | None = None,
    n_docs: int = DEFAULT_N_DOCS,
    split: str | None = None,
) -> Loaded:
    """Examples from a LaMP questions file (or a directory holding one, see ``find_lamp_files``) and its outputs.

    ``task`` defaults to the outputs file's ``"task"`` field.
    """
    questions_path, default_outputs = find_lamp_files(path, split)
    outputs_path = Path(outputs) if outputs is not None else default_outputs
    file_task, golds = read_lamp_outputs(outputs_path)
    if task is None and not file_task:
        raise DataError(f"{outputs_path} names no task: pass task= (LaMP_7 or LaMP_4)")
    questions = read_lamp_questions(questions_path)
    return lamp_examples(questions, golds, task or file_task, n_docs, source=str(questions_path))


def load_lamp7(data_dir: str | Path | None = None, n_docs: int = DEFAULT_N_DOCS) -> Loaded:
    """LaMP-7 examples from ``<data_dir>/lamp7`` (the shared LaMP-7 dev records)."""
    return load_lamp(resolve_data_dir(data_dir) / "lamp7", task="LaMP_7", n_docs=n_docs)
