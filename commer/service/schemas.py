"""The HTTP API's request schemas and path parameters. The bounds come from ``ServiceLimits``, so the request models
are built per app (``request_models``); ``strict`` everywhere: "3" is not a number, "yes" not a boolean."""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time.

from dataclasses import dataclass
from typing import Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from commer.service.limits import ServiceLimits
from commer.service.worker import check_sampling

# User and document ids travel in URL paths: a conservative alphabet keeps them unambiguous there.
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@:+-]*$"
MAX_ID_CHARS = 128
UserId = Path(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
DocId = Path(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)


def _checked_text(text: str, what: str) -> str:
    """A text worth sending to the model: not blank, and encodable (no lone surrogates)."""
    if not text.strip():
        raise ValueError(f"{what} is blank")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"{what} is not valid Unicode (lone surrogate)") from err
    return text


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one app."""

    add_documents: type[BaseModel]
    generate: type[BaseModel]


def request_models(limits: ServiceLimits) -> RequestModels:
    """The request bodies, bounded by ``limits``."""

    class DocumentIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        text: str = Field(min_length=1, max_length=limits.max_document_chars, description="The document's text.")
        id: str | None = Field(
            None, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN, description="Default: SHA-256 of text."
        )

        @field_validator("text")
        @classmethod
        def _text(cls, text: str) -> str:
            return _checked_text(text, "document text")

    class AddDocuments(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        documents: list[DocumentIn] = Field(min_length=1, max_length=limits.max_documents_per_request)

    class MergeIn(BaseModel):
        """Retrieval-merge: mean only the ``top_k`` documents most relevant to the instruction, ranked ``by`` the
        cosine of their compressions with the instruction's (``dense``) or BM25 over their stored texts (``bm25``,
        where the server allows it); the mean of all where the top ``k`` do not stand out by ``min_margin``
        (``commer.merge.top_k_indices``)."""

        model_config = ConfigDict(extra="forbid", strict=True)
        top_k: int = Field(ge=1, le=limits.max_top_k)
        by: Literal["dense", "bm25"] = "dense"
        min_margin: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False)

        @field_validator("by")
        @classmethod
        def _by(cls, by: str) -> str:
            if by == "bm25" and not limits.bm25_merge:
                raise ValueError("BM25 ranking reads stored texts and is off on this server (serve --bm25-merge)")
            return by

    class GenerateIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        instruction: str = Field(min_length=1, max_length=limits.max_instruction_chars)
        max_new_tokens: int = Field(32, ge=1, le=limits.max_new_tokens)
        temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
        top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
        stream: bool = False
        merge: MergeIn | None = None

        @field_validator("instruction")
        @classmethod
        def _instruction(cls, text: str) -> str:
            return _checked_text(text, "instruction")

        @model_validator(mode="after")
        def _sampling(self) -> "GenerateIn":
            check_sampling(self.temperature, self.top_p)  # as the model will see them: in float32
            return self

    return RequestModels(AddDocuments, GenerateIn)
