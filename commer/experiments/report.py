"""``commer report RESULTS_DIR``: a Markdown report of a results table: what was run, on what, the tables, the
figures, and each of the paper's findings as reproduced / not reproduced / not run, with the numbers behind it.
A hand-written ``notes.md`` in the same folder is included as the reading of the numbers."""

from __future__ import annotations

from pathlib import Path

from commer.experiments.analysis import BUDGET_TOKENS, Row, findings, has, value
from commer.experiments.figures import all_figures
from commer.experiments.table import ResultsTable, read_run_info

COST_DEFINITION = (
    "**Cost** is counted in prompt tokens, from the collated tensors the models read. *Soft prompt tokens*: vectors "
    "before the text prompt: K for ComMer-mean (for a user without documents the bridge's K-vector task prompt, or "
    "0 with the paper's bridge 'none', whose soft prompt is masked out), K x n for ComMer-concat, K for prompt tuning "
    "and concat-then-compress. *Generator prompt tokens*: everything the "
    "generator reads before its first new token: the soft prompt plus the text prompt (the instruction in the chat "
    "template; for prompt tuning also every document as text). The paper counts K for ComMer; we count the "
    "instruction too, for both methods alike. ComMer's compressor also reads each document once (shown as "
    "*compressor tokens*); that work is done offline, when a document arrives, not when answering."
)

BASELINES = (
    "**No personalization** is every row with test n = 0: ComMer without documents reads the bridge's trained task "
    "prompt and the instruction (with the paper's bridge 'none', only the instruction); prompt tuning without "
    "documents reads its trained soft prompt and the instruction. *commer-concat* and *commer-concat-compress* are "
    "the mean-trained ComMer model merged differently at test time unless marked *(trained so)*."
)
NOTES = "notes.md"

TABLE_COLUMNS = (
    ("method", "method"),
    ("k", "K"),
    ("pretrained", "pretrained"),
    ("train_docs", "train n"),
    ("test_docs", "test n"),
    ("perplexity", "perplexity"),
    ("rouge1", "ROUGE-1"),
    ("rougeL", "ROUGE-L"),
    ("copy_rougeL", "copy ROUGE-L"),
    ("n_examples", "users"),
    ("n_rouge", "generated"),
    ("soft_prompt_tokens", "soft tokens"),
    ("generator_prompt_tokens", "generator tokens"),
    ("compressor_tokens", "compressor tokens"),
)


def _format(row: Row, key: str) -> str:
    v = row.get(key)
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if not has(row, key):
            return ""
        return f"{v:.1f}" if key.endswith("_tokens") else f"{v:.3f}"
    return "" if v is None else str(v)


def results_table(rows: list[Row]) -> list[str]:
    """The results as a Markdown table, one line per row, sorted by task, method, K and documents."""
    order = sorted(
        (r for r in rows if r.get("method") != "copy-input"),
        key=lambda r: (
            r["task"],
            r["method"],
            r["k"],
            bool(r.get("pretrained")),
            r.get("trained_variant", ""),
            r["train_docs"],
            r["test_docs"],
        ),
    )
    lines = ["| task | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"]
    lines.append("|" + " --- |" * (len(TABLE_COLUMNS) + 1))
    for r in order:
        method = r["method"] if r.get("trained_variant", "mean") == "mean" else f"{r['method']} (trained so)"
        cells = [method if key == "method" else _format(r, key) for key, _ in TABLE_COLUMNS]
        lines.append(f"| {r['task']} | " + " | ".join(cells) + " |")
    return lines


def _run_section(rows: list[Row], info: dict) -> list[str]:
    lines = ["## What was run", ""]
    invocations = info.get("invocations", [])
    if invocations:
        total = sum(i.get("wall_s", 0) for i in invocations)
        m = invocations[-1].get("machine", {})
        gpu = m.get("gpu") or "no GPU"
        lines += [
            f"Machine: {m.get('cpu_count')} CPU cores, {gpu}, torch {m.get('torch')} ({m.get('torch_threads')} "
            f"threads), Python {m.get('python')}, {m.get('platform')}.",
            f"Wall time: {total / 60:.1f} min over {len(invocations)} invocation(s) of the sweep:",
            "",
        ]
        for i in invocations:
            lines.append(
                f"- `{i.get('command')}` started {i.get('started')}: {i.get('wall_s', 0) / 60:.1f} min, "
                f"{i.get('trained', 0)} model(s) trained, {i.get('evaluated', 0)} cell(s) evaluated, "
                f"{i.get('skipped', 0)} already done"
                + ("" if i.get("finished", True) else " (interrupted)")
                + (f": {i['note']}" if i.get("note") else "")
            )
        lines.append("")
    models = sorted({(r["method"], r["k"], r["train_docs"], bool(r.get("pretrained"))) for r in rows if "k" in r})
    steps = sorted({r.get("train_steps") for r in rows if r.get("train_steps") is not None})
    examples = sorted({r.get("n_examples") for r in rows if r.get("n_examples")})
    generated = sorted({r.get("n_rouge") for r in rows if r.get("n_rouge")})
    lines += [
        f"{len(rows)} rows: {len(models)} (method, K, train n, pretrained) combinations; training steps per model "
        f"{steps or 'n/a'}; perplexity and cost on {examples or 'n/a'} held-out users per cell, ROUGE on the first "
        f"{generated or 'n/a'} of them (greedy decoding). Resolved configs and splits are in `results.jsonl`; the "
        "resolved sweep config is `sweep-<task>.yaml`.",
        "",
    ]
    return lines


def render(rows: list[Row], results_dir: Path, info: dict | None = None) -> str:
    """The report's Markdown (figures are written to ``results_dir`` as a side effect)."""
    lines = ["# ComMer: reproduction report", ""]
    lines += _run_section(rows, info or {})
    notes = results_dir / NOTES
    if notes.is_file():  # a person's reading of the numbers, kept when the report is regenerated
        lines += [f"## Reading (from `{NOTES}`)", "", notes.read_text().strip(), ""]
    lines += ["## Findings of the paper", ""]
    for f in findings(rows):
        lines.append(f"- **{f.name}: {f.status}.** {f.claim}")
        lines += [f"  - {e}" for e in f.evidence]
    lines += ["", "## Results", "", COST_DEFINITION, "", BASELINES, ""]
    copies = [r for r in rows if r.get("method") == "copy-input"]
    for r in copies:
        lines.append(
            f"Copy-the-input baseline on {r['task']} ({r.get('n_rouge')} users, returning the text after the "
            f"instruction's colon, no generator): ROUGE-1 {value(r, 'rouge1'):.3f}, ROUGE-L {value(r, 'rougeL'):.3f}. "
            "Each row's *copy ROUGE-L* is the same baseline on exactly the users that row generated for."
        )
    lines += ["", *results_table(rows), "", "## Figures", ""]
    for figure in all_figures(rows, results_dir):
        if figure.path is not None:
            lines += [f"### {figure.title}", "", f"![{figure.name}]({figure.path.name})", ""]
        else:
            lines += [f"### {figure.title}", "", figure.note, ""]
    lines.append(f"Figure 3 and 5 mark the {BUDGET_TOKENS}-token budget with a vertical line.")
    return "\n".join(lines) + "\n"


def write_report(results_dir: str | Path) -> Path:
    """Write ``report.md`` and the figures next to ``results_dir/results.jsonl``; returns the report's path."""
    results_dir = Path(results_dir)
    rows = ResultsTable(results_dir).rows()
    path = results_dir / "report.md"
    results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(render(rows, results_dir, read_run_info(results_dir)))
    return path
