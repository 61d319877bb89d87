"""The server's one job-event helper (``job_events``): every way a request ends marks its
jobs cancelled, classify's client disconnecting included (it used to leave its jobs running)."""

from __future__ import annotations

import asyncio

import pytest

from plugtune.serving.server import ApiError, Job, classification_results, job_events


def _jobs(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, n: int) -> list[Job]:
    return [Job("classify", f"text {i}", None, loop, queue, index=i) for i in range(n)]


def test_a_disconnected_classify_clients_jobs_are_cancelled() -> None:
    async def scenario() -> list[Job]:
        queue: asyncio.Queue = asyncio.Queue()
        jobs = _jobs(asyncio.get_running_loop(), queue, 2)
        request = asyncio.create_task(classification_results(queue, jobs))
        jobs[0].emit("result", {"label": "a"})  # one row answered, the other still waiting
        await asyncio.sleep(0.01)
        assert not any(job.cancelled for job in jobs)
        request.cancel()  # what the server does to a request whose client went away
        with pytest.raises(asyncio.CancelledError):
            await request
        return jobs

    assert all(job.cancelled for job in asyncio.run(scenario()))


def test_results_in_order_and_errors_stop_the_other_rows() -> None:
    async def scenario() -> tuple[list, list[Job]]:
        queue: asyncio.Queue = asyncio.Queue()
        jobs = _jobs(asyncio.get_running_loop(), queue, 2)
        jobs[1].emit("result", "second")
        jobs[0].emit("result", "first")
        results = await classification_results(queue, jobs)
        failing = _jobs(asyncio.get_running_loop(), queue, 2)
        failing[0].emit("error", ApiError(500, "boom"))
        with pytest.raises(ApiError):
            await classification_results(queue, failing)
        return results, failing

    results, failing = asyncio.run(scenario())
    assert results == ["first", "second"] and all(job.cancelled for job in failing)


def test_job_events_yields_early_events_first_and_ends_after_the_last_row() -> None:
    async def scenario() -> list:
        queue: asyncio.Queue = asyncio.Queue()
        jobs = [Job("generate", "p", None, asyncio.get_running_loop(), queue, index=0)]
        jobs[0].emit("delta", "b")
        jobs[0].emit("done", ("stop", 2))
        jobs[0].emit("delta", "never read")
        await asyncio.sleep(0.01)
        seen = [e async for e in job_events(queue, jobs, early=[(0, "delta", "a")])]
        return seen, jobs

    seen, jobs = asyncio.run(scenario())
    assert seen == [(0, "delta", "a"), (0, "delta", "b"), (0, "done", ("stop", 2))] and jobs[0].cancelled
