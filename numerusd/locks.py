"""The lock table of a job: which task may touch which paths, GO or NO GO, derived from claim events alone.

A task's claim (see `numerusd.protocol.claims`) is normalised into `Lock`s and arbitrated against the table:

    locks = claim_locks(claim, worktree)          # -> tuple[Lock, ...] | BadClaim   (the edge; may read symlinks)
    decision = arbitrate(table, task, locks)      # -> Granted | Denied              (decide: pure)
    table = apply_granted(table, task, locks)     # ClaimGranted                     (evolve: pure)
    table = apply_denied(table, task, locks)      # ClaimDenied
    table = release(table, task)                  # LocksReleased
    wakeable(table)                               # waiting tasks to re-arbitrate now, FIFO

The model, in four rules (docs/locks.md has the reasoning and the proofs):

- **A lock covers its path and everything beneath it.** A directory lock covers its subtree; a file lock on `a/b`
  also covers `a/b/…`, since nothing can live there without `a/b` becoming a directory. Two locks overlap when one
  path is at or beneath the other.
- **Readers share, writers exclude.** Overlapping locks of two different tasks conflict unless both are `read`.
  A task's own locks never conflict with each other.
- **All or nothing.** A claim is granted whole or not at all, and a task that holds locks never waits: it must
  release before it claims again. So no task ever holds some locks while waiting for others, and no cycle of
  waiting tasks can form: deadlock is impossible by construction.
- **First come, first served on overlapping paths.** A denied claim joins a FIFO queue and keeps its place while it
  asks for no more than it queued with; a later claim that overlaps it conflicts with it as if it were held. So a
  big claim cannot be starved by a stream of small ones, and claims that overlap nothing queued go ahead at once.

Everything here is pure: no clock, no NATS, no I/O, except `normalise`/`claim_locks`, which read symlinks on disk
when (and only when) they are given a worktree. That happens once, when the executor's claim arrives; the locks
recorded in the events are already normalised, so folding the events never touches the disk.
"""

from __future__ import annotations

import bisect
import functools
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import msgspec

from numerusd.protocol.claims import Claim, Conflict, Lock, PathKind, PathMode, PathRefused

#: The normalised name of the whole worktree, as a directory.
ROOT = "./"


# --- normalisation ------------------------------------------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def normalise(path: str, worktree: Path | None = None, *, kind: PathKind = "file") -> str | PathRefused:
    """`path` as a lock names it, or why it cannot be locked.

    The result is POSIX and relative to the worktree, with `.` and repeated `/` removed and `..` resolved; a
    directory ends with `/` and the whole worktree is `./`. Refused: empty paths, absolute paths, `~`, backslashes,
    control characters, a `..` that climbs out, anything inside `.git`, a file path ending with `/`. Given
    `worktree`, symlinks are followed on disk: a path that leads outside is refused, and one that stays inside is
    named by where it really leads, so two names for one file (a symlink and its target) cannot be locked by two
    tasks at once.
    """

    def refuse(reason: str) -> PathRefused:
        return PathRefused(path=path, reason=reason)

    if not path.strip():
        return refuse("is empty: name a file or directory relative to the repository root")
    if _CONTROL.search(path):
        return refuse("contains a control character (NUL, newline, tab, …): a path must be printable")
    if "\\" in path:
        return refuse("contains a backslash: separate directories with '/'")
    if path.startswith("/"):
        return refuse("is absolute: give it relative to the repository root, e.g. 'src/main.py'")
    if path.startswith("~"):
        return refuse("starts with '~' (a home directory): give it relative to the repository root")
    if kind == "file" and path.endswith("/"):
        return refuse("ends with '/' but is claimed as a file: claim it with kind 'dir'")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part != "..":
            parts.append(part)
        elif parts:
            parts.pop()
        else:
            return refuse("leaves the worktree through '..'")
    if worktree is not None:
        # Follow the path as the agent's open() would: component by component, symlinks included. The raw path
        # is resolved, not the collapsed one, since 'link/..' is not '.' when 'link' points elsewhere.
        root = os.path.realpath(worktree)
        target = os.path.realpath(os.path.join(root, path))
        if target != root and not target.startswith(root.rstrip(os.sep) + os.sep):
            return refuse(f"leads outside the worktree through a symlink (to {target})")
        relative = os.path.relpath(target, root)
        parts = [] if relative == "." else relative.split(os.sep)
    if parts and parts[0] == ".git":
        # The same rule as plan intents: git's own files (in a worktree, a pointer to the shared repository) are
        # the daemon's to change, never a task's.
        return refuse("is inside .git, which no task may touch")
    if not parts:
        if kind == "file":
            return refuse("names the worktree itself, not a file: claim '.' with kind 'dir' to lock everything")
        return ROOT
    joined = "/".join(parts)
    return joined + "/" if kind == "dir" else joined


class BadClaim(msgspec.Struct, frozen=True):
    """A claim with paths that cannot be locked: every one of them, so the executor can fix all at once."""

    errors: tuple[PathRefused, ...]

    def __str__(self) -> str:
        return "; ".join(str(error) for error in self.errors)


def canonical(locks: Iterable[Lock]) -> tuple[Lock, ...]:
    """`locks` sorted with duplicates removed: the form recorded in events, so equal claims give equal events."""
    return tuple(sorted(set(locks)))


def claim_locks(claim: Claim, worktree: Path | None = None) -> tuple[Lock, ...] | BadClaim:
    """The locks a claim asks for, canonical, or every path of it that was refused."""
    locks: list[Lock] = []
    errors: list[PathRefused] = []
    for claimed in claim.paths:
        result = normalise(claimed.path, worktree, kind=claimed.kind)
        if isinstance(result, PathRefused):
            errors.append(result)
        else:
            locks.append(Lock(result, claimed.mode))
    return BadClaim(tuple(errors)) if errors else canonical(locks)


# --- the index ----------------------------------------------------------------------------------------------


def _key(path: str) -> str:
    """The node a lock covers, as a prefix: '' for the root, else the path with one trailing '/'.

    A file `a/b` and a directory `a/b/` are the same node: with this key, "overlaps" is "one key is a prefix of
    the other", for files and directories alike.
    """
    if path == ROOT:
        return ""
    return path if path.endswith("/") else path + "/"


class _Node(NamedTuple):
    key: str
    ancestors: tuple[str, ...]  # '', 'a/', 'a/b/', …, the key itself: the nodes whose lock would cover this one


@functools.lru_cache(maxsize=1 << 16)
def _node(path: str) -> _Node:
    # Cached: the same paths are arbitrated again and again (re-claims, wakeable), and this is string slicing.
    key = _key(path)
    ancestors = [""]
    prefix = ""
    for part in key.split("/")[:-1]:
        prefix += part + "/"
        ancestors.append(prefix)
    return _Node(key, tuple(ancestors))


class _Entry(NamedTuple):
    task: str
    mode: PathMode
    path: str
    writes: bool


class _Index:
    """Locks by node key, copied on write. Keys are kept sorted so the keys beneath one form a contiguous run."""

    __slots__ = ("entries", "keys")

    def __init__(self, entries: dict[str, tuple[_Entry, ...]], keys: list[str]) -> None:
        self.entries = entries
        self.keys = keys

    def add(self, task: str, locks: Iterable[Lock]) -> _Index:
        entries = dict(self.entries)
        keys = self.keys
        copied = False
        for lock in locks:
            key = _node(lock.path).key
            entry = _Entry(task, lock.mode, lock.path, lock.writes)
            old = entries.get(key)
            if old is None:
                if not copied:
                    keys, copied = list(keys), True
                bisect.insort(keys, key)
                entries[key] = (entry,)
            else:
                entries[key] = (*old, entry)
        return _Index(entries, keys)

    def remove(self, task: str, locks: Iterable[Lock]) -> _Index:
        entries = dict(self.entries)
        keys = list(self.keys)
        for lock in locks:
            key = _node(lock.path).key
            old = entries.get(key)
            if old is None:
                continue  # already emptied by another lock of this task on the same node
            kept = tuple(entry for entry in old if entry.task != task)
            if kept:
                entries[key] = kept
            else:
                del entries[key]
                del keys[bisect.bisect_left(keys, key)]
        return _Index(entries, keys)

    def overlapping(self, node: _Node) -> list[_Entry]:
        """Every entry at the node, above it (a directory that covers it) or beneath it."""
        entries = self.entries
        if not entries:
            return []
        found: list[_Entry] = []
        for prefix in node.ancestors:
            at = entries.get(prefix)
            if at:
                found += at
        # Beneath: keys with the node's key as a proper prefix sort right after it, one contiguous run.
        key, keys = node.key, self.keys
        index = bisect.bisect_right(keys, key)
        while index < len(keys) and keys[index].startswith(key):
            found += entries[keys[index]]
            index += 1
        return found


_NO_INDEX = _Index({}, [])


# --- the table ----------------------------------------------------------------------------------------------


class LockTable:
    """The locks of one job: who holds what, and who waits for what in FIFO order. An immutable value.

    Built only by folding claim events through `apply_granted`, `apply_denied` and `release`, starting from
    `EMPTY`; two tables are equal when they hold the same locks and queue the same claims in the same order.
    """

    __slots__ = ("_held", "_holds", "_next_ticket", "_queue", "_queued", "_tickets")

    def __init__(
        self,
        holds: dict[str, tuple[Lock, ...]] | None = None,
        queue: dict[str, tuple[Lock, ...]] | None = None,
    ) -> None:
        """A table with these holders and this queue (FIFO in dict order), its indexes built from scratch."""
        self._holds: dict[str, tuple[Lock, ...]] = dict(holds or {})
        self._queue: dict[str, tuple[Lock, ...]] = dict(queue or {})
        self._tickets: dict[str, int] = {task: ticket for ticket, task in enumerate(self._queue)}
        self._next_ticket = len(self._queue)
        self._held = _NO_INDEX
        for task, locks in self._holds.items():
            self._held = self._held.add(task, locks)
        self._queued = _NO_INDEX
        for task, locks in self._queue.items():
            self._queued = self._queued.add(task, locks)

    def _with(self, **changes: object) -> LockTable:
        new = object.__new__(LockTable)
        for name in LockTable.__slots__:
            object.__setattr__(new, name, changes.get(name.lstrip("_"), getattr(self, name)))
        return new

    @property
    def holders(self) -> Mapping[str, tuple[Lock, ...]]:
        """Tasks holding locks, each with every lock of its granted claim, in grant order."""
        return MappingProxyType(self._holds)

    @property
    def waiting(self) -> tuple[str, ...]:
        """Tasks denied and waiting, in the order of their first denial."""
        return tuple(self._queue)

    def held_by(self, task: str) -> tuple[Lock, ...]:
        """The locks `task` holds: all of its claim, or none."""
        return self._holds.get(task, ())

    def queued_claim(self, task: str) -> tuple[Lock, ...] | None:
        """The claim `task` waits with, or None when it is not waiting."""
        return self._queue.get(task)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LockTable):
            return NotImplemented
        return self._holds == other._holds and list(self._queue.items()) == list(other._queue.items())

    __hash__ = None  # type: ignore[assignment]  # like the dicts it is made of; nothing needs to hash a table

    def __repr__(self) -> str:
        return f"LockTable(holders={self._holds!r}, waiting={self._queue!r})"


#: The table of a job before any claim.
EMPTY = LockTable()


# --- decide: GO or NO GO ------------------------------------------------------------------------------------


class Granted(msgspec.Struct, frozen=True):
    """GO: the task gets every lock of its claim (canonical)."""

    locks: tuple[Lock, ...]


class Denied(msgspec.Struct, frozen=True):
    """NO GO: the task gets none of its locks; `conflicts` name every task in the way, holding or queued first."""

    locks: tuple[Lock, ...]
    conflicts: tuple[Conflict, ...]

    @property
    def holders(self) -> tuple[str, ...]:
        """The tasks in the way, each once, in the order of `conflicts`."""
        return tuple(dict.fromkeys(conflict.holder for conflict in self.conflicts))

    def __str__(self) -> str:
        return "NO GO: " + "; ".join(str(conflict) for conflict in self.conflicts)


def conflicts_with(table: LockTable, task: str, locks: Iterable[Lock], *, queue: bool = True) -> list[Conflict]:
    """Every lock of another task that `locks` conflict with: held ones, then (with `queue`) queued ones.

    A queued claim counts only if it was denied before `task`'s own: that is the first-come-first-served rule. A
    task not waiting, or waiting with a claim that `locks` do not fit in, comes after all of them.
    """
    locks = tuple(locks)  # read twice below: a generator would be empty the second time, and say GO
    own_ticket = _place(table, task, locks)
    tickets = table._tickets
    found: dict[Conflict, None] = {}  # an ordered set: one claim may name a path twice (read and modify)
    for lock in locks:
        node = _node(lock.path)
        writes = lock.writes
        for entry in table._held.overlapping(node):
            if entry.task != task and (writes or entry.writes):
                found[_conflict(lock, entry, queued=False)] = None
        if not queue:
            continue
        for entry in table._queued.overlapping(node):
            if entry.task == task or not (writes or entry.writes):
                continue
            if own_ticket is not None and tickets[entry.task] > own_ticket:
                continue  # queued after `task`: it waits behind `task`, not the other way round
            found[_conflict(lock, entry, queued=True)] = None
    return list(found)


def _place(table: LockTable, task: str, locks: Iterable[Lock]) -> int | None:
    """`task`'s place in the queue for a claim of `locks`, or None when that claim would queue at the back.

    The place is kept for the claim queued with, or any part of it. A claim asking for more is a new claim: kept
    in place, it would reserve new paths ahead of tasks already waiting for them, and they would have a task in
    their way that their own NO GO never named.
    """
    queued = table._queue.get(task)
    if queued is None or not set(locks) <= set(queued):
        return None
    return table._tickets[task]


def _conflict(lock: Lock, entry: _Entry, *, queued: bool) -> Conflict:
    return Conflict(path=lock.path, holder=entry.task, holder_mode=entry.mode, holder_path=entry.path, queued=queued)


def arbitrate(table: LockTable, task: str, locks: Iterable[Lock]) -> Granted | Denied:
    """GO or NO GO for `task`'s claim, all or nothing.

    Granted when no lock of the claim conflicts with a lock another task holds, nor with the claim of a task
    that was denied before this one and still waits. A waiting task arbitrated again with the claim it waits with
    (or a part of it) keeps its place in the queue; with a claim asking for more, it is judged as a newcomer. A
    task that holds locks must release them before claiming again: a holder never waits, which is what rules
    deadlock out (see the module docstring).
    """
    if task in table._holds:
        raise ValueError(
            f"task {task} already holds locks; release them before claiming again "
            "(a task that holds locks must never wait for more)"
        )
    wanted = canonical(locks)
    conflicts = conflicts_with(table, task, wanted)
    return Denied(wanted, tuple(conflicts)) if conflicts else Granted(wanted)


# --- evolve: what the events do to the table ----------------------------------------------------------------


def apply_granted(table: LockTable, task: str, locks: Iterable[Lock]) -> LockTable:
    """The table after `ClaimGranted`: `task` holds all of `locks` and no longer waits.

    A grant that cannot apply leaves the table unchanged, so that the fold itself guarantees no two tasks ever
    hold conflicting locks, whatever the stream says: `task` already holds locks, or `locks` conflict with another
    task's (two decisions made concurrently on the same state; the daemon must act on the folded table).
    """
    wanted = canonical(locks)
    if task in table._holds or conflicts_with(table, task, wanted, queue=False):
        return table
    table = _withdraw(table, task)
    return table._with(holds={**table._holds, task: wanted}, held=table._held.add(task, wanted))


def apply_denied(table: LockTable, task: str, locks: Iterable[Lock]) -> LockTable:
    """The table after `ClaimDenied`: `task` waits with `locks`, at the back of the queue, or at its old place
    when `locks` ask for nothing more than it already waited with."""
    wanted = canonical(locks)
    if task in table._holds:
        return table  # a holder is never denied; this event does not apply
    old = table._queue.get(task)
    if old is not None:
        if old == wanted:
            return table
        if _place(table, task, wanted) is not None:
            queued = table._queued.remove(task, old).add(task, wanted)
            return table._with(queue={**table._queue, task: wanted}, queued=queued)  # dict update keeps the place
        table = _withdraw(table, task)
    return table._with(
        queue={**table._queue, task: wanted},
        queued=table._queued.add(task, wanted),
        tickets={**table._tickets, task: table._next_ticket},
        next_ticket=table._next_ticket + 1,
    )


def release(table: LockTable, task: str) -> LockTable:
    """The table after `LocksReleased`: `task` holds nothing and waits for nothing (done, failed, killed)."""
    table = _withdraw(table, task)
    held = table._holds.get(task)
    if held is None:
        return table
    holds = dict(table._holds)
    del holds[task]
    return table._with(holds=holds, held=table._held.remove(task, held))


def _withdraw(table: LockTable, task: str) -> LockTable:
    queued = table._queue.get(task)
    if queued is None:
        return table
    queue = dict(table._queue)
    del queue[task]
    tickets = dict(table._tickets)
    del tickets[task]
    return table._with(queue=queue, tickets=tickets, queued=table._queued.remove(task, queued))


# --- queries ------------------------------------------------------------------------------------------------


def waits_for(table: LockTable) -> dict[str, tuple[str, ...]]:
    """For each waiting task, in FIFO order, the tasks now in its way: holders, or waiters queued before it.

    Edges only ever point to a holder (which waits for nothing) or to an earlier waiter, so this graph has no
    cycle. A waiting task with no edge is `wakeable`.
    """
    graph: dict[str, tuple[str, ...]] = {}
    for task, locks in table._queue.items():
        graph[task] = tuple(dict.fromkeys(conflict.holder for conflict in conflicts_with(table, task, locks)))
    return graph


def wakeable(table: LockTable, waiting: Iterable[str] | None = None) -> list[str]:
    """Waiting tasks to re-arbitrate now, in FIFO order: each would be granted, and granting them all in this
    order succeeds, since none conflicts with a claim queued before it.

    `waiting` narrows the check to some waiting tasks. After task X releases, the only tasks that can have become
    wakeable are those whose last `ClaimDenied` named X: the tasks in a waiter's way only ever leave it (a later
    claim that overlaps it is queued behind it, never granted before it), so passing those saves re-checking
    the whole queue.
    """
    candidates = None if waiting is None else set(waiting)
    return [
        task
        for task, locks in table._queue.items()
        if (candidates is None or task in candidates) and not conflicts_with(table, task, locks)
    ]
