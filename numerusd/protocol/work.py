"""What a daemon and its remote workers say to each other: task attempts offered, taken, reported, handed back.

A job run with a pool (`numerusctl run --pool gpu`) has its executors run by `numerusd worker` processes on
other machines rather than by the daemon (numerusd/dispatch.py is the daemon's side, numerusd/worker.py the
worker's). They share nothing but the bus:

| subject | what | stored |
|---|---|---|
| `numerus.work.<pool>` | `WorkOffer`: one attempt of one task, for a worker of the pool | `NUMERUS_WORK` (work queue) |
| `numerus.worker.<worker>.take` | `Take`: may it run the offer it holds? answered `TakeReply` | no (request) |
| `numerus.worker.<worker>.report` | `Report`: what the attempt did, in order; answered `ReportReply` | no (request) |
| `numerus.worker.<worker>.heartbeat` | `Heartbeat`: alive, pools, capacity, leases; `HeartbeatReply` | no (request) |
| object store `NUMERUS_BUNDLES` | git bundles: the task's base going out, its commits coming back | objects |

**The daemon stays the single writer.** A worker never appends an event: each report is turned by the daemon into
the observation a local agent would have made (its output goes through the same redaction, log, parser and
gate), decided by the domain, and only then answered. An offer carries a `lease`, a random token: every request
of the attempt names it, and the daemon refuses one whose lease no attempt holds any more (the worker stopped
heart-beating and the task went on elsewhere, the task was killed, the daemon restarted): a late result is
answered `ok = False`, kept on `numerus.dlq.worker.stale_lease`, and changes nothing.

**Leases and heartbeats.** A worker heart-beats every `heartbeat_s` listing the leases it holds; one it stops
listing for `lease_s` (or a worker not heard from for that long) is lost: the task runs again as a new attempt,
not counted as failed. The daemon's answer to a heartbeat lists the leases the worker must stop (`cancel`: a
kill, or leases it no longer knows).

Every member evolves by msgspec's rules (new members get defaults); both sides decode with typed decoders, and a
message that does not decode is answered with the path of the bad field.
"""

from __future__ import annotations

import msgspec

#: The work-queue stream of offers, the object store of bundles.
WORK_STREAM = "NUMERUS_WORK"
WORK_SUBJECTS = ("numerus.work.>",)
BUNDLES_BUCKET = "NUMERUS_BUNDLES"
#: The pool a job's tasks go to when neither `run --pool` nor `default_pool` names one: the daemon itself.
LOCAL_POOL = ""


def work_subject(pool: str) -> str:
    """`numerus.work.<pool>`: the offers for the workers of one pool."""
    return f"numerus.work.{pool}"


def pool_consumer(pool: str) -> str:
    """The durable consumer every worker of `pool` pulls its offers from (made by the daemon)."""
    return f"pool-{pool}"


def worker_subject(worker: str, kind: str) -> str:
    """`numerus.worker.<worker>.<kind>` (`take`, `report`, `heartbeat`): a worker's requests to the daemon."""
    return f"numerus.worker.{worker}.{kind}"


#: What the daemon subscribes to: every worker's requests, of every kind.
WORKER_REQUESTS = "numerus.worker.*.*"


def worker_request(subject: str) -> tuple[str, str] | None:
    """`(worker, kind)` of a `numerus.worker.<worker>.<kind>` subject, or None when it is not one."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["numerus", "worker"]:
        return None
    return parts[2], parts[3]


class WorkOffer(msgspec.Struct, frozen=True, kw_only=True):
    """One attempt of one task, offered to the workers of `pool`.

    The worker makes a worktree of `base_sha` (brought by fetching `bundles` in order into its copy of the job's
    repository), runs its own profile named `agent` on `prompt` in its sandbox, commits what the agent left on
    `branch` with `commit_message`, runs `checks` in order (stopping at the first that fails), and sends the
    commit back as a bundle named `result_object`.
    """

    job: str
    task: str
    attempt: int
    lease: str
    pool: str
    agent: str
    prompt: str
    base_sha: str
    bundles: tuple[str, ...]
    branch: str
    commit_message: str
    result_object: str
    checks: tuple[str, ...] = ()
    check_timeout_s: float = 600.0


class Take(msgspec.Struct, frozen=True, kw_only=True):
    """A worker has an offer in hand and asks whether it may run it (only one worker may)."""

    lease: str
    job: str
    task: str
    attempt: int
    #: Where it runs, for `status` and `numerusctl workers`.
    host: str = ""


class TakeReply(msgspec.Struct, frozen=True, kw_only=True):
    """Go (`ok`), or why not (the attempt was withdrawn or taken by another worker): the worker then drops it."""

    ok: bool
    reason: str = ""


# --- what an attempt reports, in order ------------------------------------------------------------------------


class Started(msgspec.Struct, frozen=True, kw_only=True, tag="started"):
    """The agent runs on the worker as `pid` (its start time in clock ticks since boot), spawned with `argv`."""

    pid: int
    start_ticks: int
    argv: tuple[str, ...] = ()
    #: Where the agent works on the worker: the files it reports are read relative to it (as a local agent's to
    #: its worktree).
    workdir: str = ""


class SpawnFailed(msgspec.Struct, frozen=True, kw_only=True, tag="spawn_failed"):
    """The agent could not start on the worker (no such profile, program missing): one line."""

    reason: str


class Output(msgspec.Struct, frozen=True, kw_only=True, tag="output"):
    """Terminal output of the agent, as read from its PTY (the worker's own secrets already redacted)."""

    data: bytes


class Exited(msgspec.Struct, frozen=True, kw_only=True, tag="exited"):
    """The agent ended: its exit code, or the signal that ended it."""

    exit_code: int | None
    signal: int | None


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    """One check command run on the worker against the committed work (`exit_code` None: timed out)."""

    command: str
    exit_code: int | None
    duration_s: float
    #: Its output's last characters (the daemon keeps at most CHECK_OUTPUT_CHARS of it).
    output: str


class Finished(msgspec.Struct, frozen=True, kw_only=True, tag="finished"):
    """The attempt is over on the worker: the work committed as `commit` and uploaded as the offer's
    `result_object` (None: the agent left nothing to commit, or `error` says why nothing could be), and the
    checks that ran on it, in order."""

    commit: str | None
    checks: tuple[CheckResult, ...] = ()
    error: str | None = None


class HandedBack(msgspec.Struct, frozen=True, kw_only=True, tag="handed_back"):
    """The worker gives the attempt back unfinished (it is shutting down): the task runs again elsewhere."""

    reason: str


ReportBody = Started | SpawnFailed | Output | Exited | Finished | HandedBack


class Report(msgspec.Struct, frozen=True, kw_only=True):
    """One thing an attempt did; `seq` counts from 1 per lease, so a report sent again after a lost reply is
    recognised and not decided twice."""

    lease: str
    seq: int
    body: ReportBody


class ReportReply(msgspec.Struct, frozen=True, kw_only=True):
    """Recorded (`ok`), or refused with why (a stale lease: the worker stops the attempt); `cancel`: the daemon
    wants the agent stopped (a kill)."""

    ok: bool
    reason: str = ""
    cancel: bool = False


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """A worker is alive: its pools, how many attempts it runs at once, the leases it holds now."""

    pools: tuple[str, ...]
    capacity: int
    leases: tuple[str, ...] = ()
    host: str = ""
    #: It is shutting down: it takes no new work.
    draining: bool = False
    version: str = ""


class HeartbeatReply(msgspec.Struct, frozen=True, kw_only=True):
    """The leases the worker must stop now (killed tasks, attempts the daemon no longer knows)."""

    cancel: tuple[str, ...] = ()


def decoder(kind: type[msgspec.Struct]) -> msgspec.json.Decoder:
    """A typed JSON decoder of one of the messages above."""
    return msgspec.json.Decoder(kind)


encoder = msgspec.json.Encoder()
