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
from numerusd.protocol.commands import EventsReply


class JobControl(Protocol):
    """Starting a job's work, and stopping its agents (the runner)."""

    def start(self, job_id: str) -> None:
        """Run the job (its pipeline), unless it runs already or has ended."""
        ...

    def stop_agents(self, job_id: str) -> list[str]:
        """Stop the job's running agents in the background; the names of those being stopped."""
        ...

    def wake(self, job_id: str) -> None:
        """Have the job's pipeline look at the job again (it waits on the job's state, e.g. for an approval)."""
        ...


class History(Protocol):
    """The stored events, as JetStream holds them."""

    async def read(self, subject: str, after_seq: int, limit: int) -> EventsReply:
        """Up to `limit` stored events on `subject` after stream sequence `after_seq`."""
        ...


@dataclass(frozen=True)
class Context:
    """Everything a handler may use."""

    settings: Settings
    book: JobBook
    jobs: JobControl
    history: History
    #: Why planned jobs cannot run here (no git, or one too old for merges without a checkout), if so.
    git_problem: str | None = None
    #: Who sent the request being handled (`protocol.connection.asker`): recorded in the events it causes.
    asker: str = "numerusd"
