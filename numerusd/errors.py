"""The one exception tree of Numerus.

    NumerusError                   anything Numerus raises on purpose; `code` is stable, the message actionable
    ├── ConfigError                a setting or file is wrong (numerusd exits 78)
    │   └── StateLocked            another numerusd holds the state directory (numerusd exits 75)
    │       └── LeaseHeld          another numerusd holds the lease of the streams (numerusd exits 75)
    ├── NatsUnavailable            no server to talk to, or one too old (numerusd exits 69)
    ├── LeaseLost                  another numerusd took the lease over while this one held it (numerusd exits 69)
    ├── StoreError                 the event store could not durably append or read
    │   ├── WalCorrupted           the write-ahead log holds a record that fails its checksum mid-file
    │   └── StreamMismatch         a stream exists with settings that would break an invariant
    ├── AgentError                 an agent could not be started or spoke nonsense
    ├── InvalidTransition          the domain refused an observation the job's state does not allow (a bug)
    └── CommandRefused             a request was understood and refused (unknown job, job already done, …)
        ├── BadRequest             the request does not decode or fails validation; names the path
        │   └── TooLarge           the request is over the size limit; refused before it is decoded
        └── NotFound               the request names a job or task that does not exist

numerusd's exit code is chosen by the class (`numerusd/cli.py`, codes in `protocol/exit_codes.py`); numerusctl
imports none of these: it has its own `CtlError` carrying its exit code.

Third-party errors (nats-py, sqlite3, git, OS errors) are translated into these in one place per dependency:
`streams.jetstream_errors` for NATS and JetStream, `views/database.py` for SQLite, `terminal.py` for starting
agents, `git/command.py` for git (its `GitError` family, in `git/errors.py`, derives from NumerusError).
"""

from __future__ import annotations

import re

#: Characters that would break a message out of its line: C0 and C1 controls, DEL, Unicode line separators.
_BREAKS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(message: str, limit: int = 1000) -> str:
    """`message` as one readable line of at most `limit` characters: what a reply, a header or a log line holds.

    Messages quote what was sent (a field name, a path), and a sender chooses that: newlines and other control
    characters are shown escaped (`\\n`), and a long message is cut with `…`.
    """
    line = _BREAKS.sub(lambda match: repr(match.group())[1:-1], message)
    return line if len(line) <= limit else line[: limit - 1] + "…"


class NumerusError(Exception):
    """Base of every error Numerus raises on purpose."""

    code = "error"

    def __init__(self, message: str, **fields: object) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields


class ConfigError(NumerusError):
    """A setting, flag or configuration file is wrong."""

    code = "config"


class StateLocked(ConfigError):
    """Another numerusd holds the state directory; `pid` names it when its lock file says."""

    code = "state_locked"


class LeaseHeld(StateLocked):
    """Another numerusd holds the lease of the event stream (numerusd/lease.py); `host` and `pid` name it."""

    code = "lease_held"


class LeaseLost(NumerusError):
    """The lease of the event stream passed to another numerusd while this one held it: it stopped writing."""

    code = "lease_lost"


class NatsUnavailable(NumerusError):
    """The NATS server cannot be reached, started or used."""

    code = "nats_unavailable"


class StoreError(NumerusError):
    """The event store could not durably append or read."""

    code = "store"


class WalCorrupted(StoreError):
    """The write-ahead log holds a damaged record before its end."""

    code = "wal_corrupted"


class StreamMismatch(StoreError):
    """A stream exists with settings that would break an invariant (e.g. purge allowed)."""

    code = "stream_mismatch"


class AgentError(NumerusError):
    """An agent could not be started, or its output could not be understood."""

    code = "agent"


class InvalidTransition(NumerusError):
    """An observation of a side effect that cannot happen in the job's state: nothing is recorded."""

    code = "invalid_transition"


class CommandRefused(NumerusError):
    """A request was understood and refused."""

    code = "refused"


class BadRequest(CommandRefused):
    """A request that does not decode or fails validation."""

    code = "bad_request"


class TooLarge(BadRequest):
    """A request over the daemon's size limit (`max_request_bytes`), refused before it is decoded."""

    code = "too_large"


class NotFound(CommandRefused):
    """A request that names a job or task that does not exist."""

    code = "not_found"
