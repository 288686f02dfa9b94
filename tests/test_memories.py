"""``commer memories`` (Figure 5) end to end on the tiny Llama and a small PerLTQA-shaped data folder written here:
every method at every number of memories, the files it writes, and retrieval-merge with k >= n equal to the mean."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_backbone

from commer.checkpoint import load_checkpoint, save_checkpoint
from commer.config import ComMerConfig
from commer.data.perltqa import MEMORY_FILE, QA_FILE
from commer.data.splits import SPLIT_FILE, split_users
from commer.errors import ConfigError
from commer.experiments.memories import MEAN, pool_folds, reference_recall, run_memories, top_k_documents
from commer.model import ComMer, PromptTuning
from commer.text import Example

PERSONAS = ["ann", "bo", "cy", "di", "ed", "flo", "gus"]


def _write_perltqa(root) -> None:
    memories, qa = {}, []
    for i, p in enumerate(PERSONAS):
        memories[p] = {
            "profile": {"Hobby": "hiking" if i % 2 else "jazz"},
            "social_relationship": {},
            "events": {f"{i}_0": {"Creation Time": "today", "content": "a run in the rain"}},
            "dialogues": {f"{i}_0#1": {"contents": {"morning": ["i love coffee", "you love tea"]}}},
        }
        like = {"Question": "what does the user like ?", "Answer": "jazz", "Reference Memory": "Hobby"}
        event = {"Question": "what was it ?", "Answer": "a run", "Reference Memory": f"['{i}_0']"}
        qa.append({p: {"profile": [like], "events": [{f"{i}_0": [event]}]}})
    (root / MEMORY_FILE).parent.mkdir(parents=True)
    (root / MEMORY_FILE).write_text(json.dumps(memories))
    (root / QA_FILE).write_text(json.dumps(qa))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("memories")
    backbone = tiny_backbone(max_positions=1024)
    folder = root / "backbone"
    backbone.model.save_pretrained(folder)
    backbone.tokenizer.save_pretrained(folder)
    bb = tiny_backbone(max_positions=1024)
    bb.name = str(folder)
    save_checkpoint(ComMer(bb, ComMerConfig(num_embeddings=2, lora_r=2)), root / "commer")
    pt = tiny_backbone(max_positions=1024)
    pt.name = str(folder)
    save_checkpoint(PromptTuning(pt, ComMerConfig(method="prompt_tuning", num_embeddings=2)), root / "pt")
    _write_perltqa(root / "data")
    return root


def test_every_method_at_every_number_of_memories(checkpoints, tmp_path):
    points = run_memories(
        str(checkpoints / "commer"), str(checkpoints / "pt"), tmp_path, memories=(1, 3), top_k=(1, 3),
        split="train", data_dir=str(checkpoints / "data"), generate_examples=2, max_new_tokens=4,
        progress=lambda _: None,
    )  # fmt: skip
    methods = {p.method for p in points}
    assert methods == {
        "no documents", "documents as text", "text summary", "prompt tuning", "commer-mean",
        "commer-dense-top1", "commer-bm25-top1", "commer-dense-top3", "commer-bm25-top3",
    }  # fmt: skip
    assert {p.memories for p in points} == {1, 3} and all(math.isfinite(p.perplexity) for p in points)
    at = {(p.method, p.memories): p for p in points}
    # k >= n is the plain mean: the same perplexity, exactly
    for signal in ("dense", "bm25"):
        assert at[f"commer-{signal}-top3", 3].perplexity == at[MEAN, 3].perplexity
    # the soft prompt is K whatever n; documents as text grow with n
    assert at[MEAN, 1].prompt_tokens == at[MEAN, 3].prompt_tokens
    assert at["documents as text", 3].prompt_tokens > at["documents as text", 1].prompt_tokens
    record = json.loads((tmp_path / "memories.json").read_text())
    assert len(record["points"]) == len(points)
    assert (tmp_path / "memories.png").stat().st_size > 0
    assert "| commer-mean |" in (tmp_path / "memories.md").read_text()
    # retrieval's ground truth: every signal, k and n; a top k of n <= k memories holds every referenced one
    recall = {(r["signal"], r["k"], r["memories"]): r["reference_recall"] for r in record["reference_recall"]}
    assert set(recall) == {(s, k, n) for s in ("dense", "bm25") for k in (1, 3) for n in (1, 3)}
    assert all(recall[s, k, n] == 1.0 for s, k, n in recall if k >= n)
    assert "| dense top-1 |" in (tmp_path / "memories.md").read_text()


def test_choosing_k_and_the_margin_on_validation_can_leave_out_the_slow_text_methods(checkpoints, tmp_path):
    points = run_memories(
        str(checkpoints / "commer"), None, tmp_path, memories=(2,), top_k=(1,), split="train", min_margins=(0, 0.5),
        data_dir=str(checkpoints / "data"), generate_examples=0, summary=False, text=False, progress=lambda _: None,
    )  # fmt: skip
    assert [p.method for p in points] == [
        "no documents", MEAN, "commer-dense-top1", "commer-bm25-top1", "commer-dense-top1-margin0.5",
        "commer-bm25-top1-margin0.5",
    ]  # fmt: skip
    record = json.loads((tmp_path / "memories.json").read_text())
    shares = {(r["signal"], r["min_margin"]): r["mean_share"] for r in record["reference_recall"]}
    assert shares[("bm25", 0)] == shares[("dense", 0)] == 0.0 and all(0 <= s <= 1 for s in shares.values())


def test_top_k_documents_keeps_the_best_in_their_order():
    example = Example("u", ["d0", "d1", "d2", "d3"], "q", "a")
    assert top_k_documents(example, 2, torch.tensor([0.1, 0.9, 0.0, 0.5])).documents == ["d1", "d3"]
    assert top_k_documents(example, 9, torch.zeros(4)).documents == example.documents


def test_reference_recall_counts_the_referenced_memories_in_the_top_k():
    example = Example("u", ["d0", "d1", "d2", "d3"], "q", "a")
    scores = torch.tensor([0.1, 0.9, 0.0, 0.5])
    assert reference_recall(example, 1, scores, {"d1"}) == 1.0
    assert reference_recall(example, 1, scores, {"d3"}) == 0.0
    assert reference_recall(example, 2, scores, {"d3", "d2"}) == 0.5
    # out of the at most k it could hold
    assert reference_recall(example, 1, scores, {"d1", "d2"}) == 1.0
    # below the margin all are kept: the referenced memory is among them
    assert reference_recall(example, 1, scores, {"d3"}, min_margin=0.9) == 1.0


def test_a_run_is_evaluated_on_the_users_it_held_out(checkpoints, tmp_path):
    """Figure 5 on a run trained with data.split_seed=3 splits the users with 3 unless told otherwise, and refuses a
    seed whose test users the run trained on (the scores would not be held-out ones)."""
    run = tmp_path / "run"
    save_checkpoint(load_checkpoint(checkpoints / "commer"), run / "best")
    trained = split_users(PERSONAS, seed=3)
    (run / SPLIT_FILE).write_text(json.dumps(trained.to_dict()))
    run_memories(
        str(run / "best"), None, tmp_path / "out", memories=(1,), top_k=(1,), data_dir=str(checkpoints / "data"),
        generate_examples=0, summary=False, text=False, progress=lambda _: None,
    )  # fmt: skip
    record = json.loads((tmp_path / "out" / "memories.json").read_text())
    assert record["seed"] == 3 and record["split"] == "test" and record["users"] == trained.users["test"]
    leaking = next(s for s in range(100) if split_users(PERSONAS, seed=s).users["test"][0] in trained.users["train"])
    with pytest.raises(ConfigError, match=f"trained on 1 of the test users under split seed {leaking}.*seed is 3"):
        run_memories(
            str(run / "best"), None, tmp_path / "out", memories=(1,), data_dir=str(checkpoints / "data"),
            seed=leaking, summary=False, text=False,
        )  # fmt: skip


def test_pooling_folds_weighs_each_fold_the_same_and_counts_the_wins(tmp_path):
    """Two folds: BM25 wins the first by a little and loses the second by a lot; the geometric mean and the wins
    say so, per number of memories."""
    points = {
        "ann": {(MEAN, 8): 4.0, ("commer-bm25-top1", 8): 3.0, (MEAN, 16): 4.0, ("commer-bm25-top1", 16): 5.0},
        "bo": {(MEAN, 8): 9.0, ("commer-bm25-top1", 8): 12.0, (MEAN, 16): 9.0, ("commer-bm25-top1", 16): 8.0},
    }
    paths = []
    for user, ppl in points.items():
        path = tmp_path / f"{user}.json"
        record = [dict(method=m, memories=n, perplexity=v) for (m, n), v in ppl.items()]
        path.write_text(json.dumps({"users": [user], "points": record}))
        paths.append(path)
    markdown = pool_folds(paths, tmp_path / "pooled")
    assert "| commer-bm25-top1 | 8 | 3.00 | 12.00 | 6.000 | 1 |" in markdown
    assert "| commer-bm25-top1 | 16 | 5.00 | 8.00 | 6.325 | 1 |" in markdown
    assert f"| {MEAN} | 8 | 4.00 | 9.00 | 6.000 |  |" in markdown
    assert (tmp_path / "pooled" / "pooled.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="at least two folds"):
        pool_folds(paths[:1], tmp_path)
