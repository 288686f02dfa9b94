"""The tensors a model step reads. Built by ``commer.text``; the models never see text."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One batch of ``B`` examples.

    ``doc_*`` hold every document of the batch, right-padded, one row per document; ``doc_owner`` says which example
    each belongs to (an example may own none). ``input_ids`` is each example's prompt (for training also its answer),
    right-padded; ``labels`` is -100 everywhere but on answer tokens.
    """

    doc_ids: torch.Tensor  # (n_docs, L_doc) long
    doc_mask: torch.Tensor  # (n_docs, L_doc) bool
    doc_owner: torch.Tensor  # (n_docs,) long, in [0, B)
    input_ids: torch.Tensor  # (B, L) long
    input_mask: torch.Tensor  # (B, L) bool
    labels: torch.Tensor | None = None  # (B, L) long, -100 where no loss

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: _to(getattr(self, f.name), device) for f in fields(self)})


def _to(value: torch.Tensor | None, device):
    return None if value is None else value.to(device)
