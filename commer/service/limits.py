"""The service's bounds, apart from the app so that the command line can read their defaults without loading it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServiceLimits:
    """Bounds on requests and on the model queue; anything beyond them is a 4xx with a message, never a 500."""

    max_document_chars: int = 20_000
    max_documents_per_request: int = 64
    max_new_tokens: int = 256
    max_instruction_chars: int = 4_000
    max_body_bytes: int = 8 * 1024 * 1024
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_queued: int = 256  # jobs waiting for the model, all tenants together (429 past it)
    max_queued_per_tenant: int = 64  # jobs of one tenant waiting for the model (429 past it)
    max_active_batches: int = 2  # batches decoding at once, steps interleaved
