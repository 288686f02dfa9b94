"""The model worker on the tiny Llama: a failing row fails alone, tenants are served round-robin, a request joins the
running rows as soon as one leaves instead of waiting for a running batch's end, and the queue is bounded. The worker
is held (``held``) while a test queues its jobs, so what is scheduled together never depends on thread timing."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest
from _server import CONFIG, held, wait_for
from conftest import perturb_zero_init, tiny_backbone

from commer.service.worker import BatchStats, GenerationJob, ModelWorker, QueueFullError, RejectedGenerationError
from commer.serving import Personalizer

INSTRUCTION = "what is my plan today ?"


@pytest.fixture(scope="module")
def personalizer() -> Personalizer:
    p = Personalizer.new(tiny_backbone(), CONFIG)
    perturb_zero_init(p.model)  # so that the soft prompt depends on the profile
    return p


def _run(personalizer: Personalizer, test: Callable[[ModelWorker], Awaitable[None]], **kw) -> list[BatchStats]:
    """``test(worker)`` on an event loop, with a started worker; returns the batches it decoded (read once the worker
    has stopped: a batch is reported after its last token is sent)."""
    batches: list[BatchStats] = []
    worker = ModelWorker(personalizer, on_batch=batches.append, **{"wait_ms": 0, **kw})
    worker.start()
    try:
        asyncio.run(test(worker))
    finally:
        worker.stop()
    return batches


def _job(tenant: str = "", **kw) -> GenerationJob:
    args = {"profile": None, "instruction": INSTRUCTION, "max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0}
    return GenerationJob(**{**args, **kw}, loop=asyncio.get_running_loop(), tenant=tenant)


async def _result(job: GenerationJob) -> list[int] | Exception:
    """The job's tokens, or the exception it got instead."""
    tokens: list[int] = []
    while (item := await asyncio.wait_for(job.queue.get(), 60)) is not None:
        if isinstance(item, Exception):
            return item
        if item != "start":
            tokens.append(item)
    return tokens


async def _queued(worker: ModelWorker, n: int) -> None:
    """Until ``n`` jobs wait (without blocking the loop that receives the tokens)."""
    await asyncio.to_thread(wait_for, lambda: worker.queue_depth == n, f"{n} queued jobs")


def test_a_row_that_fails_in_decoding_fails_alone(personalizer):
    """A profile of NaNs passes every check but breaks sampling; the batch is decoded again row by row."""
    good_profile = personalizer.profile(["i love running"])
    broken = personalizer.profile(["i love running"])
    broken.sum[0, 0] = float("nan")

    async def test(worker: ModelWorker) -> None:
        alone = _job(profile=good_profile)
        worker.generate(alone)
        expected = await _result(alone)
        with held(worker):
            good, bad = _job(profile=good_profile), _job(profile=broken, temperature=1.0)
            worker.generate(good)
            worker.generate(bad)
            await _queued(worker, 2)
        assert await _result(good) == expected and len(expected) > 0
        assert isinstance(await _result(bad), RuntimeError)

    _run(personalizer, test, wait_ms=50)  # (a window: so that even a worker that waits for none would batch them)


def test_a_row_refused_at_admission_reaches_only_its_request(personalizer):
    async def test(worker: ModelWorker) -> None:
        with held(worker):
            jobs = [_job("a"), _job("b", top_p=1e-46, temperature=1.0), _job("c", max_new_tokens=500), _job("d")]
            for job in jobs:
                worker.generate(job)
            await _queued(worker, len(jobs))
        results = [await _result(job) for job in jobs]
        assert isinstance(results[1], RejectedGenerationError) and "top_p" in str(results[1])
        assert isinstance(results[2], RejectedGenerationError) and "context" in str(results[2])
        assert results[0] == results[3] and len(results[0]) == 4

    assert [b.tenants for b in _run(personalizer, test)] == [("a", "d")]


def test_batches_take_tenants_round_robin(personalizer):
    """A tenant with many queued generations does not fill the batch while another tenant waits."""

    async def test(worker: ModelWorker) -> None:
        with held(worker):
            jobs = [_job("flood") for _ in range(6)] + [_job("quiet")]
            for job in jobs:
                worker.generate(job)
            await _queued(worker, len(jobs))
        assert all(isinstance(result, list) for result in [await _result(job) for job in jobs])

    batches = _run(personalizer, test, max_batch_size=2)
    assert [b.tenants for b in batches] == [("flood", "quiet"), ("flood", "flood"), ("flood", "flood"), ("flood",)]


def test_another_tenant_does_not_wait_for_a_running_batch(personalizer):
    """While a long batch of one tenant takes every row, another tenant's short request joins the running rows all
    the same (one forward pass per step for all of them) and ends first."""

    async def test(worker: ModelWorker) -> None:
        running, release = threading.Event(), threading.Event()

        def hold_again() -> None:  # runs between two decoding steps of the long batch
            running.set()
            release.wait(120)

        with held(worker):
            long_jobs = [_job("flood", max_new_tokens=40), _job("flood", max_new_tokens=40, instruction="hi")]
            for job in long_jobs:
                worker.generate(job)
            worker.submit(hold_again)
            await _queued(worker, 3)
        try:
            assert await asyncio.to_thread(running.wait, 60)
            short = _job("quiet", max_new_tokens=2)
            worker.generate(short)
            await _queued(worker, 1)
        finally:
            release.set()
        assert len(await _result(short)) == 2
        assert [len(await _result(job)) for job in long_jobs] == [40, 40]  # (greedy: no early end, whatever the timing)

    assert [b.tenants for b in _run(personalizer, test, max_batch_size=2)] == [("quiet",), ("flood", "flood")]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_a_waiting_request_takes_the_row_a_short_answer_frees(personalizer, monkeypatch, static):
    """Continuous batching: with room for two rows, a long and a short answer of one tenant decode; its third request
    takes the short one's row when it ends, and ends long before the long answer, with the tokens it gets alone (on
    the dynamic cache, whichever cache the batch decodes into)."""
    step_rows: list[int] = []  # rows of each decoding step's forward pass
    advance = personalizer.model.advance

    def recorded(rows, tokens):
        step_rows.append(rows.size)
        return advance(rows, tokens)

    async def test(worker: ModelWorker) -> None:
        alone = _job("a", max_new_tokens=3, instruction="hi")
        worker.generate(alone)
        expected = await _result(alone)
        personalizer.model.static_decoding(static, compile=False)  # (nothing decodes now: the next prefill reads it)
        with held(worker):
            jobs = [_job("a", max_new_tokens=40), _job("a", max_new_tokens=2), _job("a", max_new_tokens=3)]
            jobs[2].instruction = "hi"
            for job in jobs:
                worker.generate(job)
            await _queued(worker, 3)
            step_rows.clear()  # (the worker is held: nothing decodes now)
        results = [await _result(job) for job in jobs]
        assert [len(r) for r in results] == [40, 2, 3] and results[2] == expected

    monkeypatch.setattr(personalizer.model, "advance", recorded)
    try:
        batches = _run(personalizer, test, max_batch_size=2)
    finally:
        personalizer.model.static_decoding(False)
    # reported when their last row ends: the alone run; the late row (joined at step 3, ended at step 5); the first two
    assert [b.tenants for b in batches] == [("a",), ("a",), ("a", "a")]
    assert [b.steps for b in batches] == [3, 3, 40]
    # one forward pass per step for all rows: "short" leaves after its 2nd token, "late" joins, leaves after its 3rd
    assert step_rows == [2, 1, 2, 2] + [1] * 35


def test_the_queue_is_bounded_per_tenant_and_in_all(personalizer):
    async def test(worker: ModelWorker) -> None:
        with held(worker):
            a1, a2, b1 = _job("a"), _job("a"), _job("b")
            worker.generate(a1)
            with pytest.raises(QueueFullError, match="tenant 'a' has 1 requests waiting"):
                worker.generate(a2)
            with pytest.raises(QueueFullError, match="tenant 'a'"):
                worker.submit(lambda: None, "a")  # compressions count too
            a1.cancelled.set()  # its client went away: the slot is free again
            worker.generate(a2)
            worker.generate(b1)
            with pytest.raises(QueueFullError, match="2 requests are waiting for the model"):
                worker.generate(_job("c"))
        assert len(await _result(a2)) == 4 and len(await _result(b1)) == 4

    _run(personalizer, test, max_queued=2, max_queued_per_tenant=1)
