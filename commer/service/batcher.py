"""The model worker: one thread does all model work, batching concurrent generations into shared forward passes.

Torch is never called from two threads at once: compressions and generations are jobs on one queue, run by one
thread. Generation jobs that arrive within ``wait_ms`` of each other (up to ``max_batch_size``) are decoded together,
one forward pass per step for the whole batch; each row's token ids are handed to its request's asyncio queue with
``loop.call_soon_threadsafe``. Compression jobs that arrive while a batch decodes run between two decoding steps, so
adding a document never waits for a long generation.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from commer.merge import ProfileState
from commer.pipeline import Personalizer


class PromptTooLongError(ValueError):
    """An instruction plus the tokens asked for do not fit the backbone's context."""


@dataclass
class GenerationJob:
    """One generate request. The worker puts on ``queue`` (through ``loop``): ``"start"`` when the request is
    admitted, then token ids, then ``None`` at the end, or an exception instead."""

    profile: ProfileState | None
    instruction: str
    max_new_tokens: int
    temperature: float
    top_p: float
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    prompt_length: int = 0

    def send(self, item: Any) -> None:
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass
class _Call:
    """Any other model work (compression, tokenization): run on the worker thread, result through a Future."""

    fn: Callable[[], Any]
    future: Future


@dataclass(frozen=True)
class BatchStats:
    """Reported after each batch, for metrics."""

    size: int
    steps: int
    seconds: float


class ModelWorker:
    """Owns the personalizer; ``submit`` / ``generate`` from any thread or event loop.

    Args:
        max_batch_size: most generations decoded together.
        wait_ms: how long the first request of a batch waits for others to join it.
        on_batch: called on the worker thread after every batch (metrics).
    """

    def __init__(
        self,
        personalizer: Personalizer,
        max_batch_size: int = 16,
        wait_ms: float = 5.0,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or wait_ms < 0:
            raise ValueError(f"need max_batch_size >= 1 and wait_ms >= 0, got {max_batch_size}, {wait_ms}")
        self.personalizer = personalizer
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self.on_batch = on_batch
        self.context = personalizer.model.max_length
        self.num_embeddings = personalizer.shape[0]
        self._jobs: queue.Queue[GenerationJob | _Call | None] = queue.Queue()
        self._waiting: deque[GenerationJob] = deque()  # admitted, not yet in a batch
        self._thread: threading.Thread | None = None

    # -- client side ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="commer-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the worker thread (between decoding steps if a batch is running)."""
        future: Future = Future()
        self._jobs.put(_Call(fn, future))
        return future

    def compress(self, texts: Sequence[str]) -> Future:
        """``personalizer.compress(texts)`` on the worker thread."""
        return self.submit(lambda: self.personalizer.compress(list(texts)))

    def generate(self, job: GenerationJob) -> None:
        """Queue a generation; its results arrive on ``job.queue``."""
        self._jobs.put(job)

    @property
    def queue_depth(self) -> int:
        return self._jobs.qsize() + len(self._waiting)

    # -- worker side ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            item = self._waiting.popleft() if self._waiting else self._jobs.get()
            if item is None:
                self._fail_waiting(RuntimeError("the model worker stopped"))
                return
            if isinstance(item, _Call):
                self._call(item)
                continue
            if not self._admit(item):
                continue
            batch = self._collect(item)
            if batch is None:
                return
            self._decode(batch)

    def _call(self, call: _Call) -> None:
        if not call.future.set_running_or_notify_cancel():
            return
        try:
            call.future.set_result(call.fn())
        except BaseException as err:  # noqa: BLE001 - the caller gets it
            call.future.set_exception(err)

    def _admit(self, job: GenerationJob) -> bool:
        """Tokenize the prompt (here, as the tokenizer is not safe to share across threads) and check it fits."""
        if job.prompt_length:
            return True
        if job.cancelled.is_set():
            return False
        try:
            job.prompt_length = len(self.personalizer.collator.encode_prompt(job.instruction))
        except Exception as err:  # noqa: BLE001 - reported to the request
            job.send(err)
            return False
        need = self.num_embeddings + job.prompt_length + job.max_new_tokens
        if need > self.context:
            job.send(
                PromptTooLongError(
                    f"the instruction takes {job.prompt_length} tokens; with K={self.num_embeddings} soft-prompt "
                    f"positions and max_new_tokens={job.max_new_tokens} that is {need} positions, over the "
                    f"backbone's context of {self.context}: shorten the instruction or ask for fewer tokens"
                )
            )
            return False
        return True

    def _fits(self, batch: list[GenerationJob], job: GenerationJob) -> bool:
        """Rows share one padded prompt width and one step count: the batch's widest prompt plus its longest answer
        must fit the context."""
        width = max(job.prompt_length, *(j.prompt_length for j in batch))
        steps = max(job.max_new_tokens, *(j.max_new_tokens for j in batch))
        return self.num_embeddings + width + steps <= self.context

    def _collect(self, first: GenerationJob) -> list[GenerationJob] | None:
        batch = [first]
        deferred: list[GenerationJob] = []
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch_size:
            if self._waiting:
                item: GenerationJob | _Call | None = self._waiting.popleft()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            if item is None:
                self._fail_waiting(RuntimeError("the model worker stopped"), batch + deferred)
                return None
            if isinstance(item, _Call):
                self._call(item)
            elif self._admit(item):
                (batch if self._fits(batch, item) else deferred).append(item)
        # Deferred jobs go first next time, ahead of anything newer.
        self._waiting.extendleft(reversed(deferred))
        return batch

    def _decode(self, batch: list[GenerationJob]) -> None:
        batch = [j for j in batch if not j.cancelled.is_set()]
        if not batch:
            return
        start = time.perf_counter()
        steps = 0
        for job in batch:
            job.send("start")
        remaining = [j.max_new_tokens for j in batch]
        open_rows = [True] * len(batch)
        try:
            stream = self.personalizer.stream(
                [j.profile for j in batch],
                [j.instruction for j in batch],
                max_new_tokens=max(remaining),
                temperature=[j.temperature for j in batch],
                top_p=[j.top_p for j in batch],
            )
            for step in stream:
                steps += 1
                for i, (job, token) in enumerate(zip(batch, step, strict=True)):
                    if not open_rows[i]:
                        continue
                    if token is None or job.cancelled.is_set():
                        open_rows[i] = False
                        job.send(None)
                        continue
                    job.send(token)
                    remaining[i] -= 1
                    if remaining[i] == 0 or token == self.personalizer.tokenizer.eos_token_id:
                        open_rows[i] = False
                        job.send(None)
                if not any(open_rows):
                    break
                self._run_pending_calls()
        except Exception as err:  # noqa: BLE001 - every request of the batch learns why
            for i, job in enumerate(batch):
                if open_rows[i]:
                    open_rows[i] = False
                    job.send(err)
        for i, job in enumerate(batch):
            if open_rows[i]:
                job.send(None)
        if self.on_batch is not None:
            self.on_batch(BatchStats(len(batch), steps, time.perf_counter() - start))

    def _run_pending_calls(self) -> None:
        """Run queued compressions now; park generations (and a stop) for after the batch."""
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Call):
                self._call(item)
            elif item is None:
                self._jobs.put(None)
                return
            else:
                self._waiting.append(item)

    def _fail_waiting(self, err: Exception, extra: Sequence[GenerationJob] = ()) -> None:
        for job in [*extra, *self._waiting]:
            job.send(err)
        self._waiting.clear()
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, GenerationJob):
                item.send(err)
            elif isinstance(item, _Call):
                item.future.set_exception(err)
