"""Text -> token ids -> model ``Batch``es: the only place where text meets the model, below the models and the data.

ComMer reads each document separately (it is compressed on its own); prompt tuning reads the documents as text in
the prompt, ``Document 1: ... Document 2: ...`` then the instruction (appendix A.2 of the paper). ``check_context`` is
the one rule for what fits the backbone's context, whoever asks (collation, compression, decoding, the service).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from commer.batch import Batch
from commer.config import ComMerConfig
from commer.errors import CommerError

IGNORE_INDEX = -100  # the label of positions without loss (prompt, padding, soft prompt): PyTorch's default
# What the generator is asked: an instruction (one user turn), or chat messages [{"role": ..., "content": ...}, ...].
Prompt = str | Sequence[Mapping[str, str]]


@dataclass
class Example:
    """A user's documents, a request to them, and (for training and evaluation) the gold answer: the one example type
    every dataset yields."""

    user_id: str
    documents: list[str] = field(default_factory=list)
    instruction: str = ""
    answer: str = ""


class ContextTooLongError(CommerError, ValueError):
    """What the backbone would read at once (a document and its K slots, or a soft prompt, prompt and answer) does
    not fit its context."""


class EmptyTextError(CommerError, ValueError):
    """A document with no text to compress."""


def check_context(what: str, positions: int, max_length: int) -> None:
    """Refuse ``what`` when its ``positions`` exceed the backbone's context of ``max_length``."""
    if positions > max_length:
        raise ContextTooLongError(
            f"{what} needs {positions} positions, more than the backbone's context of {max_length}"
        )


def documents_as_text(documents: Sequence[str], instruction: str) -> str:
    """The prompt-tuning prompt: numbered documents, then the instruction."""
    if not documents:
        return instruction
    numbered = "\n".join(f"Document {i}: {doc}" for i, doc in enumerate(documents, start=1))
    return f"{numbered}\n\n{instruction}"


def _pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token lists into ``(n, L)`` ids and a bool mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


class Collator:
    """Tokenizes examples for the method in ``config`` and checks they fit the backbone's context."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: ComMerConfig, max_length: int) -> None:
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token: answers could not be terminated")
        self.tokenizer = tokenizer
        self.config = config
        self.max_length = max_length
        self.use_chat = config.prompt_format == "chat" and tokenizer.chat_template is not None
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # -- pieces, also used by the text-level ``Personalizer`` ---------------------------------------------------------
    def encode_documents(
        self, documents: Sequence[str], owner: str = "", names: Sequence[str] | None = None
    ) -> list[list[int]]:
        """Token ids of each document; empty or over-long documents raise an error naming them (``document i of
        user OWNER``, or ``names[i]``)."""
        where = f" of user {owner!r}" if owner else ""
        k = self.config.num_embeddings
        encoded = []
        for i, doc in enumerate(documents):
            name = names[i] if names is not None else f"document {i}{where}"
            if not isinstance(doc, str) or not doc.strip():
                raise EmptyTextError(f"{name} is empty: a document needs some text to compress")
            ids = self.tokenizer(doc, add_special_tokens=False)["input_ids"]
            check_context(
                f"{name} has {len(ids)} tokens; with K={k} compression slots it",
                len(ids) + k,
                self.max_length,
            )
            encoded.append(ids)
        return encoded

    def encode_prompt(self, instruction: Prompt) -> list[int]:
        """Token ids the generator reads after the soft prompt, ending where the answer starts. An instruction is one
        user turn; chat messages go through the chat template as they are (without one: ``Question: ...`` and
        ``Answer: ...`` lines, so that one user message reads as the instruction would)."""
        messages = [{"role": "user", "content": instruction}] if isinstance(instruction, str) else list(instruction)
        if self.use_chat:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        turns = {"user": "Question: ", "assistant": "Answer: ", "system": ""}
        text = "\n".join(turns[m["role"]] + m["content"] for m in messages) + "\nAnswer:"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode_answer(self, answer: str) -> list[int]:
        text = answer if self.use_chat else " " + answer
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]

    def pad(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return _pad(rows, self.pad_id)

    # -- whole batches ------------------------------------------------------------------------------------------------
    def __call__(self, examples: Sequence[Example], with_answers: bool = True) -> Batch:
        """Collate ``examples``; ``with_answers=False`` gives prompts only (for generation)."""
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        commer = self.config.method == "commer"
        docs, owner, inputs, labels = [], [], [], []
        for b, ex in enumerate(examples):
            encoded_docs = self.encode_documents(ex.documents, ex.user_id)
            if commer:
                docs += encoded_docs
                owner += [b] * len(encoded_docs)
                prompt = self.encode_prompt(ex.instruction)
            else:
                prompt = self.encode_prompt(documents_as_text(ex.documents, ex.instruction))
            answer = self.encode_answer(ex.answer) if with_answers else []
            k = self.config.num_embeddings
            prefix_len = k * len(encoded_docs) if commer and self.config.merge == "concat" else k
            check_context(
                f"example of user {ex.user_id!r}: the generator",
                prefix_len + len(prompt) + len(answer),
                self.max_length,
            )
            inputs.append(prompt + answer)
            labels.append([IGNORE_INDEX] * len(prompt) + answer)
        doc_ids, doc_mask = self.pad(docs)
        input_ids, input_mask = self.pad(inputs)
        label_ids = None
        if with_answers:
            label_ids, _ = _pad(labels, IGNORE_INDEX)
        return Batch(
            doc_ids=doc_ids,
            doc_mask=doc_mask,
            doc_owner=torch.tensor(owner, dtype=torch.long),
            input_ids=input_ids,
            input_mask=input_mask,
            labels=label_ids,
        )
