"""What a handler may use of the daemon: the narrow seam between the command service and everything else.

A handler is `async def handle(context, request) -> reply`. It reads and changes jobs through the `book`,
starts and stops their work through `jobs`, reads stored events through `history`, and knows the `settings`.
It sees nothing else of the daemon (no connection, no store, no runner internals).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from numerusd.book import JobBook
from numerusd.config import Settings
from numerusd.protocol.commands import EventsReply, WorkersReply


class JobControl(Protocol):
    """Starting a job's work, and stopping its agents (the runner)."""

    def start(self, job_id: str) -> None:
        """Run the job (its pipeline), unless it runs already or has ended."""
        ...

    def wake(self, job_id: str) -> None:
        """The job has new work or was let go on (resumed, tasks retried or skipped, an approval): run its pipeline,
        or have it look at the job again."""
        ...

    def stop_agents(self, job_id: str, task: str | None = None) -> list[str]:
        """Stop the job's running agents (or one task's) in the background; the names of those being stopped."""
        ...

    def queue_changed(self) -> None:
        """A job was paused, let go on or moved in the queue: hand out the free agent slots again."""
        ...


class History(Protocol):
    """The stored events, as JetStream holds them."""

    async def read(self, subject: str, after_seq: int, limit: int) -> EventsReply:
        """Up to `limit` stored events on `subject` after stream sequence `after_seq`."""
        ...


class Workers(Protocol):
    """The remote workers the daemon has heard from (numerusd.dispatch.Dispatcher)."""

    def view(self) -> WorkersReply:
        """Every worker heard from, and the attempts waiting for one."""
        ...


@dataclass
class Context:
    """Everything a handler may use. Each request gets its own copy (with its `asker`); the daemon's one has its
    `settings` replaced when numerusd takes its configuration again (SIGHUP, `numerusd.reload`)."""

    settings: Settings
    book: JobBook
    jobs: JobControl
    history: History
    #: Why planned jobs cannot run here (no git, or one too old for merges without a checkout), if so.
    git_problem: str | None = None
    #: Who sent the request being handled (`protocol.connection.asker`): recorded in the events it causes.
    asker: str = "numerusd"
    #: The remote workers heard from (`numerusctl workers`); None: none can be (a daemon started without them).
    workers: Workers | None = None
