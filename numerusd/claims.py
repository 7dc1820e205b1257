"""Whether a task kept to its claim: the changes of its real diff that no claimed path covers, the escapes its
committed tree holds whatever it claimed, and the commands it ran that it did not claim. Pure.

Before a task runs, its claim is arbitrated against the job's lock table (`numerusd.locks`); after it ran, the
quality gate holds its real diff (`numerusd.git.commit_work`) against the same claim, and a change the claim does
not cover fails the task with a reason the agent can act on. The two read a claimed path differently on purpose:
a lock on a file also covers anything beneath that name (nothing else may create it), while a file claim allows
changes to exactly that path.

`escapes` names what no claim can allow, read from the committed tree (modes and link targets), not from what the
agent says: a path that is absolute or leaves the tree, anything under a `.git`, a symlink pointing out of the
repository, a submodule (gitlink). `reported_outside` names the files the agent itself says it wrote outside its
worktree, and `unclaimed_commands` the commands it ran that its claim did not list.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from numerusd.git import GITLINK_MODE, SYMLINK_MODE, Change
from numerusd.protocol.claims import ClaimedPath


@dataclass(frozen=True, slots=True)
class Violation:
    """A change no claim covers: the path, the change, and why, in a sentence an agent can act on."""

    path: str
    change: Change | None
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


def escapes(changes: Iterable[Change]) -> list[Violation]:
    """The changes that leave the repository or reach into git, whatever the claim says. Pure.

    Each path of a change (both halves of a rename) is named when it is absolute, leaves the tree (`..`), or has
    a `.git` component (the worktree's own `.git`, a `.git` directory nested anywhere: a repository planted in
    the tree; compared as git compares it, ignoring case). A symlink added or changed is named when its target
    is absolute or leads out of the repository's root; a gitlink (mode 160000: an embedded repository or a
    submodule) is named whatever it points at.
    """
    violations: list[Violation] = []
    for change in changes:
        for path in dict.fromkeys(p for p in (change.old_path, change.path) if p is not None):
            reason = _escaping_path(path)
            if reason is not None:
                violations.append(Violation(path, change, reason))
        if GITLINK_MODE in (change.mode, change.old_mode):
            why = "a submodule (gitlink, mode 160000): an embedded git repository, which Numerus does not merge"
            violations.append(Violation(change.path, change, why))
        if change.mode == SYMLINK_MODE and change.target is not None and _link_leaves(change.path, change.target):
            violations.append(Violation(change.path, change, f"a symlink to {change.target}, outside the repository"))
    return violations


def reported_outside(paths: Iterable[str]) -> list[Violation]:
    """The files the agent reported writing that are outside its worktree (absolute, or leaving it by `..`)."""
    return [
        Violation(path, None, "the agent reported writing it, outside its worktree")
        for path in dict.fromkeys(paths)
        if _escaping_path(path) is not None
    ]


def unclaimed_commands(ran: Iterable[str], claimed: Iterable[str]) -> list[Violation]:
    """The commands run that the claim did not list. Pure.

    A command run is read as its shell would: a `sh -c`/`bash -lc` wrapper (how codex reports every command) is
    unwrapped, and the script is cut at `;`, `&&`, `||`, `|`, `&` and newlines. Each part must start with the
    words of some claimed command (claimed `pytest` covers `pytest -q tests/`; `rm` does not cover `rmdir`), and a
    command substitution (`$(…)` or backticks) or redirection is covered only by a claimed command holding it too.
    """
    allowed = [_words(command) for command in claimed]
    allowed = [words for words in allowed if words]
    violations = []
    for command in dict.fromkeys(ran):
        for part in _script_parts(command):
            words = _words(part)
            # A substitution or a redirection hides another command or a file behind the words: exact match only.
            exact = any(mark in part for mark in ("$(", "`", ">", "<"))
            if words and not any((words == claim) if exact else (words[: len(claim)] == claim) for claim in allowed):
                why = f"the command `{part}` was run, which the claim does not list"
                violations.append(Violation(command, None, why))
                break
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


def _escaping_path(path: str) -> str | None:
    """Why a changed path escapes the repository (absolute, `..`, a `.git` in it), or None."""
    if path.startswith("/"):
        return "an absolute path, outside the repository"
    parts = path.split("/")
    if ".." in parts and posixpath.normpath(path).split("/")[0] == "..":
        return "a path leaving the repository (..)"
    if path == ".git":
        return "the worktree's own .git, replaced or rewritten: git's files, never the task's work"
    if any(part.rstrip(". ").lower() == ".git" for part in parts):
        return "a path inside a .git directory: git's own files, never the task's work"
    return None


def _link_leaves(path: str, target: str) -> bool:
    if target.startswith("/"):
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
    return resolved == ".." or resolved.startswith("../")


_SHELLS = frozenset({"sh", "bash", "zsh", "dash"})
#: Where a shell script holds more than one command.
_SEPARATORS = re.compile(r"\|\||&&|[;|&\n]")


def _script_parts(command: str) -> list[str]:
    """The commands a reported command line runs: its `sh -c` script unwrapped, cut at the shell's separators."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return [command]
    if len(argv) == 3 and posixpath.basename(argv[0]) in _SHELLS and argv[1] in ("-c", "-lc"):
        command = argv[2]
    return [part.strip() for part in _SEPARATORS.split(command) if part.strip()]


def _words(command: str) -> list[str]:
    try:
        return shlex.split(command)
    except ValueError:
        return command.split()
