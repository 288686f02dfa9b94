"""Figure 5 and beyond: quality against the number of a user's memories, every way of reading them side by side.

For each number of memories n, the same held-out questions (PerLTQA: each question's memories always include the
ones it refers to) are answered by:

- ``no documents``: the frozen backbone, the question alone;
- ``documents as text``: the frozen backbone with the n memories before the question;
- ``text summary``: the frozen backbone with a summary it wrote of the n memories, one at a time (``commer.summary``);
- ``prompt tuning``: its trained soft prompt, the n memories as text;
- ``commer-mean``: ComMer, the mean of the n compressions (the paper's Figure 5);
- ``commer-dense-top{k}`` / ``commer-bm25-top{k}``: retrieval-merge, the mean of the k compressions most relevant to
  the question, by the cosine of compressions (no text stored) or by BM25 over the memories' texts; with a
  ``-margin{m}`` suffix, the mean of all where the top k do not stand out by ``m`` (``commer.merge.top_k_indices``).

Each gets the perplexity of the gold answer, ROUGE-1/L of its greedy answer, and the generator's prompt tokens (soft
prompt + text prompt). On PerLTQA, where each question names the memories it refers to, each relevance signal also gets
its reference recall: how many of those memories its top k holds. ``commer memories`` runs it and writes a JSON table,
a Markdown table and a PNG; ``commer memories-pool`` puts the records of several runs, each holding out other users
(leave one persona out), side by side.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from commer.backbone import load_backbone
from commer.checkpoint import load_checkpoint
from commer.config import MEMORIES, ComMerConfig
from commer.data.splits import SPLITS
from commer.data.tasks import load_splits
from commer.errors import ConfigError
from commer.evaluate import check_heldout, evaluate_examples, heldout_seed
from commer.experiments.figures import _pyplot, _save
from commer.merge import dense_scores, top_k_indices
from commer.model import ComMer, SoftPromptLM
from commer.serving import Personalizer, bm25_scores
from commer.summary import summarize, with_summary
from commer.text import Collator, Example, documents_as_text

NO_DOCS, TEXT, SUMMARY, PROMPT_TUNING, MEAN = (
    "no documents",
    "documents as text",
    "text summary",
    "prompt tuning",
    "commer-mean",
)


@dataclass
class Point:
    """One method at one number of memories."""

    method: str
    memories: int
    perplexity: float
    rouge1: float
    rougeL: float
    prompt_tokens: float
    n_examples: int
    n_generated: int


@dataclass
class Recall:
    """How well one relevance signal finds the memories a question refers to, at one k and number of memories."""

    signal: str
    k: int
    memories: int
    reference_recall: float  # mean over questions of |kept & referenced| / min(|kept|, |referenced|)
    min_margin: float = 0.0
    mean_share: float = 0.0  # the share of questions whose top k did not stand out by min_margin: all were kept


def reference_recall(
    example: Example, k: int, scores: torch.Tensor, referenced: set[str], min_margin: float = 0.0
) -> float:
    """The share of ``example``'s ``referenced`` memories that retrieval-merge keeps (its top ``k`` by ``scores``, or
    all of them below ``min_margin``), out of the most it could hold: 1.0 when it keeps what the question needs."""
    kept = set(top_k_documents(example, k, scores, min_margin).documents)
    return len(kept & referenced) / min(len(kept), len(referenced))


def referenced_memories(split: str, data_dir: str | None = None, seed: int = 0) -> list[set[str]]:
    """Each PerLTQA ``split`` question's referenced memories, in question order: with one memory per question the
    loader keeps exactly those (``commer.data.perltqa``). Retrieval's ground truth."""
    return [set(e.documents) for e in load_splits("perltqa", data_dir, 1, seed, max_chars=10**9)[0][split]]


def top_k_documents(example: Example, k: int, scores: torch.Tensor, min_margin: float = 0.0) -> Example:
    """``example`` with only its ``k`` best-scored documents (``commer.merge.top_k_indices``, with its ``min_margin``):
    the mean of their compressions is exactly the retrieval-merge profile of ``commer.merge.top_k_profile``."""
    keep = top_k_indices(scores, k, min_margin).tolist()
    return Example(example.user_id, [example.documents[i] for i in keep], example.instruction, example.answer)


def dense_relevance(personalizer: Personalizer, examples: Sequence[Example]) -> list[torch.Tensor]:
    """Each example's ``(n_docs,)`` dense relevance (retrieval-merge's): its request compressed as a document, cosine
    against each document's compression. Each distinct text is compressed once, all in one call (batched by length)."""
    texts = list(dict.fromkeys(text for e in examples for text in (e.instruction, *e.documents)))
    compressions = dict(zip(texts, personalizer.compress(texts), strict=True))
    return [
        dense_scores(compressions[e.instruction], torch.stack([compressions[d] for d in e.documents])) for e in examples
    ]


def score(
    method: str,
    model: SoftPromptLM,
    collator: Collator,
    examples: Sequence[Example],
    memories: int,
    generate_examples: int,
    max_new_tokens: int,
) -> Point:
    """Perplexity, ROUGE of greedy answers on the first ``generate_examples``, and prompt tokens of one method."""
    result = evaluate_examples(model, collator, examples, generate_examples, max_new_tokens=max_new_tokens)
    return Point(
        method=method,
        memories=memories,
        perplexity=result.perplexity,
        rouge1=result.rouge1,
        rougeL=result.rougeL,
        prompt_tokens=result.cost.generator,
        n_examples=result.n_examples,
        n_generated=result.n_rouge,
    )


def run_memories(
    commer_checkpoint: str,
    prompt_tuning_checkpoint: str | None,
    output_dir: str | Path,
    task: str = "perltqa",
    memories: Sequence[int] = MEMORIES,
    top_k: Sequence[int] = (2,),
    split: str = "test",
    min_margins: Sequence[float] = (0.0,),
    data_dir: str | None = None,
    max_examples: int | None = None,
    generate_examples: int = 40,
    max_new_tokens: int = 32,
    seed: int | None = None,
    summary: bool = True,
    text: bool = True,
    progress: Callable[[str], None] = print,
) -> list[Point]:
    """Every method at every number of memories on ``split``'s questions of ``task``; writes ``memories.json``,
    ``memories.md`` and ``memories.png`` to ``output_dir`` and returns the points. ``summary=False`` leaves out the
    text summary (each of its updates is a generation: the slowest method to evaluate), ``text=False`` the documents
    as text (their prompts reach thousands of tokens): what choosing ComMer's settings on validation does without.
    Users are split with ``seed`` (default: the seed the ComMer checkpoint's run recorded); a checkpoint whose run
    trained on users of ``split`` is refused."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if any(k < 1 for k in top_k) or any(n < 1 for n in memories):
        raise ConfigError(f"memories and top_k must be >= 1, got {list(memories)} and {list(top_k)}")
    if any(not 0 <= m <= 1 for m in min_margins):
        raise ConfigError(f"min_margin must be in [0, 1], got {list(min_margins)}")
    seed = heldout_seed(commer_checkpoint, seed)
    info = load_splits(task, data_dir, 1, seed, max_chars=10**9)[1]
    for checkpoint in (commer_checkpoint, prompt_tuning_checkpoint):
        check_heldout(checkpoint, info, split)
    commer = load_checkpoint(commer_checkpoint)
    if not isinstance(commer, ComMer):
        raise ConfigError(f"{commer_checkpoint} is not a ComMer checkpoint")
    backbone_name = commer.backbone_name
    # The frozen backbone reads no soft prompt: the paper's bridge with no documents adds nothing.
    frozen_backbone = load_backbone(backbone_name)
    frozen = ComMer(frozen_backbone, ComMerConfig(bridge="none"))
    # Every ComMer method reads subsets of the same memories: each is compressed once for the whole run.
    models: dict[str, SoftPromptLM] = {"frozen": frozen, "commer": commer.with_compression_cache()}
    if prompt_tuning_checkpoint is not None:
        models["prompt tuning"] = load_checkpoint(prompt_tuning_checkpoint)
    collators = {name: Collator(frozen_backbone.tokenizer, m.config, m.max_length) for name, m in models.items()}
    personalizer = Personalizer(commer, frozen_backbone.tokenizer)

    referenced = referenced_memories(split, data_dir, seed)[:max_examples] if task == "perltqa" else None
    points: list[Point] = []
    recalls: list[Recall] = []
    # Identical inputs score identically (greedy answers): "no documents" is the same at every n, and a retrieval-merge
    # with k >= n keeps every memory in order, i.e. it is the mean. Each is evaluated once.
    scored: dict[tuple, Point] = {}
    for n in memories:
        # No length filter: the same questions at every n (the longest prompts are the documents-as-text ones).
        examples = load_splits(task, data_dir, n, seed, max_chars=10**9)[0][split][:max_examples]
        if not examples:
            raise ConfigError(f"no {split} examples of {task}")
        progress(f"{n} memories: {len(examples)} {split} questions")
        methods: list[tuple[str, str, list[Example]]] = [
            (NO_DOCS, "frozen", [Example(e.user_id, [], e.instruction, e.answer) for e in examples])
        ]
        if text:
            prompts = [documents_as_text(e.documents, e.instruction) for e in examples]
            as_text = [Example(e.user_id, [], p, e.answer) for e, p in zip(examples, prompts, strict=True)]
            methods.append((TEXT, "frozen", as_text))
        methods.append((MEAN, "commer", list(examples)))
        if summary:
            summaries = summarize(frozen, collators["frozen"], [e.documents for e in examples])
            methods.append((SUMMARY, "frozen", [with_summary(e, s) for e, s in zip(examples, summaries, strict=True)]))
        if "prompt tuning" in models:
            methods.append((PROMPT_TUNING, "prompt tuning", list(examples)))
        relevance = {
            "dense": dense_relevance(personalizer, examples),
            "bm25": [bm25_scores(e.instruction, e.documents) for e in examples],
        }
        for k, margin, (signal, scores) in itertools.product(top_k, min_margins, relevance.items()):
            selected = [top_k_documents(e, k, s, margin) for e, s in zip(examples, scores, strict=True)]
            methods.append((f"commer-{signal}-top{k}" + (f"-margin{margin:g}" if margin else ""), "commer", selected))
            if referenced is not None:
                rows = zip(examples, scores, referenced, strict=True)
                hits = [reference_recall(e, k, s, refs, margin) for e, s, refs in rows]
                kept_all = [len(c.documents) == len(e.documents) > k for c, e in zip(selected, examples, strict=True)]
                mean_share = sum(kept_all) / len(kept_all)
                recalls.append(Recall(signal, k, n, sum(hits) / len(hits), margin, mean_share))
                progress(
                    f"  {signal} top-{k} margin {margin:g} keeps {recalls[-1].reference_recall:.1%} of the referenced "
                    f"memories ({mean_share:.0%} of questions fall back to the mean)"
                )
        for method, name, variant in methods:
            key = (name, tuple((tuple(e.documents), e.instruction, e.answer) for e in variant))
            start = time.perf_counter()
            if key not in scored:
                model, collator = models[name], collators[name]
                scored[key] = score(method, model, collator, variant, n, generate_examples, max_new_tokens)
            point = replace(scored[key], method=method, memories=n)
            seconds = time.perf_counter() - start
            progress(f"  {method:24} perplexity {point.perplexity:8.3f}  ROUGE-L {point.rougeL:.4f}  ({seconds:.0f} s)")
            points.append(point)

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "commer": commer_checkpoint,
        "prompt_tuning": prompt_tuning_checkpoint,
        "task": task,
        "split": split,
        "seed": seed,
        "users": info.users[split],
        "summary_of_the_first_question": summaries[0] if summary else None,
        "points": [asdict(p) for p in points],
        "reference_recall": [asdict(r) for r in recalls],
    }
    (out / "memories.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "memories.md").write_text(table(points) + "\n" + (f"\n{recall_table(recalls)}\n" if recalls else ""))
    plot(points, out / "memories.png", f"{task} {split}: quality against memories per user")
    return points


def table(points: Sequence[Point]) -> str:
    """A Markdown table: one row per method, perplexity / ROUGE-L / prompt tokens per number of memories."""
    ns = sorted({p.memories for p in points})
    methods = list(dict.fromkeys(p.method for p in points))
    at = {(p.method, p.memories): p for p in points}
    header = "| method | " + " | ".join(f"n={n}: ppl / ROUGE-L / tokens" for n in ns) + " |"
    lines = [header, "| --- |" + " --- |" * len(ns)]
    for m in methods:
        cells = [
            f"{at[m, n].perplexity:.2f} / {at[m, n].rougeL:.3f} / {at[m, n].prompt_tokens:.0f}" if (m, n) in at else ""
            for n in ns
        ]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(recalls: Sequence[Recall]) -> str:
    """A Markdown table: the reference recall of each signal's top k per number of memories."""
    ns = sorted({r.memories for r in recalls})
    at = {(r.signal, r.k, r.min_margin, r.memories): r.reference_recall for r in recalls}
    lines = ["| relevance signal | " + " | ".join(f"n={n}" for n in ns) + " |", "| --- |" + " --- |" * len(ns)]
    for signal, k, m in dict.fromkeys((r.signal, r.k, r.min_margin) for r in recalls):
        name = f"{signal} top-{k}" + (f" margin {m:g}" if m else "")
        lines.append(f"| {name} | " + " | ".join(f"{at[signal, k, m, n]:.2f}" for n in ns) + " |")
    return "\n".join(lines)


def plot(points: Sequence[Point], path: Path, title: str) -> Path:
    """Perplexity and ROUGE-L against memories (log 2 axis), one line per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for method in dict.fromkeys(p.method for p in points):
        series = sorted((p for p in points if p.method == method), key=lambda p: p.memories)
        style = "-o" if method.startswith("commer") else "--s"
        for ax, key in zip(axes, ("perplexity", "rougeL"), strict=True):
            ax.plot([p.memories for p in series], [getattr(p, key) for p in series], style, label=method)
    for ax, label in zip(axes, ("perplexity of the gold answer", "ROUGE-L of the greedy answer"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memories per question (n)")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def pool_folds(records: Sequence[str | Path], output_dir: str | Path, baseline: str = MEAN) -> str:
    """Leave one persona out: ``memories.json`` records of runs that each held out other users, side by side.

    Per method and number of memories: each fold's perplexity, their geometric mean (every fold weighs the same,
    whatever its number of questions) and the folds where the method is below ``baseline``'s perplexity. Writes
    ``pooled.md`` and ``pooled.png`` (each method's perplexity over the baseline's, per fold) to ``output_dir`` and
    returns the Markdown."""
    if len(records) < 2:
        raise ConfigError(f"pooling needs the records of at least two folds, got {len(records)}")
    folds: dict[str, dict[tuple[str, int], float]] = {}
    for path in records:
        record = json.loads(Path(path).read_text())
        name = ", ".join(record.get("users") or [Path(path).parent.name])  # older records name no users
        if name in folds:
            raise ConfigError(f"{path}: a second record of the fold {name!r}")
        folds[name] = {(p["method"], p["memories"]): p["perplexity"] for p in record["points"]}
    keys = [key for key in next(iter(folds.values())) if all(key in fold for fold in folds.values())]
    if not any(method == baseline for method, _ in keys):
        raise ConfigError(f"{baseline!r} is not in every record: nothing to compare with")
    ns = sorted({n for _, n in keys})
    lines = [
        "| method | n | " + " | ".join(folds) + " | geometric mean | folds below " + baseline + " |",
        "| --- | --- |" + " --- |" * (len(folds) + 2),
    ]
    ratios: dict[tuple[str, int], list[float]] = {}
    for method, n in sorted(keys, key=lambda key: key[1]):  # by n; stable: each n's methods in record order
        values = [fold[method, n] for fold in folds.values()]
        ratios[method, n] = [v / fold[baseline, n] for v, fold in zip(values, folds.values(), strict=True)]
        below = sum(r < 1 for r in ratios[method, n])
        geometric = math.exp(sum(map(math.log, values)) / len(values))
        cells = " | ".join(f"{v:.2f}" for v in values)
        lines.append(f"| {method} | {n} | {cells} | {geometric:.3f} | {'' if method == baseline else below} |")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = "\n".join(lines)
    (out / "pooled.md").write_text(markdown + "\n")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ns), figsize=(5.5 * len(ns), 4.2), squeeze=False)
    methods = [m for m in dict.fromkeys(m for m, _ in keys) if m not in (baseline, NO_DOCS)]
    width = 0.8 / max(1, len(methods))
    for ax, n in zip(axes[0], ns, strict=True):
        for i, method in enumerate(methods):
            if (method, n) in ratios:
                xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(folds))]
                ax.bar(xs, ratios[method, n], width, label=method)
        shown = [r for m in methods for r in ratios.get((m, n), [])] or [1.0]
        ax.set_ylim(min(0.9, min(shown) - 0.02), max(1.1, max(shown) + 0.02))  # from 0, bars would hide the gaps
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(folds)), list(folds), rotation=20, fontsize=8)
        ax.set_ylabel(f"perplexity / {baseline}'s (below 1: better)")
        ax.set_title(f"{n} memories per question", fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("held-out persona of each fold", fontsize=10)
    _save(fig, out / "pooled.png")
    return markdown
