"""Reading the results table: which rows make a curve, the power-law fit, and the paper's findings checked against
the numbers. Pure data, no plotting (``figures`` draws what this selects)."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

Row = dict[str, Any]

# Figure 3's headline: under about this many prompt tokens ComMer beats prompt tuning on tweets.
BUDGET_TOKENS = 128
# A straight line on log-log axes: the power-law finding counts as reproduced at or above this R^2.
MIN_R2 = 0.9

REPRODUCED, NOT_REPRODUCED, NOT_RUN = "reproduced", "not reproduced", "not run"


def value(row: Row, key: str) -> float:
    """A numeric column as a float; NaN when absent or empty."""
    v = row.get(key)
    return math.nan if v is None or v == "" else float(v)


def has(row: Row, key: str) -> bool:
    return not math.isnan(value(row, key))


def rows_of(rows: Iterable[Row], task: str, method: str, trained_variant: str | None = "mean") -> list[Row]:
    """Rows of one task and method with a perplexity (``trained_variant=None``: whatever the model was trained with)."""
    return [
        r
        for r in rows
        if r.get("task") == task
        and r.get("method") == method
        and (trained_variant is None or r.get("trained_variant", "mean") == trained_variant)
        and has(r, "perplexity")
    ]


def _preference(row: Row) -> tuple:
    # For a point at n test documents prefer the model trained with n, then the closest n (more if tied).
    gap = row["train_docs"] - row["test_docs"]
    return (gap != 0, abs(gap), gap < 0)


def curve(rows: Iterable[Row], task: str, method: str, k: int, min_docs: int = 0) -> list[Row]:
    """One row per number of test documents (>= ``min_docs``) for ``method`` at ``k``, sorted by it. A curve never
    mixes pretrained and not pretrained models: it takes those covering more points (pretrained if tied, as the
    paper pretrains before every run)."""
    candidates = [r for r in rows_of(rows, task, method) if r["k"] == k and r["test_docs"] >= min_docs]
    coverage = {pre: len({r["test_docs"] for r in candidates if bool(r.get("pretrained")) == pre}) for pre in (0, 1)}
    pretrained = coverage[1] >= coverage[0]
    best: dict[int, Row] = {}
    for r in candidates:
        n = r["test_docs"]
        if bool(r.get("pretrained")) != pretrained:
            continue
        # ties go to the latest evaluation: the table is in the order cells finished
        if n not in best or _preference(r) <= _preference(best[n]):
            best[n] = r
    return [best[n] for n in sorted(best)]


def ks(rows: Iterable[Row], task: str, method: str) -> list[int]:
    return sorted({r["k"] for r in rows_of(rows, task, method)})


@dataclass
class PowerLaw:
    """``perplexity = prefactor * n ** exponent`` fitted by least squares on log-log axes."""

    exponent: float
    prefactor: float
    r2: float
    points: int

    def __call__(self, n: float) -> float:
        return self.prefactor * n**self.exponent


def fit_power_law(ns: list[float], ys: list[float]) -> PowerLaw | None:
    """The fit, or None with fewer than two distinct positive ``ns``. With two points R^2 is 1 by construction."""
    pairs = [(math.log(n), math.log(y)) for n, y in zip(ns, ys, strict=True) if n > 0 and y > 0]
    if len({x for x, _ in pairs}) < 2:
        return None
    mx = sum(x for x, _ in pairs) / len(pairs)
    my = sum(y for _, y in pairs) / len(pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for _, y in pairs)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in pairs)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    return PowerLaw(slope, math.exp(intercept), r2, len(pairs))


def grid(rows: Iterable[Row], task: str = "lamp7") -> dict[tuple[int, bool], dict[tuple[int, int], float]]:
    """ComMer-mean perplexity by (train n, test n >= 1), for each (K, pretrained) with at least two test values."""
    out: dict[tuple[int, bool], dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows_of(rows, task, "commer-mean"):
        if r["test_docs"] >= 1:
            out[r["k"], bool(r.get("pretrained"))][r["train_docs"], r["test_docs"]] = value(r, "perplexity")
    return {key: cells for key, cells in out.items() if len({i for _, i in cells}) >= 2}


def merge_groups(rows: Iterable[Row], task: str = "lamp7") -> dict[tuple, dict[str, dict[int, Row]]]:
    """Per model (K, train n, seed, pretrained): each merge variant's row by number of test documents (>= 2, where
    the variants differ), for models evaluated with at least two variants."""
    out: dict[tuple, dict[str, dict[int, Row]]] = defaultdict(lambda: defaultdict(dict))
    for method in ("commer-mean", "commer-concat", "commer-concat-compress"):
        for r in rows_of(rows, task, method, trained_variant=None):
            if r["test_docs"] >= 2:
                model = (r["k"], r["train_docs"], r["seed"], bool(r.get("pretrained")), r.get("trained_variant"))
                out[model][method][r["test_docs"]] = r
    return {model: dict(v) for model, v in out.items() if len(v) >= 2}


# -- the paper's findings ------------------------------------------------------------------------------------------
@dataclass
class Finding:
    name: str
    claim: str
    status: str = NOT_RUN
    evidence: list[str] = field(default_factory=list)


def _fmt(r: Row) -> str:
    pre = ", pretrained" if r.get("pretrained") else ""
    rl = f", ROUGE-L {value(r, 'rougeL'):.3f}" if has(r, "rougeL") else ""
    return (
        f"{r['method']} K={r['k']} (train n={r['train_docs']}{pre}) at n={r['test_docs']}: perplexity "
        f"{value(r, 'perplexity'):.3f}{rl}, {value(r, 'generator_prompt_tokens'):.0f} generator prompt tokens"
    )


def finding_budget(rows: list[Row], task: str = "lamp7") -> Finding:
    f = Finding(
        "Figure 3",
        f"Under a budget of about {BUDGET_TOKENS} prompt tokens ComMer beats prompt tuning on tweet paraphrasing.",
    )
    under = {
        m: [r for k in ks(rows, task, m) for r in curve(rows, task, m, k)] for m in ("commer-mean", "prompt-tuning")
    }
    under = {m: [r for r in rs if value(r, "generator_prompt_tokens") <= BUDGET_TOKENS] for m, rs in under.items()}
    if not all(under.values()):
        f.evidence.append(
            f"needs ComMer and prompt-tuning points on {task} with at most {BUDGET_TOKENS} generator prompt tokens; "
            f"have {len(under['commer-mean'])} and {len(under['prompt-tuning'])}"
        )
        return f
    best = {m: min(rs, key=lambda r: value(r, "perplexity")) for m, rs in under.items()}
    wins = value(best["commer-mean"], "perplexity") < value(best["prompt-tuning"], "perplexity")
    f.evidence += [f"best under the budget: {_fmt(best[m])}" for m in best]
    with_rouge = {m: [r for r in rs if has(r, "rougeL")] for m, rs in under.items()}
    if all(with_rouge.values()):
        top = {m: max(value(r, "rougeL") for r in rs) for m, rs in with_rouge.items()}
        f.evidence.append(
            f"best ROUGE-L under the budget: ComMer {top['commer-mean']:.3f}, prompt tuning {top['prompt-tuning']:.3f}"
        )
    f.status = REPRODUCED if wins else NOT_REPRODUCED
    return f


def finding_power_law(rows: list[Row], task: str = "lamp7") -> Finding:
    f = Finding("Figure 4", "ComMer's perplexity falls with the number of documents as a power law.")
    fits = {}
    for k in ks(rows, task, "commer-mean"):
        points = curve(rows, task, "commer-mean", k, min_docs=1)
        fit = fit_power_law([r["test_docs"] for r in points], [value(r, "perplexity") for r in points])
        if fit is not None and fit.points >= 3:
            fits[k] = fit
    if not fits:
        f.evidence.append(f"needs ComMer-mean perplexities at >= 3 numbers of test documents (>= 1) on {task}")
        return f
    for k, fit in fits.items():
        f.evidence.append(f"K={k}: exponent {fit.exponent:+.4f}, R^2 {fit.r2:.3f} over {fit.points} points")
    ok = all(fit.exponent < 0 and fit.r2 >= MIN_R2 for fit in fits.values())
    f.evidence.append(f"criterion: negative exponent and R^2 >= {MIN_R2} for every K")
    f.status = REPRODUCED if ok else NOT_REPRODUCED
    return f


def finding_perltqa(rows: list[Row], task: str = "perltqa") -> Finding:
    f = Finding(
        "Figure 5", "On PerLTQA more documents make ComMer worse (mean pooling loses details); prompt tuning is robust."
    )
    change = {}
    for method in ("commer-mean", "prompt-tuning"):
        for k in ks(rows, task, method):
            points = curve(rows, task, method, k, min_docs=1)
            if len(points) >= 2:
                first, last = value(points[0], "perplexity"), value(points[-1], "perplexity")
                change[method, k] = last / first - 1
                f.evidence.append(
                    f"{method} K={k}: perplexity {first:.3f} at n={points[0]['test_docs']} -> {last:.3f} at "
                    f"n={points[-1]['test_docs']} ({change[method, k]:+.1%})"
                )
    ours = [c for (m, _), c in change.items() if m == "commer-mean"]
    theirs = [c for (m, _), c in change.items() if m == "prompt-tuning"]
    if not ours or not theirs:
        f.evidence.append(f"needs ComMer and prompt tuning at >= 2 numbers of test documents on {task}")
        return f
    ok = all(c > 0 for c in ours) and max(theirs) < min(ours)
    f.status = REPRODUCED if ok else NOT_REPRODUCED
    return f


def finding_pretraining(rows: list[Row]) -> Finding:
    f = Finding("Table 1", "Pretraining (auto-encoding on web text) lowers ComMer's perplexity.")
    pairs: dict[tuple, dict[bool, float]] = defaultdict(dict)
    for r in rows:
        if r.get("method") == "commer-mean" and has(r, "perplexity"):
            cell = (r["task"], r["k"], r["train_docs"], r["test_docs"], r["seed"], r.get("trained_variant"))
            pairs[cell][bool(r.get("pretrained"))] = value(r, "perplexity")
    both = {cell: v for cell, v in pairs.items() if len(v) == 2 and cell[3] >= 1}
    if not both:
        f.evidence.append("needs ComMer-mean with and without pretraining, otherwise the same cell")
        return f
    lower = sum(v[True] < v[False] for v in both.values())
    for (task, k, train, test, _, _), v in sorted(both.items()):
        f.evidence.append(f"{task} K={k} train n={train} test n={test}: {v[True]:.3f} pretrained vs {v[False]:.3f} not")
    f.evidence.append(f"pretraining lower in {lower} of {len(both)} cells")
    f.status = REPRODUCED if lower == len(both) else NOT_REPRODUCED
    return f


def finding_generalization(rows: list[Row], task: str = "lamp7") -> Finding:
    f = Finding("Figure 6", "Trained with j documents, tested with i: more documents at test time help, fewer hurt.")
    good = total = 0
    for (k, pre), cells in grid(rows, task).items():
        for (j, i), ppl in sorted(cells.items()):
            if i != j and (j, j) in cells:
                total += 1
                better = ppl < cells[j, j]
                good += better == (i > j)
                f.evidence.append(
                    f"K={k}{' pretrained' if pre else ''} train n={j}: test n={i} {ppl:.3f} vs n={j} {cells[j, j]:.3f}"
                )
    if not total:
        f.evidence.append(f"needs ComMer-mean tested with its training n and another n >= 1 on {task}")
        return f
    f.evidence.append(f"{good} of {total} comparisons go the paper's way")
    f.status = REPRODUCED if good == total else NOT_REPRODUCED
    return f


def finding_merge(rows: list[Row], task: str = "lamp7") -> Finding:
    f = Finding(
        "Figure 7",
        "Mean pooling beats concatenating the compressions; compressing the concatenated documents is marginally "
        "better than the mean but costs more.",
    )
    mean_vs_concat, cc_vs_mean = [], []
    for (k, train, _, pre, trained), variants in merge_groups(rows, task).items():
        mean = variants.get("commer-mean", {})
        for n, r in sorted(mean.items()):
            m = value(r, "perplexity")
            others = []
            if n in variants.get("commer-concat", {}):
                c = value(variants["commer-concat"][n], "perplexity")
                mean_vs_concat.append(m < c)
                others.append(f"concat {c:.3f}")
            if n in variants.get("commer-concat-compress", {}):
                cc = value(variants["commer-concat-compress"][n], "perplexity")
                cc_vs_mean.append(cc < m)
                others.append(f"concat-then-compress {cc:.3f}")
            if others:
                model = f"K={k} train n={train}{' pretrained' if pre else ''} (trained {trained})"
                f.evidence.append(f"{model} at n={n}: perplexity mean {m:.3f}, " + ", ".join(others))
    if not mean_vs_concat and not cc_vs_mean:
        f.evidence.append(f"needs ComMer-mean next to another merge variant at >= 2 test documents on {task}")
        return f
    parts = []
    if mean_vs_concat:
        parts.append(f"mean beats concat in {sum(mean_vs_concat)} of {len(mean_vs_concat)}")
    if cc_vs_mean:
        parts.append(f"concat-then-compress beats mean in {sum(cc_vs_mean)} of {len(cc_vs_mean)}")
    f.evidence.append("; ".join(parts))
    f.status = REPRODUCED if all(mean_vs_concat) and all(cc_vs_mean) else NOT_REPRODUCED
    if not (mean_vs_concat and cc_vs_mean):
        f.evidence.append("only half of the comparison was run: the status is that half's")
    return f


def findings(rows: list[Row]) -> list[Finding]:
    """Every finding of the paper this project tracks, in the paper's order."""
    return [
        finding_budget(rows),
        finding_power_law(rows),
        finding_perltqa(rows),
        finding_pretraining(rows),
        finding_generalization(rows),
        finding_merge(rows),
    ]
