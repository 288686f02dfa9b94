"""The paper's figures, redrawn from a results table (PNG, matplotlib's Agg backend).

Each function takes the table's rows and an output folder and returns a ``Figure``: the PNG's path, or none and a
note saying which data was missing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from commer.experiments.analysis import (
    BUDGET_TOKENS,
    Row,
    curve,
    fit_power_law,
    grid,
    has,
    ks,
    merge_groups,
    value,
)

STYLE = {"commer-mean": ("ComMer", "-", "o"), "prompt-tuning": ("prompt tuning", "--", "s")}
VARIANT_LABELS = {
    "commer-mean": "mean",
    "commer-concat": "concat",
    "commer-concat-compress": "concat-then-compress",
}


@dataclass
class Figure:
    name: str
    title: str
    path: Path | None = None
    note: str = ""


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and the same output on every machine
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _plain_ticks(*axes) -> None:
    """Log-scale tick labels as plain numbers: 95.5, not 9.55 x 10^1."""
    plain = _pyplot().FuncFormatter(lambda v, _: f"{v:.3g}")
    for axis in axes:
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(plain)
        axis.set_tick_params(which="minor", labelsize=7)


def cost_quality(rows: list[Row], out_dir: Path, task: str = "lamp7", name: str = "figure3") -> Figure:
    """Figures 3 and 5: generator prompt tokens against perplexity and ROUGE-L, one curve per method and K, one point
    per number of test documents (annotated)."""
    figure = Figure(name, f"Cost against quality on {task} (Figure {name[-1]} of the paper)")
    curves = {(m, k): curve(rows, task, m, k) for m in STYLE for k in ks(rows, task, m)}
    curves = {key: points for key, points in curves.items() if points}
    if not curves:
        figure.note = f"skipped: no ComMer-mean or prompt-tuning rows for {task}"
        return figure
    plt = _pyplot()
    with_rouge = any(has(r, "rougeL") for points in curves.values() for r in points)
    fig, axes = plt.subplots(1, 2 if with_rouge else 1, figsize=(11 if with_rouge else 6, 4.2), squeeze=False)
    metrics = [("perplexity", "perplexity of the gold answer")] + ([("rougeL", "ROUGE-L")] if with_rouge else [])
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    all_k = sorted({k for _, k in curves})
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        for (method, k), points in sorted(curves.items()):
            points = [r for r in points if has(r, metric)]
            if not points:
                continue
            text, line, marker = STYLE[method]
            xs = [value(r, "generator_prompt_tokens") for r in points]
            ys = [value(r, metric) for r in points]
            colour = colours[all_k.index(k) % len(colours)]
            ax.plot(xs, ys, line, marker=marker, color=colour, label=f"{text} K={k}")
            for x, y, r in zip(xs, ys, points, strict=True):
                ax.annotate(f"n={r['test_docs']}", (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        copy = [r for r in rows if r.get("task") == task and r.get("method") == "copy-input" and has(r, metric)]
        if metric == "rougeL" and copy:
            ax.axhline(value(copy[-1], "rougeL"), color="grey", lw=1, ls=":", label="copy the input")
        ax.axvline(BUDGET_TOKENS, color="grey", lw=0.8, ls="-.")
        ax.set_xscale("log")
        _plain_ticks(ax.xaxis)
        ax.set_xlabel("generator prompt tokens (soft prompt + text prompt)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(figure.title, fontsize=10)
    figure.path = _save(fig, out_dir / f"{name}_cost_quality_{task}.png")
    return figure


def power_law(rows: list[Row], out_dir: Path, task: str = "lamp7") -> Figure:
    """Figure 4: ComMer-mean perplexity against the number of test documents on log-log axes, with a fitted power
    law per K (exponent and R^2 in the legend)."""
    figure = Figure("figure4", f"Perplexity against documents, log-log, on {task} (Figure 4 of the paper)")
    series = {k: curve(rows, task, "commer-mean", k, min_docs=1) for k in ks(rows, task, "commer-mean")}
    series = {k: points for k, points in series.items() if len({r["test_docs"] for r in points}) >= 2}
    if not series:
        figure.note = f"skipped: needs ComMer-mean perplexities at >= 2 numbers of test documents (>= 1) on {task}"
        return figure
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, points in sorted(series.items()):
        ns = [r["test_docs"] for r in points]
        ys = [value(r, "perplexity") for r in points]
        fit = fit_power_law(ns, ys)
        (dots,) = ax.plot(ns, ys, "o", label=f"K={k}")
        if fit is not None:
            grid_n = [min(ns) * (max(ns) / min(ns)) ** (t / 50) for t in range(51)]
            ax.plot(
                grid_n,
                [fit(n) for n in grid_n],
                "-",
                color=dots.get_color(),
                label=f"K={k} fit: ppl ~ n^{fit.exponent:+.3f}, R²={fit.r2:.2f} ({fit.points} pts)",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    _plain_ticks(ax.xaxis, ax.yaxis)
    ax.set_xlabel("documents at test time (n)")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    ax.set_title(figure.title, fontsize=10)
    figure.path = _save(fig, out_dir / f"figure4_power_law_{task}.png")
    return figure


def generalization(rows: list[Row], out_dir: Path, task: str = "lamp7") -> Figure:
    """Figure 6: train-n x test-n heatmap of ``ppl(train j, test i) - ppl(train j, test j)``, one panel per K."""
    figure = Figure("figure6", f"Documents at training x at test time on {task} (Figure 6 of the paper)")
    panels = grid(rows, task)
    if not panels:
        figure.note = f"skipped: needs a ComMer-mean model tested at >= 2 numbers of documents (>= 1) on {task}"
        return figure
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.5, 4.6 * len(panels)), 4), squeeze=False)
    for ax, ((k, pre), cells) in zip(axes[0], sorted(panels.items()), strict=True):
        trains = sorted({j for j, _ in cells})
        tests = sorted({i for _, i in cells})
        diff = [
            [cells[j, i] - cells[j, j] if (j, i) in cells and (j, j) in cells else math.nan for i in tests]
            for j in trains
        ]
        finite = [abs(d) for row in diff for d in row if not math.isnan(d)]
        span = max(finite, default=0.0) or 1.0
        image = ax.imshow(diff, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
        for a, j in enumerate(trains):
            for b, i in enumerate(tests):
                text = "n/a" if (j, i) not in cells else f"{cells[j, i]:.2f}"
                ax.text(b, a, text, ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(tests)), [str(i) for i in tests])
        ax.set_yticks(range(len(trains)), [str(j) for j in trains])
        ax.set_xlabel("documents at test time (i)")
        ax.set_ylabel("documents at training (j)")
        ax.set_title(f"K={k}{' pretrained' if pre else ''}", fontsize=9)
        fig.colorbar(image, ax=ax, label="ppl(j, i) - ppl(j, j)")
    fig.suptitle(f"Figure 6 on {task}: train with j documents, test with i (cells: perplexity)", fontsize=10)
    figure.path = _save(fig, out_dir / f"figure6_train_test_docs_{task}.png")
    return figure


def merge_strategies(rows: list[Row], out_dir: Path, task: str = "lamp7") -> Figure:
    """Figure 7: perplexity (and ROUGE-L where generated) of the merge variants of one model, per number of test
    documents (>= 2, where the variants differ)."""
    figure = Figure("figure7", f"Merge strategies on {task} (Figure 7 of the paper)")
    groups = merge_groups(rows, task)
    if not groups:
        figure.note = f"skipped: needs ComMer-mean next to another merge variant at >= 2 test documents on {task}"
        return figure
    plt = _pyplot()
    model, variants = max(groups.items(), key=lambda item: sum(map(len, item[1].values())))
    with_rouge = any(has(r, "rougeL") for v in variants.values() for r in v.values())
    metrics = [("perplexity", "perplexity")] + ([("rougeL", "ROUGE-L")] if with_rouge else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    tests = sorted({n for v in variants.values() for n in v if sum(n in w for w in variants.values()) >= 2})
    names = [m for m in VARIANT_LABELS if m in variants]
    width = 0.8 / len(names)
    for ax, (metric, label) in zip(axes[0], metrics, strict=True):
        heights = []
        for a, method in enumerate(names):
            ys = [value(variants[method][n], metric) if n in variants[method] else math.nan for n in tests]
            xs = [b + (a - (len(names) - 1) / 2) * width for b in range(len(tests))]
            bars = ax.bar(xs, ys, width, label=VARIANT_LABELS[method])
            ax.bar_label(bars, fmt="%.3f", fontsize=6)
            heights += [y for y in ys if not math.isnan(y)]
        if metric == "perplexity" and heights:  # the differences are small next to the perplexity itself
            ax.set_ylim(min(heights) * 0.97, max(heights) * 1.02)
        ax.set_xticks(range(len(tests)), [str(n) for n in tests])
        ax.set_xlabel("documents at test time")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    k, train, _, pre, trained = model
    fig.suptitle(f"{figure.title}: K={k}, trained with n={train} ({trained}){' pretrained' if pre else ''}", fontsize=9)
    figure.path = _save(fig, out_dir / f"figure7_merge_{task}.png")
    return figure


def all_figures(rows: list[Row], out_dir: str | Path) -> list[Figure]:
    """Every figure, in the paper's order; missing data gives a note instead of a file."""
    out = Path(out_dir)
    return [
        cost_quality(rows, out, "lamp7", "figure3"),
        power_law(rows, out, "lamp7"),
        cost_quality(rows, out, "perltqa", "figure5"),
        generalization(rows, out, "lamp7"),
        merge_strategies(rows, out, "lamp7"),
    ]
