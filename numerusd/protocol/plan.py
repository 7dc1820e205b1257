"""The plan a planner agent answers: tasks, their dependencies and file intents, and the schema it answers with.

Types only, no I/O; the daemon and `numerusctl` both import it. `numerusd/plans.py` validates a plan, hashes it
and renders it. `output_schema()` is the JSON Schema given to `codex exec --output-schema`
(`schemas/plan.schema.json`): the same types, rewritten into the subset that OpenAI strict structured outputs
accept, because codex sends the file as-is with `"strict": true`.
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

import msgspec

from numerusd.protocol.ids import TOKEN

#: A task id: one NATS subject token and one path component, since it names `numerus.job.<job>.task.<id>.…`
#: subjects, a git branch `numerus/<job>/<id>` and a worktree directory.
TaskId = Annotated[
    str,
    msgspec.Meta(
        pattern=TOKEN.pattern,
        description="A task id: 1 to 64 letters, digits, '_' or '-' (for example t1, t2).",
    ),
]

IntentMode = Literal["create", "modify", "delete"]

#: Roles a plan may give a task; the planner, queen and reviewer roles belong to the job, not to its tasks.
TaskRole = Literal["executor"]


class FileIntent(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A file or set of files a task expects to create, modify or delete."""

    path: Annotated[
        str,
        msgspec.Meta(
            description=(
                "Path relative to the repository root, or a glob such as src/**/*.py "
                "(* ? [abc] and ** as a whole path component). Never absolute, never outside the repository."
            )
        ),
    ]
    mode: Annotated[IntentMode, msgspec.Meta(description="What the task does to the path.")]


class PlannedTask(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One step of the plan, done by one agent in its own worktree once every task it depends on is done."""

    id: TaskId
    title: Annotated[str, msgspec.Meta(description="A short imperative title, under 80 characters.")]
    instructions: Annotated[
        str,
        msgspec.Meta(description="Everything the agent doing this task needs to know; it sees nothing else."),
    ]
    role: Annotated[TaskRole, msgspec.Meta(description="Who does the task.")] = "executor"
    deps: Annotated[
        tuple[TaskId, ...],
        msgspec.Meta(description="Ids of the tasks that must be done before this one starts; [] if none."),
    ] = ()
    intents: Annotated[
        tuple[FileIntent, ...],
        msgspec.Meta(description="The files this task expects to create, modify or delete; [] if none."),
    ] = ()


class Plan(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A goal broken into tasks that form a directed acyclic graph through their dependencies."""

    summary: Annotated[str, msgspec.Meta(description="One or two sentences: what the plan achieves and how.")]
    tasks: Annotated[
        tuple[PlannedTask, ...],
        msgspec.Meta(min_length=1, description="The tasks; independent tasks run in parallel."),
    ]


class PlanError(msgspec.Struct, frozen=True, kw_only=True):
    """One reason a plan was rejected: where in the planner's JSON (`$.tasks[2].deps[0]`) and what is wrong."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


# --- the schema for `codex exec --output-schema` -----------------------------------------------------------

#: The keywords OpenAI strict structured outputs accept that this schema uses; `tests/test_plans.py` walks the
#: schema and refuses any other (`default`, `minLength`, `$ref`, `allOf`, … are rejected or unsupported there).
STRICT_KEYWORDS = frozenset(
    {"type", "title", "description", "properties", "required", "additionalProperties", "items", "enum", "pattern"}
    | {"minItems"}
)


def output_schema() -> dict[str, Any]:
    """The JSON Schema of `Plan` for `codex exec --output-schema`, in OpenAI's strict structured-output subset.

    Codex sends the file unchanged as `text.format = {type: json_schema, strict: true, schema}`, and strict mode
    requires every object to list all its properties in `required` and to set `additionalProperties: false`.
    So fields with defaults become required (the model answers `[]` for no deps), `default` is dropped, `$ref`s
    are inlined, and an enum gets an explicit `"type": "string"`. Properties keep the order of the fields, which
    is the order the model writes them in (id, title, instructions before deps and intents).
    """
    root, components = msgspec.json.schema_components([Plan], ref_template="#/$defs/{name}")
    return _strict(root[0], components)


def _strict(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, list):
        return [_strict(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].rsplit("/", 1)[-1]])
        # A field's own description (from its Meta) says more than the class docstring.
        return _strict({**target, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
    out = {key: _strict(value, defs) for key, value in node.items() if key != "default"}
    if "properties" in out:
        out["type"] = "object"
        out["required"] = list(out["properties"])
        out["additionalProperties"] = False
    if "enum" in out and all(isinstance(value, str) for value in out["enum"]):
        out["type"] = "string"
    if "minLength" in out:
        # msgspec spells a tuple's min_length as minItems on arrays; a string's minLength is not supported.
        raise ValueError(f"minLength is not allowed in a strict output schema: {node}")
    return out
