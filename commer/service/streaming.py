"""How a generation request reads its answer: queue the job, wait for its first step (so that an error is still a
status code), then its tokens; token ids -> text deltas; server-sent events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from commer.service.worker import GenerationJob, ModelWorker


async def start_generation(
    worker: ModelWorker, job: GenerationJob, on_token: Callable[[], None] = lambda: None
) -> AsyncIterator[int]:
    """Queue ``job`` and wait until it has decoded its first step; an error before that (a refused row, a full
    queue) is raised here. Returns the job's token ids (``on_token`` is called for each); a consumer that stops early
    frees the job's row."""
    worker.generate(job)
    try:
        first = await job.queue.get()
        if isinstance(first, Exception):
            raise first
    except BaseException:
        job.cancelled.set()
        raise

    async def tokens() -> AsyncIterator[int]:
        try:
            while (item := await job.queue.get()) is not None:
                if isinstance(item, Exception):
                    raise item
                on_token()
                yield item
        finally:
            job.cancelled.set()  # a client that went away frees its row

    return tokens()


class Detokenizer:
    """Token ids -> text deltas. Decoding the whole answer each time (answers are short) is what keeps multi-token
    characters and word-joining spaces right; an incomplete UTF-8 sequence is held back until it completes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text += delta
        return delta


def sse(event: str | None, data: dict[str, Any] | str) -> str:
    """One server-sent event (``event: None``: a bare ``data:`` line, as OpenAI's stream sends)."""
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"
