"""The pure domain: job and task state as a fold of events, and every change decided against that state.

    state.py         JobState, TaskState, the lock table they hold
    evolve.py        evolve(state, event) -> state: the only way state changes (live, restart, audit replay)
    observations.py  what decide takes: commands (SubmitJob, KillJob, CleanedUp, Accepted, Discarded) and
                     observations of side effects
    decide.py        decide(job, message) -> events, or a refusal
    queries.py       what status shows of a job, what a restart must stop
    queueing.py      the daemon-wide queue of agent slots: pause, start, queued, the queue's order

No I/O, no clock, no NATS anywhere here.
"""

from numerusd.domain.decide import IN_PLACE_TASK, check_acceptable, check_cleanable, decide, replan_errors
from numerusd.domain.evolve import evolve, evolve_untyped, fold
from numerusd.domain.queries import job_view, leftovers, running_tasks
from numerusd.domain.queueing import queue_order, shown_status, slot_rank
from numerusd.domain.state import ACTIVE, TASK_DONE, Decision, JobState, TaskState, lock_table

__all__ = [
    "ACTIVE",
    "IN_PLACE_TASK",
    "TASK_DONE",
    "Decision",
    "JobState",
    "TaskState",
    "check_acceptable",
    "check_cleanable",
    "decide",
    "evolve",
    "evolve_untyped",
    "fold",
    "job_view",
    "leftovers",
    "lock_table",
    "queue_order",
    "replan_errors",
    "running_tasks",
    "shown_status",
    "slot_rank",
]
