"""Metrics on held-out examples: perplexity and token accuracy of the gold answer, ROUGE of greedy generations, and
the prompt cost.

``evaluate_examples`` computes them all for one model on one set of examples; ``commer.experiments`` runs it over a
sweep of methods, K and numbers of documents. ``compare_documents`` asks whether the documents carry the user: the
same held-out users with their own documents, another user's, none (and, optionally, their documents as text).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from commer.backbone import load_backbone
from commer.batch import Batch
from commer.checkpoint import load_checkpoint, resolve_checkpoint
from commer.config import DEFAULT_BACKBONE, ComMerConfig, DataConfig
from commer.data.splits import SplitInfo, recorded_split
from commer.data.tasks import load_splits
from commer.errors import ConfigError
from commer.model import ComMer, SoftPromptLM
from commer.text import Collator, Example, documents_as_text


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where the hardware does bf16 natively; float32 elsewhere."""
    if not (enabled and bf16_supported(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def answer_totals(
    model: SoftPromptLM, collator: Collator, examples: Sequence[Example], batch_size: int = 8, bf16: bool = True
) -> tuple[float, int, int]:
    """Summed negative log-likelihood of the gold answers of ``examples``, their number of tokens, and how many of
    those tokens are the model's teacher-forced argmax (for token accuracy)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens, correct = 0.0, 0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="scoring answers", leave=False):
        batch = collator(examples[start : start + batch_size]).to(model.device)
        with autocast(model.device, bf16):
            logits, targets, _ = model.answer_logits(batch)
        total_nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
        total_tokens += targets.numel()
        correct += int((logits.argmax(-1) == targets).sum())
    model.train(was_training)
    return total_nll, total_tokens, correct


def nll_totals(
    model: SoftPromptLM, collator: Collator, examples: Sequence[Example], batch_size: int = 8, bf16: bool = True
) -> tuple[float, int]:
    """Summed negative log-likelihood of the gold answers of ``examples`` and their number of tokens."""
    total_nll, total_tokens, _ = answer_totals(model, collator, examples, batch_size, bf16)
    return total_nll, total_tokens


def perplexity(
    model: SoftPromptLM, collator: Collator, examples: Sequence[Example], batch_size: int = 8, bf16: bool = True
) -> float:
    """Token-weighted perplexity of the gold answers of ``examples``."""
    total_nll, total_tokens = nll_totals(model, collator, examples, batch_size, bf16)
    return math.exp(total_nll / max(total_tokens, 1))


@torch.no_grad()
def generate(
    model: SoftPromptLM,
    collator: Collator,
    examples: Sequence[Example],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    bf16: bool = True,
) -> list[str]:
    """Greedy answers to ``examples`` (their gold answers are not read)."""
    model.eval()
    tokenizer = collator.tokenizer
    answers = []
    for start in tqdm(range(0, len(examples), batch_size), desc="generate", leave=False):
        batch = collator(examples[start : start + batch_size], with_answers=False).to(model.device)
        with autocast(model.device, bf16):
            tokens = model.generate(
                batch, eos_token_id=tokenizer.eos_token_id, pad_token_id=collator.pad_id, max_new_tokens=max_new_tokens
            )
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist()]
    return answers


# -- cost: what the generator reads ------------------------------------------------------------------------------
@dataclass
class PromptCost:
    """Mean prompt sizes of a set of examples, in tokens (positions the generator or compressor reads).

    ``soft_prompt``: soft-prompt vectors before the text prompt (ComMer-mean: K, or 0 without documents; ComMer-concat:
    K x n; prompt tuning: K). ``generator``: everything the generator reads before its first new token, soft prompt
    plus text prompt (for prompt tuning the text prompt holds the documents). ``compressor``: what ComMer's compressor
    reads to build the soft prompt (document tokens + K slots per document; 0 for prompt tuning); it can be done
    offline, once per document, so it is not part of the cost of answering.
    """

    soft_prompt: float
    generator: float
    compressor: float


def prompt_tokens(batch: Batch, config: ComMerConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example ``(soft_prompt, generator, compressor)`` token counts of a prompts-only batch, each ``(B,)``.

    Counted from the collated tensors, so they are exactly what the models read: ``merge_batch`` masks the soft
    prompt of a user without documents (the bridge's task prompt fills it), and the concat merge keeps K slots per
    document.
    """
    if batch.labels is not None:
        raise ValueError("count prompt tokens on a batch collated with_answers=False: answers are not prompt")
    k = config.num_embeddings
    docs = torch.bincount(batch.doc_owner, minlength=batch.size)  # (B,)
    if config.method == "prompt_tuning":
        soft = torch.full_like(docs, k)
        compressor = torch.zeros_like(docs)
    else:
        soft = k * docs if config.merge == "concat" else k * (docs > 0).long()
        if config.bridge != "none":
            soft = soft.clamp(min=k)  # the bridge gives a user without documents the task prompt
        doc_tokens = batch.doc_mask.sum(1).long()
        compressor = torch.zeros_like(docs).index_add(0, batch.doc_owner, doc_tokens + k)
    return soft, soft + batch.input_mask.sum(1), compressor


def prompt_cost(collator: Collator, examples: Sequence[Example], batch_size: int = 64) -> PromptCost:
    """Mean prompt sizes of ``examples`` as ``collator``'s method reads them (see ``PromptCost``)."""
    totals = torch.zeros(3, dtype=torch.float64)
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size], with_answers=False)
        totals += torch.stack([t.sum() for t in prompt_tokens(batch, collator.config)]).double()
    soft, generator, compressor = (totals / max(len(examples), 1)).tolist()
    return PromptCost(soft, generator, compressor)


# -- ROUGE and the copy-the-input baseline ----------------------------------------------------------------------
def rouge(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """ROUGE-1 and ROUGE-L F-measures averaged over examples, scored as LaMP does (``rouge-score``, Porter stemmer)."""
    from rouge_score import rouge_scorer  # imports nltk: slow, and only needed here

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not predictions:
        return {"rouge1": math.nan, "rougeL": math.nan}
    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {name: sum(s[name].fmeasure for s in scores) / len(scores) for name in ("rouge1", "rougeL")}


def copy_input(instruction: str) -> str:
    """The copy-the-input baseline: the text after the instruction's first colon (LaMP-7: the tweet to paraphrase,
    which already paraphrases the gold one), or the whole instruction when it has no colon."""
    return instruction.split(":", 1)[-1].strip()


# -- everything about one set of examples --------------------------------------------------------------------------
@dataclass
class Evaluation:
    """The metrics of one model on one set of examples; ``rouge_*`` are on the first ``n_rouge`` examples only."""

    perplexity: float
    n_examples: int
    cost: PromptCost
    rouge1: float = math.nan
    rougeL: float = math.nan
    copy_rouge1: float = math.nan
    copy_rougeL: float = math.nan
    n_rouge: int = 0
    samples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_examples(
    model: SoftPromptLM,
    collator: Collator,
    examples: Sequence[Example],
    rouge_examples: int = 0,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    bf16: bool = True,
    n_samples: int = 2,
) -> Evaluation:
    """Perplexity of the gold answers of ``examples``, the prompt cost, and ROUGE of greedy generations on the first
    ``rouge_examples`` of them (generation is the slow part), next to the copy-the-input baseline on the same ones."""
    if not examples:
        raise ValueError("no examples to evaluate")
    result = Evaluation(
        perplexity=perplexity(model, collator, examples, batch_size, bf16),
        n_examples=len(examples),
        cost=prompt_cost(collator, examples),
    )
    subset = list(examples[:rouge_examples])
    if subset:
        answers = generate(model, collator, subset, batch_size, max_new_tokens, bf16)
        golds = [ex.answer for ex in subset]
        scores = rouge(answers, golds)
        copies = rouge([copy_input(ex.instruction) for ex in subset], golds)
        result.rouge1, result.rougeL = scores["rouge1"], scores["rougeL"]
        result.copy_rouge1, result.copy_rougeL = copies["rouge1"], copies["rougeL"]
        result.n_rouge = len(subset)
        result.samples = [
            {"instruction": ex.instruction, "gold": ex.answer, "generated": answer}
            for ex, answer in zip(subset[:n_samples], answers, strict=False)
        ]
    return result


# -- does the soft prompt carry the user? ----------------------------------------------------------------------------
OWN, OTHER, NONE, TEXT = "own documents", "another user's documents", "no documents", "documents as text"


def document_variants(examples: Sequence[Example], with_text: bool = False) -> dict[str, list[Example]]:
    """The same requests and gold answers with the user's own documents, with the next other user's (equally
    informative, but not theirs), with none, and (``with_text``) with the documents folded into the request as text."""
    n = len(examples)
    if len({ex.user_id for ex in examples}) < 2:
        raise ConfigError("comparing own with another user's documents needs examples of at least two users")

    def next_user(i: int) -> Example:  # the next example (cyclically) that belongs to someone else
        return next(examples[(i + j) % n] for j in range(1, n) if examples[(i + j) % n].user_id != examples[i].user_id)

    variants = {
        OWN: list(examples),
        OTHER: [
            Example(ex.user_id, next_user(i).documents, ex.instruction, ex.answer) for i, ex in enumerate(examples)
        ],
        NONE: [Example(ex.user_id, [], ex.instruction, ex.answer) for ex in examples],
    }
    if with_text:
        variants[TEXT] = [
            Example(ex.user_id, [], documents_as_text(ex.documents, ex.instruction), ex.answer) for ex in examples
        ]
    return variants


def contains_answer(prediction: str, gold: str) -> bool:
    """The recall probe's score: the gold (one-word) answer appears in the greedy answer, case-insensitively."""
    return gold.strip().lower() in prediction.lower()


@dataclass
class Comparison:
    """One model on the same held-out users under each document variant (``document_variants``)."""

    perplexity: dict[str, float]
    token_accuracy: dict[str, float]
    n_examples: int
    rouge: dict[str, dict[str, float]] = field(default_factory=dict)  # variant -> rouge1/rougeL; plus "copy input"
    answer_accuracy: dict[str, float] = field(default_factory=dict)  # variant -> share containing the gold answer
    n_generated: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table, one row per variant."""
        lines = [f"{'variant':26} {'perplexity':>10} {'token acc':>9} {'ROUGE-1':>8} {'ROUGE-L':>8} {'answer acc':>10}"]
        for name in [*self.perplexity, *(k for k in self.rouge if k not in self.perplexity)]:
            r = self.rouge.get(name, {})
            cells = [
                f"{self.perplexity[name]:10.3f}" if name in self.perplexity else f"{'':>10}",
                f"{self.token_accuracy[name]:9.3f}" if name in self.token_accuracy else f"{'':>9}",
                f"{r['rouge1']:8.4f}" if r else f"{'':>8}",
                f"{r['rougeL']:8.4f}" if r else f"{'':>8}",
                f"{self.answer_accuracy[name]:10.3f}" if name in self.answer_accuracy else f"{'':>10}",
            ]
            lines.append(f"{name:26} " + " ".join(cells))
        return "\n".join(lines)


def compare_documents(
    model: SoftPromptLM,
    collator: Collator,
    examples: Sequence[Example],
    generate_examples: int = 0,
    with_text: bool = False,
    score_rouge: bool = True,
    score_answers: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    bf16: bool = True,
) -> Comparison:
    """Perplexity and token accuracy of the gold answers under every document variant; on the first
    ``generate_examples`` users also greedy answers, scored by ROUGE (next to the copy-the-input baseline) and, with
    ``score_answers``, by whether they contain the gold answer (the recall probe)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    variants = document_variants(examples, with_text)
    result = Comparison(perplexity={}, token_accuracy={}, n_examples=len(examples))
    for name, variant in variants.items():
        total_nll, tokens, correct = answer_totals(model, collator, variant, batch_size, bf16)
        result.perplexity[name] = math.exp(total_nll / max(tokens, 1))
        result.token_accuracy[name] = correct / max(tokens, 1)
    if generate_examples > 0:
        subset = {name: variant[:generate_examples] for name, variant in variants.items()}
        golds = [ex.answer for ex in subset[OWN]]
        result.n_generated = len(golds)
        for name, variant in subset.items():
            answers = generate(model, collator, variant, batch_size, max_new_tokens, bf16)
            if score_rouge:
                result.rouge[name] = rouge(answers, golds)
            if score_answers:
                hits = sum(contains_answer(a, g) for a, g in zip(answers, golds, strict=True))
                result.answer_accuracy[name] = hits / len(golds)
        if score_rouge:
            result.rouge["copy input"] = rouge([copy_input(ex.instruction) for ex in subset[OWN]], golds)
    return result


def _recorded_split(checkpoint: str | None) -> SplitInfo | None:
    return None if checkpoint is None else recorded_split(resolve_checkpoint(checkpoint))


def heldout_seed(checkpoint: str | None, seed: int | None) -> int:
    """The split seed to evaluate ``checkpoint`` with: ``seed``, else the one its training run recorded, else
    training's default (``data.split_seed``)."""
    if seed is not None:
        return seed
    recorded = _recorded_split(checkpoint)
    return recorded.seed if recorded is not None else DataConfig().split_seed


def check_heldout(checkpoint: str | None, info: SplitInfo, split: str) -> None:
    """ConfigError when ``split``'s users under ``info`` include users the run of ``checkpoint`` trained on: its
    scores would not be held-out ones (e.g. a run trained with ``data.split_seed=3`` evaluated with seed 0)."""
    recorded = _recorded_split(checkpoint)
    if recorded is None:
        return
    seen = sorted(set(info.users[split]) & set(recorded.users["train"]))
    if seen:
        raise ConfigError(
            f"{checkpoint} was trained on {len(seen)} of the {split} users under split seed {info.seed} (e.g. "
            f"{seen[0]!r}); its run's split seed is {recorded.seed}: evaluate with that seed"
        )


def evaluate_heldout(
    checkpoint: str | None,
    task: str,
    n_docs: int,
    data_dir: str | None = None,
    users: int = 120,
    split: str = "test",
    generate_examples: int = 0,
    with_text: bool = False,
    max_new_tokens: int = 48,
    seed: int | None = None,
    backbone: str = DEFAULT_BACKBONE,
    user_prefix: str = "",
    per_user: int = 1,
) -> tuple[Comparison, dict[str, Any]]:
    """``compare_documents`` for a checkpoint (a folder, ``"pretrained"``, or ``None``: the frozen backbone alone) on
    the first ``users`` users of a task's ``split`` (split by user with ``seed``, as training splits them: default
    ``heldout_seed``; up to ``per_user`` examples each; only ids starting with ``user_prefix``). Returns the comparison
    and a record of what was run."""
    splits, info = load_splits(task, data_dir, n_docs, heldout_seed(checkpoint, seed))
    if split not in splits:
        raise ConfigError(f"split must be one of {', '.join(splits)}, got {split!r}")
    check_heldout(checkpoint, info, split)
    chosen: dict[str, list[Example]] = {}  # up to per_user examples of each user (a FineWeb page has dozens)
    for ex in splits[split]:
        if ex.user_id.startswith(user_prefix) and len(chosen.setdefault(ex.user_id, [])) < per_user:
            chosen[ex.user_id].append(ex)
    examples = [ex for user_examples in list(chosen.values())[:users] for ex in user_examples]
    if not examples:
        raise ConfigError(f"no {split} users of {task} whose id starts with {user_prefix!r}")
    bb = load_backbone(backbone)
    # None: the frozen backbone, no soft prompt for users without documents (the paper's bridge adds nothing then)
    model = ComMer(bb, ComMerConfig(bridge="none")) if checkpoint is None else load_checkpoint(checkpoint, bb)
    collator = Collator(bb.tokenizer, model.config, model.max_length)
    recall = task == "recall"
    comparison = compare_documents(
        model,
        collator,
        examples,
        generate_examples=generate_examples,
        with_text=with_text,
        score_rouge=not recall,
        score_answers=recall,
        max_new_tokens=8 if recall else max_new_tokens,
    )
    record = {
        "checkpoint": checkpoint,
        "task": task,
        "n_docs": n_docs,
        "split": split,
        "users": min(len(chosen), users),
        "examples": len(examples),
        "user_prefix": user_prefix,
        "split_info": info.to_dict(with_users=False),
        "config": model.config.to_dict(),
        "backbone": {"name": bb.name, "fingerprint": bb.fingerprint},
    }
    return comparison, record
