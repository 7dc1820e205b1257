"""The daemon-wide queue of agent slots, as the domain sees it: pause, start, queued, and the order of the queue.

The daemon runs at most `max_agents` agents across all its jobs (`numerusd.agent_pool` hands the slots out). A
job whose first agent finds no free slot is `queued` (JobQueued) until it gets one (JobStarted); a paused job
(JobPaused, by whom) takes no new slot until a user lets it go on (JobUnpaused); a queued job a user starts
moves to the front of the queue (JobPromoted). None of this changes the step a job is at (`JobState.status`):
`shown_status` shows `queued` or `paused` over it, so that the agents of a paused job finish their step and
move it on as they would.

The order in which jobs get a free slot (`slot_rank`), and so the queue's positions (`queue_order`), is: a job
being killed first (its agents only wind it down), then queued jobs a user moved to the front (the latest
moved first), then higher priority, then, within a priority, the job holding fewer slots, then the older job.
Within a priority that is first come, first served for jobs that hold nothing, and a big job that holds slots
shares the next free one with those queued after it instead of taking it back: it cannot starve them. A higher
priority does go first for as long as it wants slots: that is what it is for.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import msgspec

from numerusd.domain.observations import AgentSlotAwaited, AgentSlotTaken, Pause, Start
from numerusd.domain.state import Decision, JobState
from numerusd.errors import CommandRefused
from numerusd.protocol.commands import JOB_DONE, JobStatus
from numerusd.protocol.events import EventData, JobKilled, JobPaused, JobPromoted, JobQueued, JobStarted, JobUnpaused

__all__ = ["decide_queue", "evolve_queue", "killed_in_queue", "queue_order", "shown_status", "slot_rank"]

#: What `decide_queue` takes.
QueueMessage = Pause | Start | AgentSlotAwaited | AgentSlotTaken


def decide_queue(job: JobState, message: QueueMessage) -> Decision:
    """The events a pause, a start or a slot awaited or taken implies for `job`; a refusal in one line."""
    match message:
        case AgentSlotAwaited():
            if job.status in JOB_DONE or job.queued or job.kill_requested:
                return []
            return [(None, JobQueued())]
        case AgentSlotTaken():
            return [(None, JobStarted())] if job.queued and job.status not in JOB_DONE else []
        case Pause(by=by):
            _refuse_ended(job, "pause")
            if job.paused_by is not None:
                raise CommandRefused(
                    f"job {job.id} is already paused (by {job.paused_by}); 'numerusctl start {job.id}' lets it go on",
                    job=job.id,
                )
            return [(None, JobPaused(by=by))]
        case Start(by=by):
            _refuse_ended(job, "start")
            if job.paused_by is not None:
                return [(None, JobUnpaused(by=by))]
            if job.queued:
                return [(None, JobPromoted(by=by))]
            raise CommandRefused(
                f"job {job.id} is {job.status}, neither paused nor queued: nothing to start", job=job.id
            )


def _refuse_ended(job: JobState, verb: str) -> None:
    if job.status in JOB_DONE:
        raise CommandRefused(f"job {job.id} is already {job.status}; nothing to {verb}", job=job.id)
    if job.kill_requested:
        raise CommandRefused(f"job {job.id} is being killed; nothing to {verb}", job=job.id)


def killed_in_queue(job: JobState) -> Decision:
    """A kill of a planned job still queued for its planner ends it at once: none of its agents ever ran, and
    none will (its pipeline leaves the queue when it sees the job ended). An unplanned one ends through its task."""
    if job.queued and job.status == "planning" and not job.kill_requested:
        return [(None, JobKilled())]
    return []


def evolve_queue(job: JobState, data: EventData, time: datetime) -> JobState:
    """The job after a queue event (`time`: the event's)."""
    replace = msgspec.structs.replace
    match data:
        case JobQueued():
            return replace(job, queued=True)
        case JobStarted():
            return replace(job, queued=False, promoted=None)
        case JobPaused(by=by):
            return replace(job, paused_by=by)
        case JobUnpaused():
            return replace(job, paused_by=None)
        case JobPromoted():
            return replace(job, promoted=time)
    return job


def shown_status(job: JobState) -> JobStatus:
    """What `status` shows: how the job ended (or that a daemon stop interrupted it), else `paused` or `queued`
    over the step it is at."""
    if job.status in JOB_DONE or job.status == "interrupted":
        return job.status
    if job.paused_by is not None:
        return "paused"
    if job.queued:
        return "queued"
    return job.status


def slot_rank(job: JobState, held: int = 0) -> tuple[object, ...]:
    """Where the job's next agent stands in line for a free agent slot (lowest first), holding `held` slots;
    see the module docstring."""
    promoted = job.promoted if job.queued else None
    return (
        not job.kill_requested,
        promoted is None,
        -promoted.timestamp() if promoted is not None else 0.0,
        -job.priority,
        held,
        job.created,
        job.id,
    )


def queue_order(jobs: Iterable[JobState]) -> list[JobState]:
    """The jobs waiting `queued` (not paused, not ended), in the order they will get a slot: position 1 first."""
    waiting = [job for job in jobs if shown_status(job) == "queued"]
    return sorted(waiting, key=slot_rank)
