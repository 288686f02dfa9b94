"""The text-summary profile: an RLPF-style baseline, zero-shot.

The frozen backbone keeps a short natural-language profile of a user, updated one document at a time (old summary +
new document -> new summary, at most ``SUMMARY_TOKENS`` tokens), and the generator reads that summary as text before
the request. Like ComMer's mean, an update costs the same whatever the number of documents already summarized; unlike
it, the profile is text a person can read, and every update is a generation.
"""

from __future__ import annotations

from collections.abc import Sequence

from commer.evaluate import generate
from commer.model import SoftPromptLM
from commer.text import Collator, Example

SUMMARY_TOKENS = 64  # the bound on a summary's length, in the backbone's tokens


def update_prompt(summary: str, document: str) -> str:
    """The request that folds one new document into a summary."""
    return (
        f"Notes about a person so far: {summary or '(none yet)'}\n\n"
        f"New information about them: {document}\n\n"
        "Rewrite the notes so that they keep the important facts (names, places, dates, numbers) of both, "
        "in a few short sentences."
    )


def summary_as_text(summary: str, instruction: str) -> str:
    """What the generator reads for a request: the summary, then the request."""
    return f"Notes about the person: {summary}\n\n{instruction}" if summary else instruction


def summarize(
    model: SoftPromptLM,
    collator: Collator,
    documents: Sequence[Sequence[str]],
    initial: Sequence[str] | None = None,
    max_new_tokens: int = SUMMARY_TOKENS,
    batch_size: int = 8,
    bf16: bool = True,
) -> list[str]:
    """One summary per list of ``documents``, each folded in one document at a time, from ``initial`` (default
    empty). Rounds advance every list by one document together, so the lists are summarized in batches; greedy
    decoding makes each summary depend on its own documents only. ``model`` should read no soft prompt (a frozen
    backbone: ``ComMer`` with ``bridge="none"`` and no documents)."""
    summaries = list(initial) if initial is not None else [""] * len(documents)
    if len(summaries) != len(documents):
        raise ValueError(f"{len(summaries)} initial summaries for {len(documents)} lists of documents")
    for step in range(max((len(docs) for docs in documents), default=0)):
        active = [i for i, docs in enumerate(documents) if step < len(docs)]
        requests = [Example(str(i), [], update_prompt(summaries[i], documents[i][step])) for i in active]
        for i, text in zip(active, generate(model, collator, requests, batch_size, max_new_tokens, bf16), strict=True):
            summaries[i] = text
    return summaries


def with_summary(example: Example, summary: str) -> Example:
    """``example`` with its documents replaced by ``summary``, read as text before the request."""
    return Example(example.user_id, [], summary_as_text(summary, example.instruction), example.answer)
