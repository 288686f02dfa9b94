"""The model worker: one thread does all model work, batching concurrent generations into shared forward passes.

Torch is never called from two threads at once: compressions and generations are jobs queued per tenant and run by one
thread, which hands each row's token ids to its request's asyncio queue with ``loop.call_soon_threadsafe``.

- **Bounded.** At most ``max_queued`` jobs wait, and at most ``max_queued_per_tenant`` of one tenant; past that
  ``submit`` and ``generate`` raise ``QueueFullError`` (the service answers 429).
- **Continuous.** Up to ``max_batch_size`` rows decode together, one forward pass per step; a row leaves as soon as
  its answer ends and a waiting generation takes its place at the next step (prefilled on its own, then joined to
  the running rows), so a request never waits for a running batch's longest row.
- **Fair.** Tenants are served round-robin: free rows go to the oldest generation of each waiting tenant in turn, and
  one compression of each tenant runs between two decoding steps. A tenant with no row decoding joins at the next
  step even when every row is taken (up to twice ``max_batch_size``), so one tenant's flood delays another tenant's
  request by a wider step, not by the flood's length.
- **Isolated.** A generation is checked alone before it joins (its prompt is tokenized and must fit the context, its
  profile the model's shape, its sampling parameters the bounds in float32, the precision the model samples in).
  Generations that still fail while being prefilled or picking their first token are prefilled again one by one, so
  only the row at fault gets the error; rows decode independently (own cache slots, positions and sampler), so one
  row never changes another's tokens.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Collection
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from commer.merge import ProfileState
from commer.model import DecodeRows, sample_next
from commer.serving import Personalizer, sampling_generators
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
    prompt_length: int = 0  # the instruction's tokens, set when admitted (usage reports count them)

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
    """Reported for each batch, the generations that joined the running rows together (one prefill), once its last
    row ends, for metrics: its rows' tenants, decoding steps (its longest answer) and wall time."""

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
class _Group:
    """Generations that joined the running rows together: reported as one ``BatchStats`` when its last row ends."""

    jobs: list[GenerationJob]
    open: int
    started: float = field(default_factory=time.perf_counter)
    steps: int = 0


@dataclass
class _Row:
    """One running generation: its job, its group and how many tokens it may still send."""

    job: GenerationJob
    group: _Group
    remaining: int
    sent: int = 0


def _sample(
    state: DecodeRows, temperature: torch.Tensor, top_p: torch.Tensor, generators: list[torch.Generator | None]
) -> torch.Tensor:
    """Each row's next token; rows without a seed draw from the global random source, all at once."""
    seeded = any(g is not None for g in generators)
    return sample_next(state.logits, temperature, top_p, generators if seeded else None)


@dataclass
class _Running:
    """The rows decoding now (worker thread only), with each row's next token, picked and not yet sent, and
    sampling parameters."""

    rows: list[_Row]
    state: DecodeRows
    next: torch.Tensor  # (B,)
    temperature: torch.Tensor  # (B,)
    top_p: torch.Tensor  # (B,)
    generators: list[torch.Generator | None]

    def pick(self) -> torch.Tensor:
        return _sample(self.state, self.temperature, self.top_p, self.generators)

    def join(self, other: _Running) -> _Running:
        return _Running(
            self.rows + other.rows,
            self.state.join(other.state),
            torch.cat([self.next, other.next]),
            torch.cat([self.temperature, other.temperature]),
            torch.cat([self.top_p, other.top_p]),
            self.generators + other.generators,
        )

    def select(self, keep: list[int]) -> _Running:
        index = torch.tensor(keep, dtype=torch.long)
        return _Running(
            [self.rows[i] for i in keep],
            self.state.select(keep),
            self.next[index],
            self.temperature[index],
            self.top_p[index],
            [self.generators[i] for i in keep],
        )


class ModelWorker:
    """Owns the personalizer; ``submit`` / ``generate`` from any thread or event loop.

    Args:
        max_batch_size: most generations decoding together (twice that while tenants with no row decoding join).
        wait_ms: how long a request that finds nothing decoding waits for others to prefill with it.
        on_batch: called on the worker thread when every row of a batch has ended (metrics).
        max_queued: most jobs waiting for the model, all tenants together.
        max_queued_per_tenant: most jobs of one tenant waiting for the model.
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
    ) -> None:
        if min(max_batch_size, max_queued, max_queued_per_tenant) < 1 or wait_ms < 0:
            raise ValueError(
                "need wait_ms >= 0 and max_batch_size, max_queued, max_queued_per_tenant >= 1, "
                f"got {wait_ms}, {max_batch_size}, {max_queued}, {max_queued_per_tenant}"
            )
        self.personalizer = personalizer
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000
        self.on_batch = on_batch
        self.max_queued = max_queued
        self.max_queued_per_tenant = max_queued_per_tenant
        self.context = personalizer.model.max_length
        self.num_embeddings = personalizer.shape[0]
        self._cond = threading.Condition()  # guards the queues and _stopping
        self._calls: _TenantQueues[_Call] = _TenantQueues()
        self._jobs: _TenantQueues[GenerationJob] = _TenantQueues()  # not yet decoding
        self._running: _Running | None = None  # worker thread only
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
        """Run ``fn()`` on the worker thread (between decoding steps if rows are decoding)."""
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
                    while not (self._stopping or self._calls or self._jobs or self._running):
                        self._cond.wait()
                    if self._stopping:
                        return
                self._run_calls()
                self._join_waiting()
                if self._running is not None:
                    self._step()
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

    def _join_waiting(self) -> None:
        """Fill the free rows with waiting generations, round-robin over tenants. When every row is taken, a tenant
        with no row decoding may still join, up to twice ``max_batch_size`` rows: a tenant's flood never makes
        another tenant wait for one of its answers to end. ``wait_ms``: when nothing decodes, the first generation
        waits that long for others to prefill with it (a wait would stall running rows)."""
        rows = self._running.rows if self._running is not None else []
        decoding = {row.job.tenant for row in rows}
        jobs: list[GenerationJob] = []
        deadline = math.inf
        while len(rows) + len(jobs) < 2 * self.max_batch_size:
            full = len(rows) + len(jobs) >= self.max_batch_size
            with self._cond:
                item = self._jobs.pop(skip=decoding | {j.tenant for j in jobs} if full else ())
                if item is None:
                    remaining = deadline - time.monotonic()
                    if rows or not jobs or remaining <= 0 or self._stopping:
                        break
                    self._cond.wait(remaining)
                    continue
            job = item[1]
            if not self._admit(job):
                continue
            if not jobs:
                deadline = time.monotonic() + self.wait_s
            jobs.append(job)
        if jobs:
            self._prefill(jobs)

    def _admit(self, job: GenerationJob) -> bool:
        """Check one generation alone (here, as the tokenizer is not safe to share across threads); an error is sent
        to it and to no other request."""
        if job.cancelled.is_set():
            return False
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

    def _prefill(self, jobs: list[GenerationJob]) -> None:
        """Read ``jobs``' prompts and pick their first tokens, then join them to the running rows. If that fails for
        several, each is prefilled alone, so that the error reaches only the row at fault."""
        device = self.personalizer.model.device
        try:
            temperature = torch.tensor([j.temperature for j in jobs], dtype=torch.float32, device=device)
            top_p = torch.tensor([j.top_p for j in jobs], dtype=torch.float32, device=device)
            generators = sampling_generators([j.seed for j in jobs], len(jobs), device)
            longest = max(j.max_new_tokens for j in jobs)
            state = self.personalizer.prefill([j.profile for j in jobs], [j.instruction for j in jobs], longest)
            first = _sample(state, temperature, top_p, generators)
        except Exception as err:  # noqa: BLE001 - reported to the rows it concerns
            if len(jobs) == 1:
                jobs[0].send(err)
                return
            log.warning("%d generations failed to prefill together (%s): prefilling them one by one", len(jobs), err)
            for job in jobs:
                self._prefill([job])
            return
        group = _Group(jobs, open=len(jobs))
        rows = [_Row(job, group, job.max_new_tokens) for job in jobs]
        new = _Running(rows, state, first, temperature, top_p, generators)
        self._running = new if self._running is None else self._running.join(new)

    def _step(self) -> None:
        """Send every row its picked token, let the rows whose answer ended leave, and decode one step of the rest."""
        running = self._running
        eos = self.personalizer.tokenizer.eos_token_id
        keep: list[int] = []
        for i, (row, token) in enumerate(zip(running.rows, running.next.tolist(), strict=True)):
            job = row.job
            if not job.cancelled.is_set():
                if row.sent == 0:
                    job.send("start")
                job.send(token)
                row.sent += 1
                row.remaining -= 1
            if job.cancelled.is_set() or row.remaining == 0 or token == eos:
                self._end(row, None)
            else:
                keep.append(i)
        if not keep:
            self._running = None
            return
        if len(keep) < len(running.rows):
            running = running.select(keep)  # frees the ended rows' KV cache now
        try:
            running.state = self.personalizer.model.advance(running.state, running.next)
            running.next = running.pick()
        except Exception as err:  # noqa: BLE001 - reported to the rows it concerns
            log.warning("a decoding step of %d rows failed: %s", len(running.rows), err)
            for row in running.rows:
                self._end(row, err)
            running = None
        self._running = running

    def _end(self, row: _Row, error: Exception | None) -> None:
        """End a row (``error``: why, ``None`` for a normal end). Its group is reported first if this is its last
        row, so that a client holding its whole answer finds its batch in the metrics."""
        group = row.group
        group.open -= 1
        group.steps = max(group.steps, row.sent)
        if group.open == 0 and self.on_batch is not None:
            self.on_batch(
                BatchStats(tuple(j.tenant for j in group.jobs), group.steps, time.perf_counter() - group.started)
            )
        row.job.send(error)

    def _fail_all(self, err: Exception) -> None:
        if self._running is not None:
            for row in self._running.rows:
                row.job.send(err)
            self._running = None
        with self._cond:
            calls, jobs = self._calls.drain(), self._jobs.drain()
        for call in calls:
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(err)
        for job in jobs:
            job.send(err)
