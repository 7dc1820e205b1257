"""Identifiers: time-ordered, URL- and NATS-subject-safe ULIDs, and the rule for task ids."""

from __future__ import annotations

import os
import re
import time

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"

#: A token that may stand in a NATS subject, a file name and a git branch name. It may not start with `-`, so
#: it can never be read as an option by git or any other command it is passed to.
TOKEN = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$")
#: A whole job id: 26 characters, as many as a ULID has (a reference to a job, `last` or a part of an id, is shorter).
WHOLE_ID = re.compile(r"^[A-Za-z0-9]{26}$")


def new_ulid(now_ns: int | None = None) -> str:
    """A 26-character ULID: 48 bits of milliseconds then 80 random bits, Crockford base32."""
    ms = (now_ns if now_ns is not None else time.time_ns()) // 1_000_000
    value = (ms << 80) | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def is_token(value: str) -> bool:
    """True when `value` can be used as one NATS subject token and one path component."""
    return bool(TOKEN.match(value))


def is_whole_id(value: str) -> bool:
    """True when `value` has the shape of a whole job id (26 letters and digits), not of a reference to one."""
    return bool(WHOLE_ID.match(value))
