"""Whether a task kept to its claim: the changes of its real diff that no claimed path covers. Pure.

Before a task runs, its claim is arbitrated against the job's lock table (`numerusd.locks`); after it ran, the
quality gate holds its real diff (`numerusd.git.commit_work`) against the same claim, and a change the claim does
not cover fails the task with a reason the agent can act on. The two read a claimed path differently on purpose:
a lock on a file also covers anything beneath that name (nothing else may create it), while a file claim allows
changes to exactly that path.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from numerusd.git import Change
from numerusd.protocol.claims import ClaimedPath


@dataclass(frozen=True, slots=True)
class Violation:
    """A change no claim covers: the path, the change, and why, in a sentence an agent can act on."""

    path: str
    change: Change
    reason: str


def outside_claim(changes: Iterable[Change], claimed: Iterable[ClaimedPath]) -> list[Violation]:
    """The changes no claim covers. Pure.

    A claimed path of kind `file` covers exactly that path, one of kind `dir` everything beneath it (`.`, `./` or
    `""` is the whole repository). Modes cover change kinds:

        claim mode   a file claim covers   a dir claim covers, beneath it
        create       add                   add
        modify       modify                add, modify   (adding a file changes the directory's contents)
        delete       delete                delete
        read         nothing               nothing

    A rename needs both halves covered: a delete of the old path and an add of the new one. Paths compare
    exactly (case-sensitive, after normalising `./`, `//` and a trailing `/`).
    """
    claims = [(_normalise(c.path), c.kind, c.mode) for c in claimed]
    violations: list[Violation] = []
    for change in changes:
        if change.kind == "rename":
            if change.old_path is None:
                raise ValueError(f"a rename to {change.path} does not name its old path")
            halves = ((change.old_path, "delete"), (change.path, "add"))
        else:
            halves = ((change.path, change.kind),)
        for path, kind in halves:
            reason = _uncovered(claims, _normalise(path), kind)
            if reason is not None:
                if change.kind == "rename":
                    reason = f"renamed {change.old_path} -> {change.path}: {reason}"
                violations.append(Violation(path, change, reason))
    return violations


# --- inside ---------------------------------------------------------------------------------------------

_FILE_COVERS: dict[str, frozenset[str]] = {
    "create": frozenset({"add"}),
    "modify": frozenset({"modify"}),
    "delete": frozenset({"delete"}),
}
_DIR_COVERS: dict[str, frozenset[str]] = {
    "create": frozenset({"add"}),
    "modify": frozenset({"add", "modify"}),
    "delete": frozenset({"delete"}),
}
_VERB = {"add": "created", "modify": "modified", "delete": "deleted"}


def _normalise(path: str) -> str:
    path = posixpath.normpath(path.strip()) if path.strip() else "."
    return "" if path == "." else path.removeprefix("./")


def _beneath(path: str, directory: str) -> bool:
    return directory == "" or path == directory or path.startswith(directory + "/")


def _uncovered(claims: Sequence[tuple[str, str, str]], path: str, kind: str) -> str | None:
    """None when some claim covers `kind` at `path`, else why not."""
    near: list[str] = []
    for claim_path, claim_kind, mode in claims:
        if claim_kind == "dir":
            if not _beneath(path, claim_path):
                continue
            if kind in _DIR_COVERS.get(mode, frozenset()):
                return None
            near.append(f"directory {claim_path or '.'} is claimed for {mode}")
        else:
            if path != claim_path:
                continue
            if kind in _FILE_COVERS.get(mode, frozenset()):
                return None
            near.append(f"it is claimed for {mode}")
    if near:
        return f"{_VERB[kind]}, but {'; '.join(near)}"
    return f"{_VERB[kind]}, but no claim covers it"
