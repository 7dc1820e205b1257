"""The runner: the jobs under way in this daemon, one `JobPipeline` each, and the agents they run.

A job is started here (`start`, at submission or when the daemon starts), its agents stopped here
(`stop_agents`, for a kill), and everything is stopped here when the daemon stops (`stop`): agents asked to end
(TERM, then KILL after the grace period, or at once when the stop is forced), pipelines left to notice, then
cancelled and awaited, so that nothing the runner started outlives it. Its `pool` holds the daemon's agent slots
(`max_agents`), which the pipelines share (`numerusd.agent_pool`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

from numerusd.agent_pool import AgentPool
from numerusd.book import JobBook
from numerusd.config import Settings
from numerusd.dispatch import Dispatcher
from numerusd.pipeline import JobPipeline
from numerusd.protocol.commands import JOB_DONE
from numerusd.supervisor import Agents

log = logging.getLogger(__name__)

#: Seconds a graceful stop gives the pipelines to notice, once their agents have ended.
PIPELINES_GRACE_S = 5.0


class Runner:
    """Starts, kills and stops the daemon's jobs; see the module docstring."""

    def __init__(self, book: JobBook, settings: Settings, agents: Agents, dispatcher: Dispatcher | None = None) -> None:
        self.book = book
        self.settings = settings
        self.agents = agents
        #: Offers the executors of jobs with a pool to remote workers.
        self.dispatcher = dispatcher
        #: The daemon's agent slots, shared by every job's pipeline.
        self.pool = AgentPool(settings.max_agents, book)
        #: Set when the daemon stops: pipelines leave their jobs as they are (to be recorded interrupted).
        self.stopping = asyncio.Event()
        self._pipelines: dict[str, JobPipeline] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self, job_id: str) -> None:
        """Run the job's pipeline, unless it runs already, the job has ended or waits to be resumed, or the daemon
        is stopping."""
        job = self.book.jobs[job_id]
        if job_id in self._pipelines or job.status in (*JOB_DONE, "interrupted") or self.stopping.is_set():
            return
        pipeline = JobPipeline(
            job_id,
            book=self.book,
            settings=self.settings,
            agents=self.agents,
            stopping=self.stopping,
            seat=self.pool.seat(job_id),
            dispatcher=self.dispatcher,
        )
        self._pipelines[job_id] = pipeline
        self._spawn(self._run(pipeline), name=f"pipeline {job_id}")

    def wake(self, job_id: str) -> None:
        """The job has new work (resumed, tasks retried or skipped): its pipeline takes it, or one starts."""
        pipeline = self._pipelines.get(job_id)
        if pipeline is None:
            self.start(job_id)
            return
        pipeline.start_flows()
        self._spawn(pipeline.poke(), name=f"wake {job_id}")

    async def _run(self, pipeline: JobPipeline) -> None:
        events = self.book.jobs[pipeline.job_id].events
        try:
            await pipeline.run()
        finally:
            self._pipelines.pop(pipeline.job_id, None)
        # Work given to the job as its pipeline was ending (a retry, a skip) finds no pipeline to take it: the
        # job has not ended, so it runs again. Only after progress, so a pipeline that cannot go on never spins.
        job = self.book.jobs[pipeline.job_id]
        if job.status not in JOB_DONE and job.events != events:
            self.start(pipeline.job_id)

    def stop_agents(self, job_id: str, task: str | None = None) -> list[str]:
        """Stop the job's running agents (or one task's) in the background; the tasks (or calls) being stopped,
        by name."""
        names = [name for name, _ in self.agents.of_job(job_id) if task is None or name.split(".")[0] == task]
        self._spawn(self.agents.terminate(job_id, task=task), name=f"kill {job_id}")
        self.pool.reconsider()  # a killed job's waiting agents go first; one that ended leaves the queue
        pipeline = self._pipelines.get(job_id)
        if pipeline is not None:
            self._spawn(pipeline.poke(), name=f"wake {job_id}")
        return names

    def queue_changed(self) -> None:
        """A job was paused, let go on or moved to the front: the free agent slots are handed out again."""
        self.pool.reconsider()

    async def stop(self, forced: asyncio.Event) -> None:
        """Stop every agent and pipeline, gracefully unless `forced` is (or becomes) set; returns when all of
        what the runner started has ended."""
        self.stopping.set()
        if self.dispatcher is not None:  # what workers run is left to them; their leases end with this daemon
            await self.dispatcher.stop()
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
