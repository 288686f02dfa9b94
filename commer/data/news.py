"""LaMP-4-style headline examples built from the HuffPost News Category records LaMP-4 was made from.

Each record of an author with at least ``min_records`` records becomes a question: the input asks for a headline of its
``short_description``, the gold is its headline, and the profile is the author's records published strictly earlier
(no headline from the future may inform a prediction). Records written the same day are not in each other's profile.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from commer.data.errors import DataError, iter_jsonl, resolve_data_dir
from commer.data.lamp import DEFAULT_N_DOCS, TASK_PREFIXES, lamp_examples
from commer.data.splits import Loaded

NEWS_FILE = Path("news_headlines") / "huffpost_news.jsonl"
DEFAULT_MIN_RECORDS = 10
TASK = "LaMP_4"


@dataclass
class NewsLamp:
    """News questions and gold outputs in the LaMP-4 schema, with the records skipped by reason."""

    questions: list[dict[str, Any]]
    outputs: dict[str, Any]
    records: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def golds(self) -> dict[str, str]:
        """Gold headline by question id."""
        return {g["id"]: g["output"] for g in self.outputs["golds"]}


def read_news(path: Path) -> tuple[list[dict[str, Any]], int, dict[str, int]]:
    """The usable records of a news JSON-lines file (each with its ``line``), the record count, and skips by reason.

    Records with an empty author or empty description cannot make a personalized question and are skipped.
    """
    records, total = [], 0
    skipped = {"empty_author": 0, "empty_description": 0}
    for lineno, record in iter_jsonl(path, "news records file"):
        total += 1
        for key in ("authors", "date", "headline", "short_description"):
            if not isinstance(record.get(key), str):
                raise DataError(f"{path}:{lineno}: record has no text field {key!r}")
        if not record["authors"].strip():
            skipped["empty_author"] += 1
        elif not record["short_description"].strip():
            skipped["empty_description"] += 1
        else:
            records.append({**record, "line": lineno})
    return records, total, skipped


def build_news_lamp(data_dir: str | Path | None = None, min_records: int = DEFAULT_MIN_RECORDS) -> NewsLamp:
    """LaMP-4 questions/outputs from ``<data_dir>/news_headlines/huffpost_news.jsonl``, one question per record.

    Only authors with at least ``min_records`` usable records take part. A record with no earlier record of its author
    has an empty profile and is skipped (counted as ``no_earlier_profile``). Question ids are ``news-<line>``; each
    question carries ``user_id`` = the author so splits keep an author's questions together.
    """
    records, total, skipped = read_news(resolve_data_dir(data_dir) / NEWS_FILE)
    by_author: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        by_author[record["authors"].strip()].append(record)
    skipped["author_below_min_records"] = 0
    skipped["no_earlier_profile"] = 0

    questions, golds = [], []
    for author in sorted(by_author):
        history = sorted(by_author[author], key=lambda r: (r["date"], r["line"]))
        if len(history) < min_records:
            skipped["author_below_min_records"] += len(history)
            continue
        # Profile items are shared between this author's questions: the schema repeats the history per question,
        # but memory need not.
        items = [
            {
                "id": f"news-{r['line']}",
                "text": r["short_description"],
                "title": r["headline"],
                "date": r["date"],
            }
            for r in history
        ]
        earlier = 0
        for record in history:
            while history[earlier]["date"] < record["date"]:
                earlier += 1
            if earlier == 0:
                skipped["no_earlier_profile"] += 1
                continue
            qid = f"news-{record['line']}"
            questions.append(
                {
                    "id": qid,
                    "user_id": author,
                    "input": TASK_PREFIXES[TASK] + record["short_description"],
                    "profile": items[:earlier],
                }
            )
            golds.append({"id": qid, "output": record["headline"]})
    return NewsLamp(questions, {"task": TASK, "golds": golds}, records=total, skipped=skipped)


def write_news_lamp(news: NewsLamp, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``LaMP_4_questions.json`` and ``LaMP_4_outputs.json`` into ``out_dir``, for ``lamp.load_lamp``.

    The files are large (each question lists its author's whole earlier history, ~1.3 M profile items in all).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = out / f"{TASK}_questions.json", out / f"{TASK}_outputs.json"
    for path, content in zip(paths, (news.questions, news.outputs), strict=True):
        path.write_text(json.dumps(content, ensure_ascii=False), encoding="utf-8")
    return paths


def load_news(
    data_dir: str | Path | None = None, n_docs: int = DEFAULT_N_DOCS, min_records: int = DEFAULT_MIN_RECORDS
) -> Loaded:
    """News headline examples (top ``n_docs`` earlier records by BM25), built in memory; skips merged in."""
    news = build_news_lamp(data_dir, min_records)
    loaded = lamp_examples(news.questions, news.golds, TASK, n_docs, source=str(NEWS_FILE))
    loaded.skipped = {**news.skipped, **loaded.skipped}
    return loaded
