"""The model worker: one thread does all model work, batching concurrent generations into shared forward passes.

Torch is never called from two threads at once: compressions and generations are jobs queued per tenant and run by one
thread, which hands each row's token ids to its request's asyncio queue with ``loop.call_soon_threadsafe``.

- **Bounded.** At most ``max_queued`` jobs wait, and at most ``max_queued_per_tenant`` of one tenant; past that
  ``submit`` and ``generate`` raise ``QueueFullError`` (the service answers 429).
- **Fair.** Tenants are served round-robin: a batch takes the oldest generation of each waiting tenant in turn, and one
  compression of each tenant runs between two rounds of decoding steps. Up to ``max_active_batches`` batches decode at
  once, their steps interleaved; a new one takes only tenants with no row decoding, so a tenant's flood delays another
  tenant's request by one step per step, not by the flood's length.
- **Isolated.** A generation is checked alone before it joins a batch (its prompt is tokenized and must fit the context,
  its profile the model's shape, its sampling parameters the bounds in float32, the precision the model samples in).
  A batch that still fails before its first token is decoded again row by row, so only the row at fault gets the
  error.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Generator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from commer.merge import ProfileState
from commer.serving import Personalizer
from commer.text import Prompt

log = logging.getLogger("commer.service")


class RejectedGenerationError(ValueError):
    """A generation the model cannot serve as asked: the request's own fault, reported to it alone."""


class PromptTooLongError(RejectedGenerationError):
    """An instruction plus the tokens asked for do not fit the backbone's context."""


class QueueFullError(RuntimeError):
    """Too many jobs wait for the model, in all or from one tenant: retry later."""


def check_sampling(temperature: float, top_p: float) -> None:
    """Refuse sampling parameters that decoding would refuse, as it sees them: in float32, where a top_p of 1e-46 is
    0."""
    t32, p32 = (torch.tensor(x, dtype=torch.float32).item() for x in (temperature, top_p))
    if not 0 <= t32 < math.inf:
        raise RejectedGenerationError(f"temperature must be finite and >= 0, got {temperature!r}")
    if not 0 < p32 <= 1:
        raise RejectedGenerationError(
            f"top_p must be > 0 and <= 1 in float32, the precision the model samples in: {top_p!r} is {p32!r} there"
        )


@dataclass
class GenerationJob:
    """One generate request of ``tenant``. The worker puts on ``queue`` (through ``loop``): ``"start"`` when decoding
    has produced the first token, then token ids, then ``None`` at the end, or an exception instead."""

    profile: ProfileState | None
    instruction: Prompt  # an instruction, or chat messages
    max_new_tokens: int
    temperature: float
    top_p: float
    loop: asyncio.AbstractEventLoop
    tenant: str = ""
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    seed: int | None = None  # this row's sampling seed (None: the global random source)
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
    """Reported after each batch, for metrics: its rows' tenants, decoding steps and wall time."""

    tenants: tuple[str, ...]
    steps: int
    seconds: float

    @property
    def size(self) -> int:
        return len(self.tenants)


T = TypeVar("T")


class _TenantQueues(Generic[T]):
    """A FIFO per tenant; ``pop`` serves the tenants round-robin."""

    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[T]] = OrderedDict()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def count(self, tenant: str) -> int:
        return len(self._queues.get(tenant, ()))

    def push(self, tenant: str, item: T, front: bool = False) -> None:
        queue = self._queues.setdefault(tenant, deque())
        queue.appendleft(item) if front else queue.append(item)
        self._size += 1

    def pop(self, skip: Collection[str] = ()) -> tuple[str, T] | None:
        """The oldest item of the next tenant in turn (not in ``skip``); that tenant then goes last."""
        for tenant, queue in self._queues.items():
            if tenant in skip:
                continue
            item = queue.popleft()
            self._size -= 1
            if queue:
                self._queues.move_to_end(tenant)
            else:
                del self._queues[tenant]
            return tenant, item
        return None

    def discard(self, dead: Callable[[T], bool]) -> None:
        """Drop the items ``dead`` selects (requests whose client went away)."""
        for tenant in list(self._queues):
            kept = deque(x for x in self._queues[tenant] if not dead(x))
            self._size -= len(self._queues[tenant]) - len(kept)
            if kept:
                self._queues[tenant] = kept
            else:
                del self._queues[tenant]

    def drain(self) -> list[T]:
        items = [x for queue in self._queues.values() for x in queue]
        self._queues.clear()
        self._size = 0
        return items


@dataclass
class _Batch:
    """Rows decoding together: ``steps`` yields one token (or ``None``) per row per step."""

    jobs: list[GenerationJob]
    steps: Generator[list[int | None], None, None]
    remaining: list[int]
    open: list[bool]
    started: float = field(default_factory=time.perf_counter)
    count: int = 0


class ModelWorker:
    """Owns the personalizer; ``submit`` / ``generate`` from any thread or event loop.

    Args:
        max_batch_size: most generations decoded together.
        wait_ms: how long the first request of a batch waits for others to join it (when nothing else decodes).
        on_batch: called on the worker thread after every batch (metrics).
        max_queued: most jobs waiting for the model, all tenants together.
        max_queued_per_tenant: most jobs of one tenant waiting for the model.
        max_active_batches: most batches decoding at once (steps interleaved; each holds its own KV cache).
    """

    def __init__(
        self,
        personalizer: Personalizer,
        max_batch_size: int = 16,
        wait_ms: float = 5.0,
        on_batch: Callable[[BatchStats], None] | None = None,
        *,
        max_queued: int = 256,
        max_queued_per_tenant: int = 64,
        max_active_batches: int = 2,
    ) -> None:
        if min(max_batch_size, max_queued, max_queued_per_tenant, max_active_batches) < 1 or wait_ms < 0:
            raise ValueError(
                "need wait_ms >= 0 and max_batch_size, max_queued, max_queued_per_tenant, max_active_batches >= 1, "
                f"got {wait_ms}, {max_batch_size}, {max_queued}, {max_queued_per_tenant}, {max_active_batches}"
            )
        self.personalizer = personalizer
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self.on_batch = on_batch
        self.max_queued = max_queued
        self.max_queued_per_tenant = max_queued_per_tenant
        self.max_active_batches = max_active_batches
        self.context = personalizer.model.max_length
        self.num_embeddings = personalizer.shape[0]
        self._cond = threading.Condition()  # guards the queues and _stopping
        self._calls: _TenantQueues[_Call] = _TenantQueues()
        self._jobs: _TenantQueues[GenerationJob] = _TenantQueues()  # not yet in a batch
        self._active: list[_Batch] = []  # worker thread only
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- client side ----------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._run, name="commer-model-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the thread; whatever still waits or decodes fails with ``RuntimeError``."""
        if self._thread is not None:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()
            self._thread.join(timeout)
            self._thread = None

    def submit(self, fn: Callable[[], Any], tenant: str = "") -> Future:
        """Run ``fn()`` on the worker thread (between decoding steps if batches are running)."""
        future: Future = Future()
        self._enqueue(self._calls, tenant, _Call(fn, future))
        return future

    def generate(self, job: GenerationJob) -> None:
        """Queue a generation; its results arrive on ``job.queue``."""
        self._enqueue(self._jobs, job.tenant, job)

    @property
    def queue_depth(self) -> int:
        """Jobs waiting (not yet running or decoding)."""
        return len(self._calls) + len(self._jobs)

    def _enqueue(self, queues: _TenantQueues, tenant: str, item: _Call | GenerationJob) -> None:
        with self._cond:
            if self._stopping:
                raise RuntimeError("the model worker stopped")
            if self._full(tenant):
                self._calls.discard(lambda call: call.future.cancelled())
                self._jobs.discard(lambda job: job.cancelled.is_set())
                if reason := self._full(tenant):
                    raise QueueFullError(reason)
            queues.push(tenant, item)
            self._cond.notify_all()

    def _full(self, tenant: str) -> str | None:
        mine = self._calls.count(tenant) + self._jobs.count(tenant)
        if mine >= self.max_queued_per_tenant:
            return f"tenant {tenant!r} has {mine} requests waiting for the model, the most one tenant may queue"
        if self.queue_depth >= self.max_queued:
            return f"{self.queue_depth} requests are waiting for the model, the most it queues"
        return None

    # -- worker side ----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._stopping or self._calls or self._jobs or self._active):
                        self._cond.wait()
                    if self._stopping:
                        return
                self._run_calls()
                self._start_batches()
                for batch in list(self._active):
                    self._step(batch)
        finally:
            with self._cond:
                self._stopping = True
            self._fail_all(RuntimeError("the model worker stopped"))

    def _run_calls(self) -> None:
        """One round: the oldest waiting call of each tenant."""
        served: set[str] = set()
        while True:
            with self._cond:
                item = self._calls.pop(skip=served)
            if item is None:
                return
            served.add(item[0])
            call = item[1]
            if not call.future.set_running_or_notify_cancel():
                continue
            try:
                call.future.set_result(call.fn())
            except BaseException as err:  # noqa: BLE001 - the caller gets it
                call.future.set_exception(err)

    def _start_batches(self) -> None:
        """Form batches while fewer than ``max_active_batches`` decode, from tenants with no row decoding now."""
        while len(self._active) < self.max_active_batches:
            busy = {job.tenant for batch in self._active for job, o in zip(batch.jobs, batch.open, strict=True) if o}
            jobs = self._form_batch(busy, wait=not self._active)
            if not jobs:
                return
            self._open(jobs)

    def _form_batch(self, busy: set[str], wait: bool) -> list[GenerationJob]:
        """Round-robin over the tenants not ``busy``: each turn takes a tenant's oldest generation if it is admitted
        and fits beside the others. ``wait``: give others ``wait_ms`` to join (only when nothing decodes, which the
        wait would stall)."""
        batch: list[GenerationJob] = []
        skip = set(busy)
        deadline = math.inf
        while len(batch) < self.max_batch_size:
            with self._cond:
                item = self._jobs.pop(skip)
                if item is None:
                    remaining = deadline - time.monotonic()
                    if not (wait and batch) or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                    continue
            tenant, job = item
            if not self._admit(job):
                continue
            if batch and not self._fits(batch, job):
                with self._cond:
                    self._jobs.push(tenant, job, front=True)  # first in its tenant's turn next time
                skip.add(tenant)
                continue
            if not batch:
                deadline = time.monotonic() + self.wait_s
            batch.append(job)
        return batch

    def _admit(self, job: GenerationJob) -> bool:
        """Check one generation alone (here, as the tokenizer is not safe to share across threads); an error is sent
        to it and to no other request."""
        if job.cancelled.is_set():
            return False
        if job.prompt_length:  # admitted before, then deferred
            return True
        try:
            if job.max_new_tokens < 1:
                raise RejectedGenerationError(f"max_new_tokens must be >= 1, got {job.max_new_tokens}")
            check_sampling(job.temperature, job.top_p)
            self.personalizer.check_profile(job.profile)
            prompt_length = len(self.personalizer.collator.encode_prompt(job.instruction))
        except RejectedGenerationError as err:
            job.send(err)
            return False
        except ValueError as err:
            job.send(RejectedGenerationError(str(err)))
            return False
        except Exception as err:  # noqa: BLE001 - reported to the request
            job.send(err)
            return False
        need = self.num_embeddings + prompt_length + job.max_new_tokens
        if need > self.context:
            job.send(
                PromptTooLongError(
                    f"the instruction takes {prompt_length} tokens; with K={self.num_embeddings} soft-prompt "
                    f"positions and max_new_tokens={job.max_new_tokens} that is {need} positions, over the "
                    f"backbone's context of {self.context}: shorten the instruction or ask for fewer tokens"
                )
            )
            return False
        job.prompt_length = prompt_length
        return True

    def _fits(self, batch: list[GenerationJob], job: GenerationJob) -> bool:
        """Rows share one padded prompt width and one step count: the batch's widest prompt plus its longest answer
        must fit the context."""
        width = max(job.prompt_length, *(j.prompt_length for j in batch))
        steps = max(job.max_new_tokens, *(j.max_new_tokens for j in batch))
        return self.num_embeddings + width + steps <= self.context

    def _open(self, jobs: list[GenerationJob]) -> None:
        """Start decoding ``jobs`` together (the work happens in ``_step``)."""
        steps = self.personalizer.stream(
            [j.profile for j in jobs],
            [j.instruction for j in jobs],
            max_new_tokens=max(j.max_new_tokens for j in jobs),
            temperature=[j.temperature for j in jobs],
            top_p=[j.top_p for j in jobs],
            seed=None if all(j.seed is None for j in jobs) else [j.seed for j in jobs],
        )
        self._active.append(_Batch(jobs, steps, [j.max_new_tokens for j in jobs], [True] * len(jobs)))

    def _step(self, batch: _Batch) -> None:
        """One decoding step of ``batch``; a batch that ends leaves ``_active``."""
        try:
            step = next(batch.steps, None)
        except Exception as err:  # noqa: BLE001 - reported to the rows it concerns
            self._active.remove(batch)
            rows = [job for job, o in zip(batch.jobs, batch.open, strict=True) if o]
            if batch.count == 0 and len(rows) > 1:
                # Nothing was sent yet: decode each row alone, so that the error reaches only the row at fault.
                log.warning(
                    "a batch of %d rows failed before its first token (%s): decoding them one by one", len(rows), err
                )
                for job in rows:
                    self._open([job])
                return
            self._finish(batch, [(job, err) for job in rows])
            return
        ends: list[tuple[GenerationJob, Exception | None]] = []  # rows whose answer ends with this step
        if step is not None:
            if batch.count == 0:
                for job in batch.jobs:
                    job.send("start")
            batch.count += 1
            eos = self.personalizer.tokenizer.eos_token_id
            for i, (job, token) in enumerate(zip(batch.jobs, step, strict=True)):
                if not batch.open[i]:
                    continue
                if token is not None and not job.cancelled.is_set():
                    job.send(token)
                    batch.remaining[i] -= 1
                if token is None or job.cancelled.is_set() or batch.remaining[i] == 0 or token == eos:
                    batch.open[i] = False
                    ends.append((job, None))
        if step is None or not any(batch.open):
            self._active.remove(batch)
            self._finish(batch, ends)
        else:
            for job, _ in ends:
                job.send(None)

    def _finish(self, batch: _Batch, ends: list[tuple[GenerationJob, Exception | None]]) -> None:
        """Report the batch, then end its rows (``ends``: how, ``None`` for a normal end; rows still open end too),
        so that a client holding its whole answer finds its batch in the metrics; free the decoding state."""
        if self.on_batch is not None:
            self.on_batch(
                BatchStats(tuple(j.tenant for j in batch.jobs), batch.count, time.perf_counter() - batch.started)
            )
        still_open = [(job, None) for job, o in zip(batch.jobs, batch.open, strict=True) if o]
        for job, end in [*ends, *still_open]:
            job.send(end)
        batch.open = [False] * len(batch.jobs)
        batch.steps.close()  # frees the batch's KV cache now

    def _fail_all(self, err: Exception) -> None:
        for batch in self._active:
            for job, is_open in zip(batch.jobs, batch.open, strict=True):
                if is_open:
                    job.send(err)
        self._active.clear()
        with self._cond:
            calls, jobs = self._calls.drain(), self._jobs.drain()
        for call in calls:
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(err)
        for job in jobs:
            job.send(err)
