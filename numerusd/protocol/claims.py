"""A task's claim: the files and directories its executor says it will touch, and the commands it will run.

Before a task runs, its executor is asked in a read-only sandbox (`codex exec --output-schema`) what it will
create, modify, delete or only read. The answer is decoded here, once, into a `Claim`; `numerusd.locks` then
normalises its paths and arbitrates it against the job's lock table (GO or NO GO). `output_schema()` is the
JSON Schema handed to `--output-schema`, in the strict structured-outputs subset so that the model's decoder can
be constrained by it: every object closed (`additionalProperties: false`), every property required, no `$ref`.

`Lock`, `Conflict` and `PathRefused` are what arbitration records in the claim events (`ClaimGranted`,
`ClaimDenied`, and a refused claim), so they live here, where `numerusctl` and other tools can import them.

Types only: nothing here does I/O.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import msgspec

#: What a claimed path is. A `file` claim on a path also covers anything that would have to live beneath it.
PathKind = Literal["file", "dir"]

#: What the task will do to a path. `read` is shared with other readers; the other three are exclusive.
PathMode = Literal["create", "modify", "delete", "read"]

#: The modes that write, and so exclude every other task from the path.
WRITE_MODES: frozenset[str] = frozenset({"create", "modify", "delete"})


class ClaimedPath(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One path the executor will touch, relative to the repository root, and how."""

    path: Annotated[
        str,
        msgspec.Meta(
            description=(
                "Path relative to the repository root, with '/' between directories, e.g. 'src/app/main.py' or "
                "'docs/'. Never absolute, never leaving the repository with '..'."
            )
        ),
    ]
    kind: Annotated[
        PathKind,
        msgspec.Meta(description="'file' for one file; 'dir' for a directory and everything beneath it."),
    ]
    mode: Annotated[
        PathMode,
        msgspec.Meta(
            description=(
                "'create' a new path, 'modify' an existing one, 'delete' it, or only 'read' it (read paths "
                "are shared with other tasks; the others are exclusive)."
            )
        ),
    ]


class Claim(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Everything a task says it will touch before it runs: the paths, and the shell commands it will run."""

    paths: Annotated[
        tuple[ClaimedPath, ...],
        msgspec.Meta(description="Every file or directory the task will create, modify, delete or read."),
    ]
    commands: Annotated[
        tuple[str, ...],
        msgspec.Meta(description="Every shell command the task expects to run, e.g. 'pytest -q tests/'."),
    ]


#: The one decoder for an executor's claim answer (habit: decode at the edge, once).
CLAIM_DECODER = msgspec.json.Decoder(Claim)


def decode_claim(raw: bytes | str) -> Claim:
    """The claim in an executor's answer; `msgspec.ValidationError` names the bad path, e.g. `$.paths[0].mode`."""
    return CLAIM_DECODER.decode(raw)


def output_schema() -> dict[str, Any]:
    """The JSON Schema for `codex exec --output-schema`, in the strict structured-outputs subset."""
    root = strict_schema(Claim)
    root["title"] = "Claim"
    return root


def strict_schema(cls: type[msgspec.Struct]) -> dict[str, Any]:
    """`cls`'s JSON Schema made strict for structured outputs (claims and review verdicts use it).

    Generated from the type so it cannot drift from what its decoder accepts, then made strict: `$ref`s inlined
    (the root must be a plain object), titles dropped, every object closed with all its properties required,
    and every enum typed.
    """
    schema = msgspec.json.schema(cls)
    defs = schema.pop("$defs", {})
    return _strict(schema, defs)


def _strict(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_strict(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        # Inline: every strict-mode consumer accepts a self-contained schema, not all of them resolve refs.
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        return _strict(copy.deepcopy(target), defs)
    out = {key: _strict(value, defs) for key, value in node.items() if key != "title"}
    if out.get("type") == "object":
        out["additionalProperties"] = False
        out["required"] = list(out.get("properties", {}))
    if "enum" in out and "type" not in out and all(isinstance(value, str) for value in out["enum"]):
        out["type"] = "string"
    return out


# --- what arbitration records in events --------------------------------------------------------------------


class Lock(msgspec.Struct, frozen=True, order=True):
    """One lock a task holds or waits for: a normalised path and the claim's mode.

    `path` is what `numerusd.locks.normalise` made of the claimed path: POSIX, relative to the worktree, a
    directory ending with `/`, the whole worktree as `./`. A lock covers its path and everything beneath it.
    """

    path: str
    mode: PathMode

    @property
    def writes(self) -> bool:
        """True for create, modify and delete, which exclude every other task; False for a shared read."""
        return self.mode in WRITE_MODES


class Conflict(msgspec.Struct, frozen=True, kw_only=True):
    """Why a claim got NO GO: one of its paths overlaps a lock of another task, held or queued ahead of it.

    `path` is the claimed path, `holder_path` the overlapping lock (the same path, a directory above it or a path
    beneath it). `queued` is False when `holder` holds that lock now, True when `holder` was denied earlier and
    waits for it: first come, first served, so a later claim may not jump ahead of it.
    """

    path: str
    holder: str
    holder_mode: PathMode
    holder_path: str
    queued: bool = False

    def __str__(self) -> str:
        where = self.path if self.holder_path == self.path else f"{self.path} overlaps {self.holder_path},"
        if self.queued:
            return f"{where} wanted by {self.holder} ({self.holder_mode}), which was denied first and waits"
        return f"{where} held by {self.holder} ({self.holder_mode})"


class PathRefused(msgspec.Struct, frozen=True, kw_only=True):
    """A claimed path that cannot be locked, and why (absolute, empty, leaving the worktree, …)."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path!r} {self.reason}"
