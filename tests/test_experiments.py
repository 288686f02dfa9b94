"""Sweeps on the tiny Llama: resumable (finished cells skipped, checkpoints reused), figures and report written, and the
paper's findings reported "not run" when their data is missing."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import WORDS, tiny_backbone

import commer.experiments.sweep as sweep_module
from commer.data.splits import SplitInfo
from commer.experiments import ResultsTable, Sweep, expand, load_sweep, run_sweep, write_report
from commer.experiments.analysis import NOT_RUN, REPRODUCED, findings, fit_power_law
from commer.text import Example
from commer.train import Trainer

ROOT = Path(__file__).parents[1]
USERS = {"train": [f"t{i}" for i in range(12)], "validation": ["v0", "v1"], "test": ["e0", "e1", "e2", "e3"]}


def fake_data(task: str, n_docs: int, seed: int) -> tuple[dict[str, list[Example]], SplitInfo]:
    """Every user has 8 documents and asks about one of them; ``n_docs`` of them are given (like BM25 top-n)."""
    splits = {}
    for split, users in USERS.items():
        splits[split] = []
        for user in users:
            rng = random.Random(f"{task}:{user}")
            words = rng.sample(WORDS, 8)
            docs = [f"my {w} today" for w in words]
            splits[split].append(Example(user, docs[:n_docs], "paraphrase : i like jazz", words[0]))
    return splits, SplitInfo(seed, {"train": 0.6, "validation": 0.2, "test": 0.2}, USERS)


SWEEP = """
output_dir: {out}/runs
results_dir: {out}/results
task: lamp7
model: {{lora_r: 4}}
train: {{batch_size: 4, micro_batch_size: 2, max_steps: 2, eval_every: 2, log_every: 1}}
val_examples: 2
pretrain: {{steps: 2, n_docs: 3}}
eval: {{max_examples: 4, rouge_examples: 2, max_new_tokens: 3, batch_size: 2, bf16: false}}
studies:
  - name: cost-quality
    methods: [commer, prompt_tuning]
    k: [2]
    train_docs: [1]
    test_docs: [0, 1, 2, 4]
  - name: merge
    methods: [commer]
    k: [2]
    train_docs: [1]
    test_docs: [2]
    variants: [mean, concat, concat-compress]
  - name: pretraining
    methods: [commer]
    k: [2]
    train_docs: [1]
    test_docs: [1]
    pretrain: [true, false]
"""


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(SWEEP.format(out=tmp_path))
    return load_sweep(path)


def test_expand_deduplicates_cells_shared_between_studies(config):
    cells = expand(config)
    # commer: 4 (cost) + 2 new variants at n=2 + 1 pretrained; prompt tuning: 4
    assert len(cells) == 11
    assert len({c.model for c in cells}) == 3  # commer, commer pretrained, prompt tuning
    assert {c.method for c in cells} == {"commer-mean", "commer-concat", "commer-concat-compress", "prompt-tuning"}


def test_interrupted_sweep_resumes_without_repeating_work(config, monkeypatch):
    evaluated, fits = [], []
    real_evaluate, real_fit = sweep_module.evaluate_examples, Trainer.fit

    def evaluate(*args, **kwargs):
        if len(evaluated) == 5 and crash:
            raise KeyboardInterrupt  # killed in the middle of the sweep
        evaluated.append(1)
        return real_evaluate(*args, **kwargs)

    def fit(self, *args, **kwargs):
        fits.append(self.config.output_dir)
        return real_fit(self, *args, **kwargs)

    monkeypatch.setattr(sweep_module, "evaluate_examples", evaluate)
    monkeypatch.setattr(Trainer, "fit", fit)
    crash = True
    with pytest.raises(KeyboardInterrupt):
        Sweep(config, tiny_backbone, fake_data).run()
    table = ResultsTable(config.results_path)
    assert len(table.rows()) == 5 + 1  # five cells and the copy-input baseline
    trained_first = list(fits)

    crash = False
    evaluated.clear()
    counts = Sweep(config, tiny_backbone, fake_data).run()
    assert len(evaluated) == 11 - 5
    assert counts == {"trained": len(fits) - len(trained_first), "evaluated": 6, "skipped": 5}
    assert not set(trained_first) & set(fits[len(trained_first) :])  # no model trained twice
    rows = table.rows()
    assert len(rows) == 12 and len({r["key"] for r in rows}) == 12

    evaluated.clear()
    assert Sweep(config, tiny_backbone, fake_data).run()["evaluated"] == 0 and not evaluated
    info = json.loads((config.results_path / "run_info.json").read_text())
    killed, resumed, idle = info["invocations"]
    assert not killed["finished"] and "wall_s" in killed  # recorded before the kill
    assert resumed["finished"] and resumed["evaluated"] == 6 and idle["evaluated"] == 0

    by = {(r["method"], r.get("test_docs"), r.get("pretrained")): r for r in rows}
    assert by["commer-mean", 0, False]["soft_prompt_tokens"] == 2  # no documents: the bridge's task prompt (K=2)
    assert by["commer-concat", 2, False]["soft_prompt_tokens"] == 4
    assert (
        by["prompt-tuning", 4, False]["generator_prompt_tokens"]
        > by["prompt-tuning", 0, False]["generator_prompt_tokens"]
    )
    assert by["copy-input", 0, None]["rougeL"] == pytest.approx(0.0)  # the input tweet shares no word with the gold
    csv_lines = (config.results_path / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 13 and csv_lines[0].startswith("key,task,method,k")


def test_figures_and_report_for_a_tiny_sweep(config):
    run_sweep(config, tiny_backbone, fake_data)
    results = config.results_path
    for name in ("figure3_cost_quality_lamp7", "figure4_power_law_lamp7", "figure6_train_test_docs_lamp7"):
        assert (results / f"{name}.png").stat().st_size > 1000
    assert (results / "figure7_merge_lamp7.png").stat().st_size > 1000
    assert not list(results.glob("figure5*"))  # no PerLTQA rows
    report = (results / "report.md").read_text()
    assert "![figure3](figure3_cost_quality_lamp7.png)" in report
    assert "**Figure 5: not run.**" in report and "skipped: no ComMer-mean or prompt-tuning rows for perltqa" in report
    assert "**Table 1: " in report and "**Table 1: not run" not in report  # pretrained and not, same cell
    assert "| lamp7 | commer-concat |" in report and "Wall time" in report


def test_findings_are_not_run_without_data(tmp_path):
    assert all(f.status == NOT_RUN and f.evidence for f in findings([]))
    ResultsTable(tmp_path).append({"key": "x", "task": "lamp7", "method": "copy-input", "rouge1": 0.5, "rougeL": 0.4})
    (tmp_path / "notes.md").write_text("Read this first.\n")
    report = write_report(tmp_path).read_text()
    assert "## Reading (from `notes.md`)\n\nRead this first." in report
    for name in ("Figure 3", "Figure 4", "Figure 5", "Table 1", "Figure 6", "Figure 7"):
        assert f"**{name}: not run.**" in report
    assert "ROUGE-L 0.400" in report and not list(tmp_path.glob("*.png"))


def test_findings_read_the_numbers():
    def row(method, n, ppl, k=4, tokens=50.0, pretrained=False, train=2):
        return {
            "task": "lamp7",
            "method": method,
            "k": k,
            "train_docs": train,
            "test_docs": n,
            "seed": 0,
            "pretrained": pretrained,
            "perplexity": ppl,
            "generator_prompt_tokens": tokens,
        }

    rows = [row("commer-mean", n, 3.0 * n**-0.1) for n in (1, 2, 4, 8)]
    rows += [row("prompt-tuning", n, 3.5, tokens=60.0 + 30 * n) for n in (1, 2, 4, 8)]
    rows += [row("commer-mean", 2, 2.5, pretrained=True)]
    status = {f.name: f.status for f in findings(rows)}
    assert status["Figure 3"] == REPRODUCED and status["Figure 4"] == REPRODUCED
    assert status["Table 1"] == REPRODUCED and status["Figure 6"] == REPRODUCED  # ppl falls with test n
    assert status["Figure 5"] == NOT_RUN and status["Figure 7"] == NOT_RUN


def test_power_law_fit_recovers_exponent_and_r2():
    fit = fit_power_law([1, 2, 4, 8], [3.0 * n**-0.25 for n in (1, 2, 4, 8)])
    assert fit.exponent == pytest.approx(-0.25) and fit.prefactor == pytest.approx(3.0) and fit.r2 == pytest.approx(1)
    noisy = fit_power_law([1, 2, 4, 8], [3.0, 2.0, 3.1, 2.2])
    assert noisy.r2 < 0.5 and fit_power_law([2, 2], [1.0, 1.1]) is None
    assert math.isclose(fit(16), 3.0 * 16**-0.25)


def test_sweep_config_overrides_and_errors(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(SWEEP.format(out=tmp_path))
    config = load_sweep(path, ["eval.max_examples=8", "studies.0.k=[4, 8]"])
    assert config.eval.max_examples == 8 and config.studies[0].k == [4, 8]
    with pytest.raises(ValueError, match="unknown config key.*eval.max_exampels"):
        load_sweep(path, ["eval.max_exampels=8"])
    with pytest.raises(ValueError, match="ComMer cannot train with 0 documents"):
        load_sweep(path, ["studies.0.train_docs=[0]"])
    with pytest.raises(ValueError, match="model.num_embeddings is set per cell"):
        load_sweep(path, ["model.num_embeddings=4"])


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("sweep-*.yaml")), ids=lambda p: p.name)
def test_shipped_sweep_configs_load(path):
    config = load_sweep(path)
    assert config.output_dir == f"runs/{path.stem}" and expand(config)


def test_report_command(tmp_path):
    code = "from commer.cli import main; main()"
    run = [sys.executable, "-c", code, "report", str(tmp_path)]
    missing = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert missing.returncode == 2 and "no results table" in missing.stderr and "Traceback" not in missing.stderr
    ResultsTable(tmp_path).append({"key": "x", "task": "lamp7", "method": "copy-input", "rouge1": 0.5, "rougeL": 0.4})
    done = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and (tmp_path / "report.md").is_file()
