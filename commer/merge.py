"""Merging a user's document compressions into one soft prompt.

``mean`` is the method: a ``(K, D)`` prompt whatever the number of documents, order-agnostic, and updatable in O(1)
through ``ProfileState`` (a running sum and count). ``concat`` is the paper's variant (Figure 7): ``K * n`` vectors.
Retrieval-merge (``top_k_profile``) means only the ``k`` documents most relevant to a request: query-aware, at
O(documents) per request instead of O(1).
"""

from __future__ import annotations

import struct

import numpy as np
import torch


def merge_batch(
    compressions: torch.Tensor, owner: torch.Tensor, batch_size: int, strategy: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the compressions of many users' documents, each user's separately.

    Args:
        compressions: ``(n_docs, K, D)``, all documents of the batch.
        owner: ``(n_docs,)``, the index in ``[0, batch_size)`` of the user each document belongs to.
        batch_size: number of users ``B``; a user may own no document.
    Returns:
        ``prefix (B, P, D)`` and ``prefix_mask (B, P)`` (bool). ``mean``: ``P = K``; ``concat``: ``P = K * max_n``.
        A user without documents has an all-False mask (``ComMer.soft_prompt`` then gives the task prompt, or nothing
        with the paper's bridge "none").
    """
    n_docs, k, d = compressions.shape
    counts = torch.bincount(owner, minlength=batch_size)  # (B,)
    if strategy == "mean":
        sums = compressions.new_zeros(batch_size, k, d).index_add(0, owner, compressions)
        prefix = sums / counts.clamp(min=1).to(sums.dtype)[:, None, None]
        mask = (counts > 0)[:, None].expand(batch_size, k)
        return prefix, mask
    if strategy == "concat":
        max_n = int(counts.max()) if n_docs else 0
        # slot of each document among its owner's documents, in batch order
        order = torch.argsort(owner, stable=True)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.empty_like(owner)
        slot[order] = torch.arange(n_docs, device=owner.device) - starts[owner[order]]
        prefix = compressions.new_zeros(batch_size, max_n, k, d)
        prefix[owner, slot] = compressions
        mask = torch.zeros(batch_size, max_n, k, dtype=torch.bool, device=compressions.device)
        mask[owner, slot] = True
        return prefix.reshape(batch_size, max_n * k, d), mask.reshape(batch_size, max_n * k)  # (B, n*K, D)
    raise ValueError(f"merge strategy must be 'mean' or 'concat', got {strategy!r}")


class ProfileState:
    """A user's merged soft prompt as a running sum and count: adding or removing a document is O(1).

    The sum is kept in float64 so that any sequence of ``add`` and ``remove`` stays equal to the mean recomputed from
    the remaining documents (float32 would drift after many removals).
    """

    _HEADER = struct.Struct("<4sIII")  # magic, count, K, D
    _MAGIC = b"CMP1"

    def __init__(self, num_embeddings: int, hidden_size: int) -> None:
        self.sum = torch.zeros(num_embeddings, hidden_size, dtype=torch.float64)
        self.count = 0

    @classmethod
    def from_compressions(cls, compressions: torch.Tensor) -> ProfileState:
        """Build a state from ``(n, K, D)`` compressions."""
        state = cls(compressions.shape[1], compressions.shape[2])
        for c in compressions:
            state.add(c)
        return state

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.sum.shape)

    def _check(self, compression: torch.Tensor) -> torch.Tensor:
        if tuple(compression.shape) != self.shape:
            raise ValueError(f"compression has shape {tuple(compression.shape)}, this profile holds {self.shape}")
        return compression.detach().to("cpu", torch.float64)

    def add(self, compression: torch.Tensor) -> None:
        """Add one document's ``(K, D)`` compression."""
        self.sum += self._check(compression)
        self.count += 1

    def remove(self, compression: torch.Tensor) -> None:
        """Remove one document's ``(K, D)`` compression (the same tensor that was added)."""
        if self.count == 0:
            raise ValueError("cannot remove a document from an empty profile")
        self.sum -= self._check(compression)
        self.count -= 1
        if self.count == 0:
            self.sum.zero_()  # no rounding residue left behind in an empty profile

    def mean(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """The merged ``(K, D)`` soft prompt, or ``None`` for a profile without documents."""
        if self.count == 0:
            return None
        return (self.sum / self.count).to(dtype)

    def to_bytes(self) -> bytes:
        k, d = self.shape
        return self._HEADER.pack(self._MAGIC, self.count, k, d) + self.sum.numpy().astype("<f8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> ProfileState:
        magic, count, k, d = cls._HEADER.unpack_from(data)
        if magic != cls._MAGIC or len(data) != cls._HEADER.size + 8 * k * d:
            raise ValueError("not a serialized ProfileState (bad header or length)")
        state = cls(k, d)
        state.sum = torch.from_numpy(np.frombuffer(data, dtype="<f8", offset=cls._HEADER.size).reshape(k, d).copy())
        state.count = count
        return state

    def __repr__(self) -> str:
        return f"ProfileState(count={self.count}, K={self.shape[0]}, D={self.shape[1]})"


def stack_profiles(
    profiles: list[ProfileState | None], num_embeddings: int, hidden_size: int, dtype: torch.dtype, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn users' profiles into a generator prefix ``(B, K, D)`` and mask ``(B, K)``; empty profiles are masked."""
    prefix = torch.zeros(len(profiles), num_embeddings, hidden_size, dtype=dtype, device=device)
    mask = torch.zeros(len(profiles), num_embeddings, dtype=torch.bool, device=device)
    for i, profile in enumerate(profiles):
        mean = profile.mean(dtype) if profile is not None else None
        if mean is not None:
            prefix[i] = mean.to(device)
            mask[i] = True
    return prefix, mask


def dense_scores(query: torch.Tensor, compressions: torch.Tensor) -> torch.Tensor:
    """Relevance of each document to a request: the cosine similarity of its ``(K, D)`` compression with the
    request's own compression (by the same compressor), both flattened to ``K * D`` vectors. Returns ``(n,)``.

    Not centred on the mean of the user's compressions: centring found a PerLTQA question's referenced memory first
    less often (among 8 memories, 28% of 1,362 training-persona questions against 43% uncentred; docs/results.md,
    session 7)."""
    flat = compressions.detach().to("cpu", torch.float64).flatten(1)  # (n, K*D)
    q = query.detach().to("cpu", torch.float64).flatten()
    return torch.nn.functional.cosine_similarity(flat, q[None], dim=1)


def top_k_indices(scores: torch.Tensor, k: int, min_margin: float = 0.0) -> torch.Tensor:
    """The indices of the ``k`` best of ``(n,)`` scores (ties: the earlier one), in their original order; all ``n``
    when ``k >= n``.

    ``min_margin`` in ``[0, 1]`` keeps the top ``k`` only where the ranking is sure of them: the ``k``-th best score
    must exceed the next one by at least ``min_margin`` times the best score, else all ``n`` are kept (the mean). Why:
    a soft prompt built on a wrong document costs more than the mean of all (PerLTQA, docs/results.md), and BM25's
    margin says when its first pick is likely right. ``0`` always keeps the top ``k``. The scale is the signal's own
    (BM25 and cosine scores differ): choose it on validation users."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    if not 0.0 <= min_margin <= 1.0:
        raise ValueError(f"min_margin must be in [0, 1], got {min_margin}")
    n = scores.shape[0]
    if k >= n:
        return torch.arange(n)
    order = torch.argsort(scores, descending=True, stable=True)
    if min_margin > 0:
        best, kth, next_ = (float(scores[i]) for i in (order[0], order[k - 1], order[k]))
        if best <= 0 or kth - next_ < min_margin * best:
            return torch.arange(n)
    return order[:k].sort().values


def top_k_profile(compressions: torch.Tensor, scores: torch.Tensor, k: int, min_margin: float = 0.0) -> ProfileState:
    """Retrieval-merge: the profile of the ``k`` best-scored of ``(n, K, D)`` compressions (``top_k_indices``, with its
    ``min_margin``). With ``k >= n`` every document is kept in its order, so the result equals the running mean
    exactly."""
    n = compressions.shape[0]
    if scores.shape != (n,):
        raise ValueError(f"{tuple(scores.shape)} scores for {n} compressions")
    return ProfileState.from_compressions(compressions[top_k_indices(scores, k, min_margin)])
