"""The runner: the jobs under way in this daemon, one `JobPipeline` each, and the agents they run.

A job is started here (`start`, at submission or when the daemon starts), its agents stopped here
(`stop_agents`, for a kill), and everything is stopped here when the daemon stops (`stop`): agents asked to end
(TERM, then KILL after the grace period, or at once when the stop is forced), pipelines left to notice, then
cancelled and awaited, so that nothing the runner started outlives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from numerusd.book import JobBook
from numerusd.config import Settings
from numerusd.pipeline import JobPipeline
from numerusd.protocol.commands import JOB_DONE
from numerusd.supervisor import Agents

log = logging.getLogger(__name__)

#: Seconds a graceful stop gives the pipelines to notice, once their agents have ended.
PIPELINES_GRACE_S = 5.0


class Runner:
    """Starts, kills and stops the daemon's jobs; see the module docstring."""

    def __init__(self, book: JobBook, settings: Settings, agents: Agents) -> None:
        self.book = book
        self.settings = settings
        self.agents = agents
        #: Set when the daemon stops: pipelines leave their jobs as they are (to be recorded interrupted).
        self.stopping = asyncio.Event()
        self._pipelines: dict[str, JobPipeline] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, job_id: str) -> None:
        """Run the job's pipeline, unless it runs already, the job has ended, or the daemon is stopping."""
        job = self.book.jobs[job_id]
        if job_id in self._pipelines or job.status in JOB_DONE or self.stopping.is_set():
            return
        pipeline = JobPipeline(
            job_id, book=self.book, settings=self.settings, agents=self.agents, stopping=self.stopping
        )
        self._pipelines[job_id] = pipeline
        self._spawn(self._run(pipeline), name=f"pipeline {job_id}")

    async def _run(self, pipeline: JobPipeline) -> None:
        try:
            await pipeline.run()
        finally:
            self._pipelines.pop(pipeline.job_id, None)

    def stop_agents(self, job_id: str) -> list[str]:
        """Stop the job's running agents in the background; the tasks (or calls) being stopped, by name."""
        names = [name for name, _ in self.agents.of_job(job_id)]
        self._spawn(self.agents.terminate(job_id), name=f"kill {job_id}")
        pipeline = self._pipelines.get(job_id)
        if pipeline is not None:
            self._spawn(pipeline.poke(), name=f"wake {job_id}")
        return names

    def wake(self, job_id: str) -> None:
        """Have the job's pipeline look at the job again (a user's approval or rejection changed it)."""
        pipeline = self._pipelines.get(job_id)
        if pipeline is not None:
            self._spawn(pipeline.poke(), name=f"wake {job_id}")

    async def stop(self, forced: asyncio.Event) -> None:
        """Stop every agent and pipeline, gracefully unless `forced` is (or becomes) set; returns when all of
        what the runner started has ended."""
        self.stopping.set()
        running = len(self.agents.of_job(None))
        log.info(
            "stopping: %d agents asked to end within %g s (a second signal kills them now)",
            running,
            self.agents.kill_grace_s,
        )
        for pipeline in list(self._pipelines.values()):
            self._spawn(pipeline.poke(), name=f"wake {pipeline.job_id}")
        graceful = asyncio.create_task(self.agents.terminate(), name="stop agents")
        if not await _unless(forced, graceful):
            log.warning("stop forced: killing the agents now")
            await self.agents.terminate(grace=0)
            await asyncio.gather(graceful, return_exceptions=True)
        if self._tasks and not forced.is_set():
            waited = asyncio.create_task(asyncio.wait(set(self._tasks), timeout=PIPELINES_GRACE_S))
            await _unless(forced, waited)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coroutine: Coroutine[Any, Any, object], name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


async def _unless(forced: asyncio.Event, task: asyncio.Task[Any]) -> bool:
    """Wait for `task` unless `forced` is set first; whether the task ended."""
    force = asyncio.create_task(forced.wait())
    try:
        await asyncio.wait({task, force}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        force.cancel()
    return task.done()
