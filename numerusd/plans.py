"""Plans, checked and drawn: validation of a planner's answer, its stable hash, its order and its renderings.

Pure functions over `numerusd.protocol.plan` types; the only I/O is `lstat` of intent paths under the repository
when `validate_plan` is given one (to refuse symlinks that lead out). The daemon turns a `ValidatedPlan` into
`PlanValidated` and a list of `PlanError`s into `PlanRejected`, and asks the planner again with those errors;
`numerusctl plan JOB` prints `render_text`, `render_dot` or `render_mermaid`. See docs/plans.md.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import os
import posixpath
import re
import stat
import typing
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import msgspec

from numerusd.protocol.ids import is_token
from numerusd.protocol.plan import FileIntent, Plan, PlanError, PlannedTask, TaskId

__all__ = [
    "MAX_TASKS",
    "ValidatedPlan",
    "canonical",
    "normalize_path",
    "plan_hash",
    "ready",
    "render_dot",
    "render_mermaid",
    "render_text",
    "topological_order",
    "validate_plan",
    "waves",
]

MAX_TASKS = 500

#: Prefixed to the canonical encoding before hashing, so a future canonical form gets hashes of its own.
HASH_DOMAIN = b"numerus.plan.v1\n"

_DECODER = msgspec.json.Decoder(Plan)
_ANY_DECODER = msgspec.json.Decoder()
_ENCODER = msgspec.json.Encoder()

_MSGSPEC_PATH = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>.*)`)?$", re.DOTALL)
_CHUNKS = re.compile(r"\d+|\D+")
#: Shell brace alternation, `{a,b}`: not glob syntax for fnmatch or git, and models write it.
_BRACES = re.compile(r"\{[^}]*,[^}]*\}")
_ABSENT = object()


class ValidatedPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A plan that passed every check: in canonical form, with its hash and a topological order of its tasks."""

    plan: Plan
    hash: str
    order: tuple[str, ...]


# --- validation ---------------------------------------------------------------------------------------------


def validate_plan(
    raw: bytes | str | Plan, *, repo: Path | None = None, max_tasks: int = MAX_TASKS
) -> ValidatedPlan | list[PlanError]:
    """Check a planner's answer; a `ValidatedPlan`, or every error found (never just the first).

    The planner is asked again with all the errors at once, so one more answer can fix them all. Structural errors
    (bad JSON, a missing, extra or mistyped field) come first, then the checks of meaning, task by task: unique
    ids, non-empty title and instructions, every dependency known and not the task itself, intents inside the
    repository (and, when `repo` is given, not through a symlink that leads out of it), well-formed globs; then
    dependency cycles. Only a plan longer than `max_tasks` is refused with that one error.
    """
    if isinstance(raw, Plan):
        # Building a Struct in Python checks no constraint (an id's pattern, say): check it as an answer.
        raw = _ENCODER.encode(raw)
    try:
        plan = _DECODER.decode(raw)
    except msgspec.DecodeError as e:
        return _check_refused(raw, e, repo, max_tasks)
    return _check_decoded(plan, repo, max_tasks)


def _check_decoded(plan: Plan, repo: Path | None, max_tasks: int) -> ValidatedPlan | list[PlanError]:
    if len(plan.tasks) > max_tasks:
        return [_too_many(len(plan.tasks), max_tasks)]
    items = [
        _Item(i, t.id, t.title, t.instructions, list(enumerate(t.deps)), [(k, x.path) for k, x in enumerate(t.intents)])
        for i, t in enumerate(plan.tasks)
    ]
    errors = _meaning_errors(items, repo)
    if errors:
        return errors
    plan = canonical(plan)
    return ValidatedPlan(plan=plan, hash=_hash_canonical(plan), order=tuple(topological_order(plan)))


def _check_refused(raw: bytes | str, first: msgspec.DecodeError, repo: Path | None, max_tasks: int) -> list[PlanError]:
    """Every error of a document the typed decoder refused: it stops at the first, this walks all of it."""
    errors, items, too_many = _structural_errors(raw, max_tasks)
    if items is not None and not too_many:
        errors += _meaning_errors(items, repo)
    # Never an empty list for a document the decoder refused, even if the walk missed what it saw.
    return errors or [_from_msgspec(first, "$")]


class _Item(NamedTuple):
    """What the checks of meaning need of one task; fields that did not decode are None or left out."""

    index: int
    id: str | None
    title: str | None
    instructions: str | None
    deps: list[tuple[int, str]]
    intents: list[tuple[int, str]]


def _too_many(count: int, max_tasks: int) -> PlanError:
    return PlanError(path="$.tasks", message=f"{count} tasks is more than the {max_tasks} a plan may have")


def _structural_errors(raw: bytes | str, max_tasks: int) -> tuple[list[PlanError], list[_Item] | None, bool]:
    """Every structural error of a document the typed decoder refused, and what can still be checked of it.

    The items are None when there is no list of tasks to check at all (not JSON, not an object, no `tasks`).
    """
    try:
        doc = _ANY_DECODER.decode(raw)
    except msgspec.DecodeError as e:
        reason = _lower_first(str(e).removeprefix("JSON is malformed: "))
        return [PlanError(path="$", message=f"the answer is not valid JSON: {reason}")], None, False
    except RecursionError:  # msgspec's own depth limit, raised as Python's: an answer nested thousands deep
        return [PlanError(path="$", message="the answer is nested too deeply to be a plan")], None, False
    tasks = doc.get("tasks") if isinstance(doc, dict) else None
    if isinstance(tasks, list) and len(tasks) > max_tasks:
        return [_too_many(len(tasks), max_tasks)], None, True
    errors: list[PlanError] = []
    _collect_struct(doc, Plan, "$", errors)
    if not isinstance(tasks, list):
        return errors, None, False
    items = []
    for i, task in enumerate(tasks):
        if not isinstance(task, dict):
            items.append(_Item(i, None, None, None, [], []))
            continue
        deps = task.get("deps") if isinstance(task.get("deps"), list) else []
        intents = task.get("intents") if isinstance(task.get("intents"), list) else []
        items.append(
            _Item(
                i,
                _str_or_none(task.get("id"), is_token),
                _str_or_none(task.get("title")),
                _str_or_none(task.get("instructions")),
                [(j, dep) for j, dep in enumerate(deps) if isinstance(dep, str) and is_token(dep)],
                [
                    (k, x["path"])
                    for k, x in enumerate(intents)
                    if isinstance(x, dict) and isinstance(x.get("path"), str)
                ],
            )
        )
    return errors, items, False


def _str_or_none(value: Any, check: Callable[[str], bool] | None = None) -> str | None:
    if isinstance(value, str) and (check is None or check(value)):
        return value
    return None


def _collect_struct(value: Any, cls: type[msgspec.Struct], path: str, errors: list[PlanError]) -> None:
    """msgspec's messages, for every field of every object rather than the first bad one, naming what is allowed."""
    if not isinstance(value, dict):
        errors.append(PlanError(path=path, message=f"expected `object`, got `{_json_type(value)}`"))
        return
    fields = msgspec.structs.fields(cls)
    known = [field.encode_name for field in fields]
    errors.extend(
        PlanError(path=path, message=f"object contains unknown field `{key}` (the fields are {', '.join(known)})")
        for key in value
        if key not in known
    )
    for field in fields:
        if field.encode_name not in value:
            if field.required:
                errors.append(PlanError(path=path, message=f"object missing required field `{field.encode_name}`"))
            continue
        _collect_value(value[field.encode_name], field.type, f"{path}.{field.encode_name}", errors)


def _collect_value(value: Any, tp: Any, path: str, errors: list[PlanError]) -> None:
    bare = typing.get_args(tp)[0] if typing.get_origin(tp) is typing.Annotated else tp
    if typing.get_origin(bare) is tuple:
        if not isinstance(value, list):
            errors.append(PlanError(path=path, message=f"expected `array`, got `{_json_type(value)}`"))
            return
        item_type = typing.get_args(bare)[0]
        for i, item in enumerate(value):
            _collect_value(item, item_type, f"{path}[{i}]", errors)
    elif isinstance(bare, type) and issubclass(bare, msgspec.Struct):
        _collect_struct(value, bare, path, errors)
    else:
        try:
            msgspec.convert(value, tp)
        except msgspec.ValidationError as e:
            error = _from_msgspec(e, path)
            if tp == TaskId and isinstance(value, str):
                error = PlanError(
                    path=path,
                    message=f"`{value}` is not a valid task id: "
                    "use 1 to 64 letters, digits, `_` or `-` (not `-` first)",
                )
            elif typing.get_origin(bare) is typing.Literal:
                allowed = ", ".join(str(option) for option in typing.get_args(bare))
                error = PlanError(path=path, message=f"{error.message} (expected one of: {allowed})")
            errors.append(error)


def _from_msgspec(error: msgspec.DecodeError, base: str) -> PlanError:
    match = _MSGSPEC_PATH.match(str(error))
    assert match is not None  # the pattern matches any string
    return PlanError(path=base + (match["path"] or ""), message=_lower_first(match["message"]))


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _json_type(value: Any) -> str:
    match value:
        case None:
            return "null"
        case bool():
            return "bool"
        case int():
            return "int"
        case float():
            return "float"
        case str():
            return "str"
        case list():
            return "array"
        case _:
            return "object"


def _meaning_errors(items: list[_Item], repo: Path | None) -> list[PlanError]:
    errors: list[PlanError] = []
    if not items:
        errors.append(PlanError(path="$.tasks", message="the plan has no tasks; a plan needs at least one"))
    first_index: dict[str, int] = {}
    for item in items:
        if item.id is not None:
            first_index.setdefault(item.id, item.index)
    repo_real = os.path.realpath(repo) if repo is not None else None
    symlink_cache: dict[str, Any] = {}
    graph: dict[str, list[str]] = {}
    for item in items:
        at = f"$.tasks[{item.index}]"
        if item.id is not None and first_index[item.id] != item.index:
            errors.append(
                PlanError(
                    path=f"{at}.id",
                    message=f"duplicate task id `{item.id}`, already used by $.tasks[{first_index[item.id]}]",
                )
            )
        if item.title is not None and not item.title.strip():
            errors.append(PlanError(path=f"{at}.title", message="the title is empty"))
        if item.instructions is not None and not item.instructions.strip():
            errors.append(PlanError(path=f"{at}.instructions", message="the instructions are empty"))
        edges = []
        for j, dep in item.deps:
            if dep == item.id:
                errors.append(PlanError(path=f"{at}.deps[{j}]", message=f"task `{dep}` depends on itself"))
            elif dep not in first_index:
                errors.append(PlanError(path=f"{at}.deps[{j}]", message=f"unknown task `{dep}`: no task has this id"))
            else:
                edges.append(dep)
        if item.id is not None and first_index[item.id] == item.index:
            graph[item.id] = edges
        for k, intent_path in item.intents:
            problem = _intent_problem(intent_path, repo_real, symlink_cache)
            if problem is not None:
                errors.append(PlanError(path=f"{at}.intents[{k}].path", message=problem))
    order = _kahn(graph)
    # Tarjan's walk only when Kahn's could not place every task: the common, acyclic plan pays for one pass.
    for cycle in _cycles(graph) if len(order) < len(graph) else ():
        message = f"dependency cycle: {' -> '.join([*cycle, cycle[0]])} (each task depends on the next)"
        errors.append(PlanError(path=f"$.tasks[{first_index[cycle[0]]}].deps", message=message))
    return errors


# --- intent paths -------------------------------------------------------------------------------------------


def normalize_path(path: str) -> str:
    """`./src//a/../b.py` -> `src/b.py`; a trailing `/` (a directory) is kept. Pure string work, no I/O."""
    if not _maybe_not_normal(path):
        return path  # most paths are normal already, and normpath costs ten times this test
    norm = posixpath.normpath(path)
    return f"{norm}/" if path.endswith("/") and norm != "." and not norm.endswith("/") else norm


def _maybe_not_normal(path: str) -> bool:
    """True when `posixpath.normpath` could change `path` (apart from a trailing `/`, which is kept)."""
    return (
        "//" in path
        or "/./" in path
        or "/../" in path
        or path.startswith(("./", "../"))
        or path.endswith(("/.", "/..", "/./", "/../"))
        or path in ("", ".", "..")
    )


def _is_glob(path: str) -> bool:
    return "*" in path or "?" in path or "[" in path


def _intent_problem(path: str, repo_real: str | None, cache: dict[str, Any]) -> str | None:
    """Why an intent path is refused, or None. Messages name the path as the planner wrote it."""
    if not path.strip():
        return "the path is empty"
    if "\0" in path:
        return "the path contains a NUL character"
    if path[0] == "/":
        return f"`{path}` is absolute; name paths relative to the repository root"
    if path[0] == "~":
        return f"`{path}` starts with `~`; name paths relative to the repository root"
    norm = normalize_path(path)
    if norm == ".." or norm.startswith("../"):
        return f"`{path}` leads out of the repository"
    if norm == ".git" or norm.startswith(".git/"):
        return f"`{path}` is inside `.git`, which no task may touch"
    glob = _is_glob(norm)
    if glob or "{" in norm:
        problem = _glob_problem(norm)
        if problem is not None:
            return f"`{path}` is not a well-formed glob: {problem}"
    if repo_real is not None and norm != ".":
        # Only the literal head of a glob can be checked here; what a wildcard matches is checked when a task
        # claims real files and when its diff is compared with its claim.
        literal = []
        for part in norm.rstrip("/").split("/"):
            if glob and _is_glob(part):
                break
            literal.append(part)
        escape = _symlink_escape(repo_real, literal, cache)
        if escape is not None:
            link, target = escape
            return f"`{path}` goes through the symlink `{link}`, which points outside the repository (to `{target}`)"
    return None


def _glob_problem(pattern: str) -> str | None:
    if "**" in pattern and any("**" in part and part != "**" for part in pattern.split("/")):
        return "`**` must be a whole path component, as in `src/**/*.py`"
    if "{" in pattern and _BRACES.search(pattern):
        return "braces `{a,b}` are not supported; give each path its own intent"
    i, n = pattern.find("["), len(pattern)
    while i != -1:
        j = i + 1
        if j < n and pattern[j] in "!^":
            j += 1
        if j < n and pattern[j] == "]":
            j += 1  # a `]` right after `[` or `[!` is a literal member of the class
        close = pattern.find("]", j)
        if close == -1:
            return "`[` is never closed"
        if "/" in pattern[i:close]:
            return "a `[...]` class cannot contain `/`"
        i = pattern.find("[", close + 1)
    return None


def _symlink_escape(repo_real: str, parts: list[str], cache: dict[str, Any]) -> tuple[str, str] | None:
    """The first prefix of `parts` that is a symlink resolving outside `repo_real`, and where it leads.

    One `lstat` per distinct prefix (cached across the plan's intents), `realpath` only for symlinks. A prefix
    that does not exist ends the walk: nothing beneath it exists to lead anywhere.
    """
    prefix = ""
    for part in parts:
        prefix = f"{prefix}/{part}" if prefix else part
        verdict = cache.get(prefix, cache)
        if verdict is cache:
            verdict = cache[prefix] = _prefix_verdict(repo_real, prefix)
        if verdict is _ABSENT:
            return None
        if verdict is not None:
            return prefix, verdict
    return None


def _prefix_verdict(repo_real: str, prefix: str) -> object:
    full = os.path.join(repo_real, prefix)
    try:
        mode = os.lstat(full).st_mode
    except (OSError, ValueError):
        return _ABSENT
    if stat.S_ISLNK(mode):
        target = os.path.realpath(full)
        if target != repo_real and not target.startswith(repo_real.rstrip("/") + "/"):
            return target
    return None


# --- the graph ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1 << 16)
def _natural(task_id: str) -> tuple[Any, ...]:
    """Sort key: digit runs by number, so t2 comes before t10; ties (t01, t1) broken by the id itself."""
    return (tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in _CHUNKS.findall(task_id)), task_id)


def _cycles(graph: dict[str, list[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one task (Tarjan's algorithm, iterative).

    Each cycle starts at the component's task that comes first in the plan and follows dependencies back to it.
    """
    position = {node: i for i, node in enumerate(graph)}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, successors = work[-1]
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(graph[nxt])))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        components.append(component)
    cycles = []
    for component in sorted(components, key=lambda c: min(position[n] for n in c)):
        members = set(component)
        start = min(component, key=position.__getitem__)
        # Breadth-first from start to start inside the component: the shortest cycle through it.
        parent: dict[str, str] = {}
        frontier = [start]
        found = None
        while frontier and found is None:
            following = []
            for node in frontier:
                for nxt in graph[node]:
                    if nxt not in members:
                        continue
                    if nxt == start:
                        found = node
                        break
                    if nxt not in parent:
                        parent[nxt] = node
                        following.append(nxt)
                if found is not None:
                    break
            frontier = following
        assert found is not None  # a component of two or more tasks has a cycle through each of them
        cycle = [found]
        while cycle[-1] != start:
            cycle.append(parent[cycle[-1]])
        cycles.append(cycle[::-1])
    return cycles


def topological_order(plan: Plan) -> list[str]:
    """Task ids, each after all its dependencies; among tasks free at once, in natural id order (t2 before t10).

    The order depends only on ids and dependencies, never on the order of the planner's list, so plans with the
    same hash run the same way. ValueError if the plan has a cycle or an unknown dependency.
    """
    graph = {task.id: list(set(task.deps)) for task in plan.tasks}
    for task_id, deps in graph.items():
        for dep in deps:
            if dep not in graph:
                raise ValueError(f"task {task_id} depends on unknown task {dep}")
    order = _kahn(graph)
    if len(order) != len(graph):
        raise ValueError("the plan has a dependency cycle")
    return order


def _kahn(graph: dict[str, list[str]]) -> list[str]:
    """Kahn's algorithm over task -> deps (all known), free tasks taken in natural order; short if there is a cycle."""
    dependents: dict[str, list[str]] = {task_id: [] for task_id in graph}
    waiting: dict[str, int] = {}
    for task_id, deps in graph.items():
        for dep in deps:
            dependents[dep].append(task_id)
        waiting[task_id] = len(deps)
    heap = [(_natural(task_id), task_id) for task_id, count in waiting.items() if count == 0]
    heapq.heapify(heap)
    order = []
    while heap:
        _, task_id = heapq.heappop(heap)
        order.append(task_id)
        for dependent in dependents[task_id]:
            waiting[dependent] -= 1
            if waiting[dependent] == 0:
                heapq.heappush(heap, (_natural(dependent), dependent))
    return order


def waves(plan: Plan) -> list[list[str]]:
    """Tasks by depth: wave 1 depends on nothing, wave n on tasks of earlier waves, at least one of wave n-1."""
    depth: dict[str, int] = {}
    deps = {task.id: task.deps for task in plan.tasks}
    for task_id in topological_order(plan):
        depth[task_id] = 1 + max((depth[dep] for dep in deps[task_id]), default=0)
    result: list[list[str]] = [[] for _ in range(max(depth.values(), default=0))]
    for task_id in sorted(depth, key=_natural):
        result[depth[task_id] - 1].append(task_id)
    return result


def ready(plan: Plan, done: Collection[str]) -> list[str]:
    """Tasks not in `done` whose dependencies all are, in natural id order. Leaving out running ones is the caller's."""
    return sorted(
        (task.id for task in plan.tasks if task.id not in done and all(dep in done for dep in task.deps)),
        key=_natural,
    )


# --- the hash -----------------------------------------------------------------------------------------------


def canonical(plan: Plan) -> Plan:
    """The plan with every meaning-free choice made one way.

    Tasks sorted by natural id order (t2 before t10); each task's deps without repeats, in that order; intent paths
    normalised (`./src//a.py` -> `src/a.py`), without repeats, sorted by path then mode. Strings are kept as
    written. Two answers that differ only in key order, whitespace or these choices give the same canonical
    plan, and so the same hash.
    """
    return Plan(
        summary=plan.summary,
        tasks=tuple(_canonical_task(task) for task in sorted(plan.tasks, key=lambda task: _natural(task.id))),
    )


def _canonical_task(task: PlannedTask) -> PlannedTask:
    deps = tuple(sorted(set(task.deps), key=_natural)) if len(task.deps) > 1 else task.deps
    intents = [
        x if (path := normalize_path(x.path)) == x.path else FileIntent(path=path, mode=x.mode) for x in task.intents
    ]
    if len(intents) > 1:
        intents = sorted(set(intents), key=lambda x: (x.path, x.mode))
    if deps == task.deps and tuple(intents) == task.intents:
        return task  # most tasks are canonical already; building them again is half the cost of validation
    return msgspec.structs.replace(task, deps=deps, intents=tuple(intents))


def plan_hash(plan: Plan) -> str:
    """SHA-256 (hex) of the canonical plan's compact JSON, after `HASH_DOMAIN`. Equal for equal plans only."""
    return _hash_canonical(canonical(plan))


def _hash_canonical(plan: Plan) -> str:
    # Struct fields encode in declaration order and PlannedTask omits defaults, so a field added later with a
    # default leaves the hashes of plans that do not use it unchanged.
    return hashlib.sha256(HASH_DOMAIN + _ENCODER.encode(plan)).hexdigest()


# --- renderings ---------------------------------------------------------------------------------------------


def render_text(plan: Plan) -> str:
    """The plan for a terminal: the summary, then the tasks wave by wave with their dependencies and intents."""
    tasks = {task.id: task for task in plan.tasks}
    groups = waves(plan)
    lines = [
        plan.summary,
        f"{len(tasks)} task{'s' if len(tasks) != 1 else ''} in {len(groups)} wave{'s' if len(groups) != 1 else ''}",
    ]
    width = max(len(task_id) for task_id in tasks)
    for number, group in enumerate(groups, 1):
        lines += ["", f"wave {number}"]
        for task_id in group:
            task = tasks[task_id]
            after = f"  (after {', '.join(sorted(set(task.deps), key=_natural))})" if task.deps else ""
            role = f"  [{task.role}]" if task.role != "executor" else ""
            lines.append(f"  {task_id:<{width}}  {_one_line(task.title)}{after}{role}")
            lines += [f"  {'':<{width}}    {intent.mode:<6}  {intent.path}" for intent in task.intents]
    return "\n".join(lines) + "\n"


def render_dot(plan: Plan) -> str:
    """Graphviz: one box per task, an arrow from each dependency to the task that waits for it."""
    lines = ["digraph plan {", "  rankdir=LR;", '  node [shape=box, fontname="sans-serif"];']
    tasks = _by_id(plan)
    for task_id in topological_order(plan):
        task = tasks[task_id]
        lines.append(f'  "{task_id}" [label="{_dot_escape(task_id)}\\n{_dot_escape(_short(task.title))}"];')
    lines += [f'  "{dep}" -> "{task_id}";' for task_id, dep in _edges(plan)]
    lines.append("}")
    return "\n".join(lines) + "\n"


def render_mermaid(plan: Plan) -> str:
    """Mermaid flowchart; nodes are n1, n2, … (task ids may be Mermaid keywords like `end`), labelled by id."""
    order = topological_order(plan)
    node = {task_id: f"n{i}" for i, task_id in enumerate(order, 1)}
    tasks = _by_id(plan)
    lines = ["flowchart LR"]
    lines += [f'  {node[t]}["{_mermaid_escape(t)}: {_mermaid_escape(_short(tasks[t].title))}"]' for t in order]
    lines += [f"  {node[dep]} --> {node[task_id]}" for task_id, dep in _edges(plan)]
    return "\n".join(lines) + "\n"


def _by_id(plan: Plan) -> dict[str, PlannedTask]:
    return {task.id: task for task in plan.tasks}


def _edges(plan: Plan) -> Iterable[tuple[str, str]]:
    """(task, dependency) pairs in a stable order: tasks in topological order, deps in natural order."""
    tasks = _by_id(plan)
    for task_id in topological_order(plan):
        for dep in sorted(set(tasks[task_id].deps), key=_natural):
            yield task_id, dep


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _short(text: str, limit: int = 60) -> str:
    text = _one_line(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _mermaid_escape(text: str) -> str:
    # Inside a quoted Mermaid label, `"` ends the label and `<`/`>` may be read as HTML; entity codes are safe.
    return text.replace("#", "#35;").replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;")
