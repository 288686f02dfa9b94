"""The auto-encoding pretraining task: given a few short documents, reproduce the one a question points at.

An example holds k documents (k uniform in ``[min_docs, max_docs]``), each cut to ``max_chars`` characters and written
``Document i: <text>`` (i from 1); the instruction is ``What does document n contain?`` for a random n and the answer
is document n's text without its prefix. Texts come from FineWeb (streamed) or from a task's training profiles (the
paper's "tweets" pretraining). ``mixed_pretrain`` is the mix the shipped compressor is pretrained on: every FineWeb
page cut into consecutive pieces (the pieces of one page are one "user", so held-out pages are unseen text) plus the
profile documents of the *training* users of LaMP-7 and of the news task, never their test users. ``continuation``
turns a share of the FineWeb examples into ICAE's language-modelling objective: the request is ``What follows document
n?`` (n the last document) and the answer is the page's next piece, which no document holds.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from itertools import count, islice
from pathlib import Path

from commer.data.errors import DataError, iter_jsonl, resolve_data_dir
from commer.errors import ConfigError
from commer.text import Example

FINEWEB_FILE = Path("fineweb") / "fineweb_sample.jsonl.gz"
DOC_CHARS = 150
MIN_DOCS, MAX_DOCS = 1, 8
ICAE_CONTINUATION = 0.5  # share of continuation examples in "pretrain-mix-lm": ICAE's mix of its two objectives


def autoencoding_example(user_id: str, texts: Sequence[str], rng: random.Random, max_chars: int = DOC_CHARS) -> Example:
    """One example over ``texts`` (all of them, in order), asking about a document chosen by ``rng``."""
    if not texts:
        raise ValueError("an auto-encoding example needs at least one text")
    cut = [t.strip()[:max_chars] for t in texts]
    n = rng.randint(1, len(cut))
    documents = [f"Document {i}: {text}" for i, text in enumerate(cut, start=1)]
    return Example(user_id, documents, instruction=f"What does document {n} contain?", answer=cut[n - 1])


def continuation_example(user_id: str, texts: Sequence[str], following: str, max_chars: int = DOC_CHARS) -> Example:
    """One example over ``texts`` whose answer is ``following``, the text that comes after the last of them."""
    if not texts:
        raise ValueError("a continuation example needs at least one text")
    documents = [f"Document {i}: {text.strip()[:max_chars]}" for i, text in enumerate(texts, start=1)]
    return Example(user_id, documents, f"What follows document {len(texts)}?", following.strip()[:max_chars])


def chunk_text(text: str, max_chars: int = DOC_CHARS) -> list[str]:
    """Consecutive pieces of ``text`` of at most ``max_chars`` characters, cut at whitespace where possible."""
    words, pieces, current = text.split(), [], ""
    for word in words:
        word = word[:max_chars]
        if current and len(current) + 1 + len(word) > max_chars:
            pieces.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        pieces.append(current)
    return pieces


def _check_range(min_docs: int, max_docs: int) -> None:
    if not 1 <= min_docs <= max_docs:
        raise ConfigError(f"need 1 <= min_docs <= max_docs, got {min_docs}..{max_docs}")


def iter_fineweb(path: Path) -> Iterator[str]:
    """The non-blank texts of a FineWeb JSON-lines file (gzipped or not), streamed."""
    for lineno, record in iter_jsonl(path, "FineWeb sample"):
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: record has no text field")
        if text.strip():
            yield text


def text_pretrain_examples(
    texts: Iterable[str],
    min_docs: int = MIN_DOCS,
    max_docs: int = MAX_DOCS,
    seed: int = 0,
    max_chars: int = DOC_CHARS,
    prefix: str = "pretrain",
) -> Iterator[Example]:
    """Examples from consecutive texts of a stream, k of them per example; user ids ``<prefix>-<k>``.

    Lazy: the stream is read only as far as the examples taken. A final group shorter than drawn is still used.
    """
    _check_range(min_docs, max_docs)
    rng = random.Random(seed)
    it = iter(texts)
    for k in count():
        group = list(islice(it, rng.randint(min_docs, max_docs)))
        if not group:
            return
        yield autoencoding_example(f"{prefix}-{k}", group, rng, max_chars)


def fineweb_pretrain(
    data_dir: str | Path | None = None,
    min_docs: int = MIN_DOCS,
    max_docs: int = MAX_DOCS,
    seed: int = 0,
    limit: int | None = None,
) -> Iterator[Example]:
    """Auto-encoding examples streamed from ``<data_dir>/fineweb/fineweb_sample.jsonl.gz``, at most ``limit``."""
    path = resolve_data_dir(data_dir) / FINEWEB_FILE
    examples = text_pretrain_examples(iter_fineweb(path), min_docs, max_docs, seed, prefix="fineweb")
    return islice(examples, limit)


def profile_pretrain_examples(
    profiles: Iterable[Example] | Iterable[Sequence[str]],
    min_docs: int = MIN_DOCS,
    max_docs: int = MAX_DOCS,
    seed: int = 0,
    max_chars: int = DOC_CHARS,
) -> Iterator[Example]:
    """One auto-encoding example per profile, over a random subset of that user's own texts.

    ``profiles`` are Examples (their documents are the texts; pass training users only, so test users' texts never
    reach pretraining) or plain lists of texts (user ids ``profile-<k>``). Empty profiles are passed over.
    """
    _check_range(min_docs, max_docs)
    rng = random.Random(seed)
    for k, profile in enumerate(profiles):
        if isinstance(profile, Example):
            user_id, texts = profile.user_id, profile.documents
        else:
            user_id, texts = f"profile-{k}", list(profile)
        if not texts:
            continue
        size = rng.randint(min(min_docs, len(texts)), min(max_docs, len(texts)))
        yield autoencoding_example(user_id, rng.sample(texts, size), rng, max_chars)


def fineweb_page_examples(
    data_dir: str | Path | None = None,
    min_docs: int = MIN_DOCS,
    max_docs: int = MAX_DOCS,
    seed: int = 0,
    max_chars: int = DOC_CHARS,
    max_pieces_per_page: int = 64,
    continuation: float = 0.0,
) -> Iterator[Example]:
    """Examples over consecutive pieces of each FineWeb page; user id ``fineweb-page-<i>`` per page. A group of pieces
    with a piece after it becomes a continuation example with probability ``continuation``, else auto-encoding."""
    _check_range(min_docs, max_docs)
    if not 0.0 <= continuation <= 1.0:
        raise ConfigError(f"continuation must be in [0, 1], got {continuation!r}")
    rng = random.Random(seed)
    path = resolve_data_dir(data_dir) / FINEWEB_FILE
    for page, text in enumerate(iter_fineweb(path)):
        pieces = chunk_text(text, max_chars)[:max_pieces_per_page]
        while pieces:
            n = rng.randint(min_docs, max_docs)
            group, pieces = pieces[:n], pieces[n:]
            # no draw when continuation is 0, so the auto-encoding stream is the one the shipped compressor saw
            if continuation and pieces and rng.random() < continuation:
                yield continuation_example(f"fineweb-page-{page}", group, pieces[0], max_chars)
            else:
                yield autoencoding_example(f"fineweb-page-{page}", group, rng, max_chars)


def mixed_pretrain(
    data_dir: str | Path | None,
    max_docs: int,
    seed: int,
    profile_tasks: dict[str, list[Example]],
    continuation: float = 0.0,
) -> list[Example]:
    """FineWeb page pieces plus two passes over each given task's (training) profiles, 1..``max_docs`` documents
    per example. ``profile_tasks`` maps a task name to its training users' examples (their documents);
    ``continuation`` is the share of FineWeb examples that ask for the next piece (profiles have no order)."""
    examples = list(fineweb_page_examples(data_dir, MIN_DOCS, max_docs, seed, continuation=continuation))
    for task, profiles in profile_tasks.items():
        for repeat in range(2):
            for ex in profile_pretrain_examples(profiles, MIN_DOCS, max_docs, seed + repeat):
                # one user id per (task, user): a profile's examples stay in one pretraining split
                examples.append(Example(f"{task}-{ex.user_id}", ex.documents, ex.instruction, ex.answer))
    return examples
