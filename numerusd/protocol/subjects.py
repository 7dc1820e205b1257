"""Every NATS subject and JetStream stream name Numerus uses, built here and nowhere else.

| subject | what | stream |
|---|---|---|
| `numerus.cmd.<verb>` | requests to the daemon's micro service | (not stored) |
| `numerus.job.<job>.<event>` | job events, e.g. `numerus.job.01J….plan_validated` | `NUMERUS_EVENTS` |
| `numerus.job.<job>.task.<task>.<event>` | task events, e.g. `….task.t3.claim_granted` | `NUMERUS_EVENTS` |
| `numerus.log.<job>.<task>` | an agent's terminal output, in chunks | `NUMERUS_LOGS` |
| `numerus.dlq.<source>.<reason>` | dead letters: rejected commands, events a view refused | `NUMERUS_DLQ` |
| `numerus.snapshot.job.<job>` | a job's state as its events fold it, signed (the last one only) | `NUMERUS_SNAPSHOTS` |
| `numerus.snapshot.checkpoint` | where the startup replay begins, given the snapshots | `NUMERUS_SNAPSHOTS` |

| `$SRV.PING.numerus` | the micro service's ping (`numerusctl ping`), beside its `INFO` and `STATS` | (not stored) |
| `numerus.input.<job>.<task>` | input for a running agent's terminal (`attach`; request/reply) | (not stored) |

`<event>` is the event's type name in snake case (`ClaimGranted` -> `claim_granted`). Job and task ids are
single tokens (see `ids.is_token`), so a subject splits back into its parts on `.`. Pure functions of strings:
both programs and any other tool can use them; nothing here imports NATS.
"""

from __future__ import annotations

import functools
import re

#: The name of the daemon's NATS micro service (`nats micro ls` lists it; its endpoints are `command(verb)`).
SERVICE = "numerus"

#: The stream of job events: kept for ever, signed and chained.
EVENTS = "NUMERUS_EVENTS"
#: The stream of agents' terminal output, bounded by size and age.
LOGS = "NUMERUS_LOGS"
#: The stream of dead letters, bounded by age.
DLQ = "NUMERUS_DLQ"
#: The stream of job snapshots: the last one of each job and the checkpoint (`numerusd.snapshots`).
SNAPSHOTS = "NUMERUS_SNAPSHOTS"

#: What each stream holds.
EVENTS_SUBJECTS = ("numerus.job.>",)
LOGS_SUBJECTS = ("numerus.log.>",)
DLQ_SUBJECTS = ("numerus.dlq.>",)
SNAPSHOTS_SUBJECTS = ("numerus.snapshot.>",)
#: The subject of the checkpoint, the one snapshot that is not a job's.
CHECKPOINT = "numerus.snapshot.checkpoint"
#: Where input for agents' terminals arrives (the daemon subscribes; never stored).
INPUTS = "numerus.input.>"

_CAMEL_HUMP = re.compile(r"(?<!^)(?=[A-Z])")


# Cached: sealing an event asks for its subject every time; bounded, as an audited stream may hold any name.
@functools.lru_cache(maxsize=512)
def snake_name(type_name: str) -> str:
    """`ClaimGranted` -> `claim_granted`: the last token of an event's subject."""
    return _CAMEL_HUMP.sub("_", type_name).lower()


def service_ping() -> str:
    """`$SRV.PING.numerus`: where the daemon's micro service answers a ping (`numerusctl ping`)."""
    return f"$SRV.PING.{SERVICE}"


def command(verb: str) -> str:
    """`numerus.cmd.<verb>`: where the daemon answers one kind of request."""
    return f"numerus.cmd.{verb}"


def job_events(job: str | None = None) -> str:
    """`numerus.job.<job>.>`: every event of one job, its tasks' too; with no job, `numerus.job.>`, every job's."""
    return "numerus.job.>" if job is None else f"numerus.job.{job}.>"


def job_level_events(job: str) -> str:
    """`numerus.job.<job>.*`: the job's own events, without those of its tasks."""
    return f"numerus.job.{job}.*"


def job_event(job: str, type_name: str, task: str | None = None) -> str:
    """`numerus.job.<job>.<event>`, or `numerus.job.<job>.task.<task>.<event>` for an event of a task."""
    suffix = snake_name(type_name)
    return f"numerus.job.{job}.{suffix}" if task is None else f"numerus.job.{job}.task.{task}.{suffix}"


def job_of(subject: str) -> str | None:
    """The job an event subject names, or None when it is not a job event's subject."""
    parts = subject.split(".")
    return parts[2] if len(parts) > 3 and parts[0] == "numerus" and parts[1] == "job" else None


def event_suffix(subject: str) -> str:
    """The last token of an event's subject: its type name in snake case."""
    return subject.rpartition(".")[2]


def job_snapshot(job: str) -> str:
    """`numerus.snapshot.job.<job>`: the last snapshot of one job's state."""
    return f"numerus.snapshot.job.{job}"


def task_log(job: str, task: str) -> str:
    """`numerus.log.<job>.<task>`: one task's terminal output."""
    return f"numerus.log.{job}.{task}"


def job_logs(job: str) -> str:
    """`numerus.log.<job>.*`: the terminal output of every task of a job."""
    return f"numerus.log.{job}.*"


def task_input(job: str, task: str) -> str:
    """`numerus.input.<job>.<task>`: input for the terminal of one task's running agent."""
    return f"numerus.input.{job}.{task}"


def input_target(subject: str) -> tuple[str, str] | None:
    """`(job, task)` of a `numerus.input.<job>.<task>` subject, or None when it is not exactly one."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["numerus", "input"]:
        return None
    return parts[2], parts[3]


def dlq(source: str, reason: str) -> str:
    """`numerus.dlq.<source>.<reason>`: where an input `source` rejected for `reason` is kept."""
    return f"numerus.dlq.{source}.{reason}"
