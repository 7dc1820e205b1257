"""The exit codes of both programs, each defined here once; scripts and systemd act on them.

numerusd follows sysexits(3), so a service manager can tell a failure worth a restart from one that needs a
person: `Restart=on-failure` with `RestartPreventExitStatus=75 78` (see systemd/numerusd.service).
numerusctl keeps small codes a shell script can test: failed, misused, could not reach the daemon, or the
daemon runs but its bus does not answer.
Each program chooses its code by the type of the error, never by its message.
"""

from __future__ import annotations

from enum import IntEnum


class DaemonExit(IntEnum):
    """How `numerusd` ends."""

    #: Stopped cleanly (SIGINT, SIGTERM) or the command finished.
    OK = 0
    #: EX_UNAVAILABLE: NATS cannot be reached, started or used, or the server is too old; or the lease of the
    #: stream passed to another numerusd while this one held it (a restart with --standby stands by again).
    UNAVAILABLE = 69
    #: EX_SOFTWARE: an internal error (see the log).
    SOFTWARE = 70
    #: EX_TEMPFAIL: another numerusd holds the state directory, or the lease of the stream (without --standby).
    LOCKED = 75
    #: EX_CONFIG: a setting, flag or configuration file is wrong.
    CONFIG = 78


class CtlExit(IntEnum):
    """How `numerusctl` ends."""

    #: The command did what was asked.
    OK = 0
    #: Refused or failed: an error reply, a job that failed under `run --wait`, a problem found by `audit verify`.
    FAILED = 1
    #: Misused: a bad option or argument, a missing or unreadable key file.
    USAGE = 2
    #: numerusd cannot be reached: no daemon runs (or it runs elsewhere than where numerusctl looks).
    UNREACHABLE = 3
    #: numerusd runs (its pid in connection.json is alive) but its NATS server does not answer: wait or look.
    BUS_DOWN = 4
