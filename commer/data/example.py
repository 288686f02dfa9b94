"""The one example type every dataset yields."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    """A user's documents, a request to them, and (for training and evaluation) the gold answer."""

    user_id: str
    documents: list[str] = field(default_factory=list)
    instruction: str = ""
    answer: str = ""
