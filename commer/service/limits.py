"""The service's bounds, apart from the app so that the command line can read their defaults and help without loading
it (every field is a ``commer serve`` option)."""

from __future__ import annotations

from dataclasses import dataclass

from commer.config import setting


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on requests and on the model queue; anything beyond them is a 4xx with a message, never a 500."""

    max_document_chars: int = setting(20_000, "Longest document, in characters.")
    max_documents_per_request: int = setting(64, "Most documents one request may add.")
    max_new_tokens: int = setting(256, "Largest max_new_tokens a request may ask.")
    max_instruction_chars: int = setting(4_000, "Longest instruction, in characters.")
    max_body_bytes: int = setting(8 * 1024 * 1024, "Largest request body (413 past it).")
    max_batch_size: int = setting(16, "Most generations decoded together.")
    batch_wait_ms: float = setting(5.0, "How long a generation waits for others to batch with.")
    max_queued: int = setting(256, "Most jobs waiting for the model, all tenants together (429 past it).")
    max_queued_per_tenant: int = setting(64, "Most jobs of one tenant waiting for the model (429 past it).")
    max_top_k: int = setting(1024, "Largest top_k a generate request may ask of retrieval-merge.")
    bm25_merge: bool = setting(
        False,
        "Let retrieval-merge rank a user's documents by BM25 over their stored texts (merge.by = 'bm25'): off unless "
        "the operator chooses it, since it reads users' texts at every such request.",
    )
