"""Plans: what a planner's answer must be, the exact errors it is sent back with, its hash, order and drawings."""

from __future__ import annotations

import itertools
import json
import os
import posixpath
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from numerusd import schemas
from numerusd.plans import (
    ValidatedPlan,
    canonical,
    normalize_path,
    plan_hash,
    ready,
    render_dot,
    render_mermaid,
    render_text,
    topological_order,
    validate_plan,
    waves,
)
from numerusd.protocol.plan import STRICT_KEYWORDS, FileIntent, Plan, PlanError, PlannedTask, output_schema


def task(task_id: str, deps: list[str] | None = None, intents: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    return {
        "id": task_id,
        "title": f"Do {task_id}",
        "instructions": f"Everything about {task_id}.",
        "role": "executor",
        "deps": deps or [],
        "intents": [{"path": path, "mode": mode} for path, mode in intents or []],
    }


def oauth_plan() -> dict[str, Any]:
    """What a planner answers for 'add GitHub login to the Flask app', key order and all."""
    return {
        "summary": "Add GitHub OAuth login: a user model, settings, the login routes, then tests and docs.",
        "tasks": [
            {
                "id": "t1",
                "title": "Add the User model",
                "instructions": "Create src/app/models/user.py with a SQLAlchemy User (id, github_id, login).",
                "role": "executor",
                "deps": [],
                "intents": [
                    {"path": "src/app/models/user.py", "mode": "create"},
                    {"path": "src/app/models/__init__.py", "mode": "modify"},
                ],
            },
            {
                "id": "t2",
                "title": "OAuth settings",
                "instructions": "Read GITHUB_CLIENT_ID and GITHUB_CLIENT_SECRET from the environment.",
                "role": "executor",
                "deps": [],
                "intents": [{"path": "./src/app/config.py", "mode": "modify"}],
            },
            {
                "id": "t3",
                "title": "Login and callback routes",
                "instructions": "Add /login and /auth/callback in src/app/routes/auth.py.",
                "role": "executor",
                "deps": ["t1", "t2"],
                "intents": [{"path": "src/app/routes/auth.py", "mode": "create"}],
            },
            {
                "id": "t4",
                "title": "Tests for the login flow",
                "instructions": "Mock GitHub's token endpoint; cover success, denial and a bad state.",
                "role": "executor",
                "deps": ["t3"],
                "intents": [{"path": "tests/**/test_auth*.py", "mode": "create"}],
            },
            {
                "id": "t5",
                "title": "Document the login",
                "instructions": "Explain the two environment variables in the README.",
                "role": "executor",
                "deps": ["t3"],
                "intents": [{"path": "README.md", "mode": "modify"}],
            },
        ],
    }


def errors_of(doc: Any, **options: Any) -> list[str]:
    raw = doc if isinstance(doc, bytes | str) else json.dumps(doc)
    result = validate_plan(raw, **options)
    assert isinstance(result, list), f"expected errors, got {result}"
    return [str(error) for error in result]


# --- a valid plan -------------------------------------------------------------------------------------------


def test_a_valid_plan_is_canonical_hashed_and_ordered():
    result = validate_plan(json.dumps(oauth_plan()).encode())
    assert isinstance(result, ValidatedPlan)
    assert re.fullmatch(r"[0-9a-f]{64}", result.hash)
    assert result.order == ("t1", "t2", "t3", "t4", "t5")
    assert [t.id for t in result.plan.tasks] == ["t1", "t2", "t3", "t4", "t5"]
    # `./src/app/config.py` is the same file as `src/app/config.py`; the validated plan says it one way.
    assert result.plan.tasks[1].intents == (FileIntent(path="src/app/config.py", mode="modify"),)
    assert result.plan.tasks[0].intents == (
        FileIntent(path="src/app/models/__init__.py", mode="modify"),
        FileIntent(path="src/app/models/user.py", mode="create"),
    )
    assert result.hash == plan_hash(result.plan) == plan_hash(Plan(**_decode(oauth_plan())))


def _decode(doc: dict[str, Any]) -> dict[str, Any]:
    return {"summary": doc["summary"], "tasks": tuple(msgspec.convert(t, PlannedTask) for t in doc["tasks"])}


def test_optional_fields_may_be_left_out_and_a_plan_object_is_accepted():
    doc = {"summary": "One step.", "tasks": [{"id": "only", "title": "Do it", "instructions": "All of it."}]}
    result = validate_plan(json.dumps(doc))
    assert isinstance(result, ValidatedPlan)
    assert result.plan.tasks[0] == PlannedTask(id="only", title="Do it", instructions="All of it.")
    again = validate_plan(result.plan)
    assert isinstance(again, ValidatedPlan) and again.hash == result.hash
    built = Plan(summary="s", tasks=(PlannedTask(id="no spaces", title="t", instructions="i"),))
    assert errors_of_plan(built) == [
        "$.tasks[0].id: `no spaces` is not a valid task id: use 1 to 64 letters, digits, `_` or `-` (not `-` first)"
    ]


def errors_of_plan(plan: Plan) -> list[str]:
    result = validate_plan(plan)
    assert isinstance(result, list)
    return [str(error) for error in result]


def test_repeated_deps_and_intents_are_folded_not_refused():
    doc = oauth_plan()
    doc["tasks"][2]["deps"] = ["t2", "t1", "t2"]
    doc["tasks"][4]["intents"] *= 2
    result = validate_plan(json.dumps(doc))
    assert isinstance(result, ValidatedPlan)
    assert result.plan.tasks[2].deps == ("t1", "t2")
    assert result.plan.tasks[4].intents == (FileIntent(path="README.md", mode="modify"),)
    assert result.hash == validate_plan(json.dumps(oauth_plan())).hash


# --- the errors the planner is sent back with ---------------------------------------------------------------


def test_duplicate_ids():
    doc = oauth_plan()
    doc["tasks"][3]["id"] = "t1"
    doc["tasks"][4]["id"] = "t1"
    assert errors_of(doc) == [
        "$.tasks[3].id: duplicate task id `t1`, already used by $.tasks[0]",
        "$.tasks[4].id: duplicate task id `t1`, already used by $.tasks[0]",
    ]


def test_unknown_dependency_and_self_dependency():
    doc = oauth_plan()
    doc["tasks"][2]["deps"] = ["t1", "t9"]
    doc["tasks"][4]["deps"] = ["t3", "t5"]
    assert errors_of(doc) == [
        "$.tasks[2].deps[1]: unknown task `t9`: no task has this id",
        "$.tasks[4].deps[1]: task `t5` depends on itself",
    ]


def test_a_cycle_of_three_is_named_from_the_first_task_in_the_plan():
    doc = {"summary": "Circular.", "tasks": [task("t1", ["t2"]), task("t2", ["t3"]), task("t3", ["t1"]), task("t4")]}
    assert errors_of(doc) == ["$.tasks[0].deps: dependency cycle: t1 -> t2 -> t3 -> t1 (each task depends on the next)"]


def test_every_cycle_is_reported_once():
    doc = {
        "summary": "Two knots.",
        "tasks": [
            task("a", ["b"]),
            task("b", ["a", "c"]),
            task("c"),
            task("x", ["y"]),
            task("y", ["z"]),
            task("z", ["x", "c"]),
        ],
    }
    assert errors_of(doc) == [
        "$.tasks[0].deps: dependency cycle: a -> b -> a (each task depends on the next)",
        "$.tasks[3].deps: dependency cycle: x -> y -> z -> x (each task depends on the next)",
    ]


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("../etc/passwd", "`../etc/passwd` leads out of the repository"),
        ("src/../../etc/passwd", "`src/../../etc/passwd` leads out of the repository"),
        ("..", "`..` leads out of the repository"),
        ("/abs", "`/abs` is absolute; name paths relative to the repository root"),
        ("/etc/**", "`/etc/**` is absolute; name paths relative to the repository root"),
        ("~/.ssh/config", "`~/.ssh/config` starts with `~`; name paths relative to the repository root"),
        (".git/hooks/pre-commit", "`.git/hooks/pre-commit` is inside `.git`, which no task may touch"),
        ("./.git/config", "`./.git/config` is inside `.git`, which no task may touch"),
        ("", "the path is empty"),
        ("  ", "the path is empty"),
        ("a\0b", "the path contains a NUL character"),
        ("src/[ab.py", "`src/[ab.py` is not a well-formed glob: `[` is never closed"),
        ("src/[!]", "`src/[!]` is not a well-formed glob: `[` is never closed"),
        ("src/[a/b].py", "`src/[a/b].py` is not a well-formed glob: a `[...]` class cannot contain `/`"),
        (
            "src/a**.py",
            "`src/a**.py` is not a well-formed glob: `**` must be a whole path component, as in `src/**/*.py`",
        ),
        (
            "src/{models,routes}/*.py",
            "`src/{models,routes}/*.py` is not a well-formed glob: braces `{a,b}` are not supported;"
            " give each path its own intent",
        ),
    ],
)
def test_intents_outside_the_repository_or_malformed(path: str, message: str):
    doc = oauth_plan()
    doc["tasks"][4]["intents"] = [{"path": "README.md", "mode": "modify"}, {"path": path, "mode": "modify"}]
    assert errors_of(doc) == [f"$.tasks[4].intents[1].path: {message}"]


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("src/../README.md", "README.md"),
        ("./src//app/", "src/app/"),
        ("src/**/*.py", "src/**/*.py"),
        ("docs/[abc]*.md", "docs/[abc]*.md"),
        ("docs/[]]x", "docs/[]]x"),
        ("templates/{{name}}.html", "templates/{{name}}.html"),
        (".", "."),
        (".github/workflows/ci.yml", ".github/workflows/ci.yml"),
    ],
)
def test_paths_inside_the_repository_are_accepted_and_normalised(path: str, normal: str):
    doc = oauth_plan()
    doc["tasks"][4]["intents"] = [{"path": path, "mode": "modify"}]
    result = validate_plan(json.dumps(doc))
    assert isinstance(result, ValidatedPlan), result
    assert result.plan.tasks[4].intents == (FileIntent(path=normal, mode="modify"),)
    assert normalize_path(path) == normal


def test_the_quick_normal_path_test_never_misses_what_normpath_would_change():
    # normalize_path skips posixpath.normpath for paths that look normal; every short path over `/`, `.` and `a`.
    for n in range(7):
        for chars in itertools.product("/.a", repeat=n):
            path = "".join(chars)
            expected = posixpath.normpath(path)
            expected += "/" if path.endswith("/") and expected != "." and not expected.endswith("/") else ""
            assert normalize_path(path) == expected, path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with symlinks: one out to a secrets directory, one to a file outside, one inside."""
    outside = tmp_path / "outside"
    (outside / "keys").mkdir(parents=True)
    (outside / "token.txt").write_text("secret\n")
    repo = tmp_path / "repo"
    (repo / "src" / "app").mkdir(parents=True)
    (repo / "src" / "app" / "main.py").write_text("print('hi')\n")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "vendor").symlink_to(outside)
    (repo / "src" / "token.txt").symlink_to(outside / "token.txt")
    (repo / "app").symlink_to("src/app")  # relative, inside: fine
    (repo / "src" / "app" / "up").symlink_to("../../..")  # through an inside link, out again
    (repo / "cache").symlink_to(tmp_path / "not-yet")  # dangling, and outside
    return repo


def test_symlinks_out_of_the_repository_are_refused(repo: Path, tmp_path: Path):
    outside = os.path.realpath(tmp_path / "outside")
    root = os.path.realpath(tmp_path)
    doc = oauth_plan()
    doc["tasks"][4]["intents"] = [
        {"path": "vendor/keys/id_rsa", "mode": "create"},
        {"path": "src/token.txt", "mode": "modify"},
        {"path": "app/main.py", "mode": "modify"},
        {"path": "app/up/outside/token.txt", "mode": "delete"},
        {"path": "vendor/**", "mode": "modify"},
        {"path": "src/new/dir/file.py", "mode": "create"},
        {"path": "src/**/*.py", "mode": "modify"},
        {"path": "cache/new.bin", "mode": "create"},
    ]
    link = "goes through the symlink"
    assert errors_of(doc, repo=repo) == [
        f"$.tasks[4].intents[0].path: `vendor/keys/id_rsa` {link} `vendor`, which points outside the repository"
        f" (to `{outside}`)",
        f"$.tasks[4].intents[1].path: `src/token.txt` {link} `src/token.txt`, which points outside the repository"
        f" (to `{outside}/token.txt`)",
        f"$.tasks[4].intents[3].path: `app/up/outside/token.txt` {link} `app/up`, which points outside the"
        f" repository (to `{root}`)",
        f"$.tasks[4].intents[4].path: `vendor/**` {link} `vendor`, which points outside the repository"
        f" (to `{outside}`)",
        f"$.tasks[4].intents[7].path: `cache/new.bin` {link} `cache`, which points outside the repository"
        f" (to `{root}/not-yet`)",
    ]
    # Without a repository only the strings are checked: these paths are all well-formed.
    assert isinstance(validate_plan(json.dumps(doc)), ValidatedPlan)


def test_a_repository_reached_through_a_symlink_is_its_real_self(repo: Path, tmp_path: Path):
    (tmp_path / "checkout").symlink_to(repo)
    doc = oauth_plan()
    doc["tasks"][4]["intents"] = [{"path": "app/main.py", "mode": "modify"}]
    assert isinstance(validate_plan(json.dumps(doc), repo=tmp_path / "checkout"), ValidatedPlan)


def test_bad_json():
    assert errors_of('{"summary": "x", "tasks": [}') == ["$: the answer is not valid JSON: invalid character (byte 27)"]
    assert errors_of(b'{"summary": "x", "tasks": [') == ["$: the answer is not valid JSON: input data was truncated"]
    assert errors_of("```json\n{}\n```") == ["$: the answer is not valid JSON: invalid character (byte 0)"]
    assert errors_of(b"\xff\xfe") == ["$: the answer is not valid JSON: invalid character (byte 0)"]
    assert errors_of("[]") == ["$: expected `object`, got `array`"]


def test_missing_fields():
    doc = oauth_plan()
    del doc["summary"]
    del doc["tasks"][1]["title"]
    del doc["tasks"][3]["instructions"]
    assert errors_of(doc) == [
        "$: object missing required field `summary`",
        "$.tasks[1]: object missing required field `title`",
        "$.tasks[3]: object missing required field `instructions`",
    ]


def test_extra_fields():
    doc = oauth_plan()
    doc["version"] = 2
    doc["tasks"][0]["priority"] = "high"
    doc["tasks"][2]["intents"][0]["reason"] = "routes"
    assert errors_of(doc) == [
        "$: object contains unknown field `version` (the fields are summary, tasks)",
        "$.tasks[0]: object contains unknown field `priority` (the fields are id, title, instructions, role, deps,"
        " intents)",
        "$.tasks[2].intents[0]: object contains unknown field `reason` (the fields are path, mode)",
    ]


def test_every_error_at_once_structure_first_then_meaning():
    doc = oauth_plan()
    doc["tasks"][0]["title"] = 7
    doc["tasks"][0]["deps"] = "t2"
    doc["tasks"][1]["id"] = "t 2"
    doc["tasks"][1]["role"] = "reviewer"
    doc["tasks"][2]["deps"] = ["t1", "t2", "t7", 3]
    doc["tasks"][2]["intents"][0]["mode"] = "rename"
    doc["tasks"][3]["instructions"] = "   "
    doc["tasks"][3]["intents"].append({"path": "../../x", "mode": "delete"})
    doc["tasks"][4]["deps"] = ["t4"]
    doc["tasks"][3]["deps"] = ["t4", "t5"]
    doc["tasks"].append("t6")
    assert errors_of(doc) == [
        "$.tasks[0].title: expected `str`, got `int`",
        "$.tasks[0].deps: expected `array`, got `str`",
        "$.tasks[1].id: `t 2` is not a valid task id: use 1 to 64 letters, digits, `_` or `-` (not `-` first)",
        "$.tasks[1].role: invalid enum value 'reviewer' (expected one of: executor)",
        "$.tasks[2].deps[3]: expected `str`, got `int`",
        "$.tasks[2].intents[0].mode: invalid enum value 'rename' (expected one of: create, modify, delete)",
        "$.tasks[5]: expected `object`, got `str`",
        "$.tasks[2].deps[1]: unknown task `t2`: no task has this id",
        "$.tasks[2].deps[2]: unknown task `t7`: no task has this id",
        "$.tasks[3].instructions: the instructions are empty",
        "$.tasks[3].deps[0]: task `t4` depends on itself",
        "$.tasks[3].intents[1].path: `../../x` leads out of the repository",
        "$.tasks[3].deps: dependency cycle: t4 -> t5 -> t4 (each task depends on the next)",
    ]


def test_no_tasks_empty_strings_and_too_many_tasks():
    assert errors_of({"summary": "Nothing to do.", "tasks": []}) == [
        "$.tasks: the plan has no tasks; a plan needs at least one"
    ]
    doc = {"summary": "", "tasks": [{"id": "t1", "title": " ", "instructions": ""}]}
    assert errors_of(doc) == [
        "$.tasks[0].title: the title is empty",
        "$.tasks[0].instructions: the instructions are empty",
    ]
    many = {"summary": "Big.", "tasks": [task(f"t{i}") for i in range(1, 12)]}
    assert errors_of(many, max_tasks=10) == ["$.tasks: 11 tasks is more than the 10 a plan may have"]
    many["tasks"][0]["title"] = 1  # refused by length before anything else is looked at
    assert errors_of(many, max_tasks=10) == ["$.tasks: 11 tasks is more than the 10 a plan may have"]
    assert isinstance(validate_plan(json.dumps(many), max_tasks=11), list)
    del many["tasks"][0]
    assert isinstance(validate_plan(json.dumps(many), max_tasks=10), ValidatedPlan)


def test_errors_are_data_for_a_plan_rejected_event():
    (error,) = validate_plan(
        '{"summary": "x", "tasks": [{"id": "t1", "title": "a", "instructions": "b", "deps": ["t2"]}]}'
    )
    assert error == PlanError(path="$.tasks[0].deps[0]", message="unknown task `t2`: no task has this id")


# --- the hash -----------------------------------------------------------------------------------------------

IDS = st.from_regex(r"\A[abcdefghijt0-9_][abcdefghijt0-9_-]{0,5}\Z")
# Any Unicode, never blank (a blank title is an error, tested above); the prefix keeps the filter from rejecting.
TEXT = st.builds(
    lambda text: "T " + text, st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=24)
)
PATHS = st.lists(
    st.sampled_from(["src", "app", "tests", "docs", "*.py", "**", "a.md", "b[12].txt"]), min_size=1, max_size=4
)


@st.composite
def plans(draw: st.DrawFn, max_tasks: int = 12) -> dict[str, Any]:
    """A valid plan as a planner's JSON: unique ids, deps only on earlier tasks (so acyclic), then shuffled."""
    ids = draw(st.lists(IDS, min_size=1, max_size=max_tasks, unique=True))
    tasks = []
    for i, task_id in enumerate(ids):
        deps = draw(st.lists(st.sampled_from(ids[:i]), max_size=3, unique=True)) if i else []
        intents = draw(
            st.lists(
                st.builds(
                    lambda p, m: {"path": "/".join(p), "mode": m},
                    PATHS,
                    st.sampled_from(["create", "modify", "delete"]),
                ),
                max_size=3,
                unique_by=lambda x: (x["path"], x["mode"]),
            )
        )
        tasks.append(
            {
                "id": task_id,
                "title": draw(TEXT),
                "instructions": draw(TEXT),
                "role": "executor",
                "deps": deps,
                "intents": intents,
            }
        )
    random.Random(draw(st.integers(0, 2**32))).shuffle(tasks)
    return {"summary": draw(TEXT), "tasks": tasks}


def reshaped(value: Any, rng: random.Random) -> Any:
    """The same JSON with keys and list items reordered (lists here are sets or ordered by id)."""
    if isinstance(value, dict):
        items = [(key, reshaped(item, rng)) for key, item in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        items = [reshaped(item, rng) for item in value]
        rng.shuffle(items)
        return items
    return value


def dumps(value: Any, rng: random.Random) -> str:
    indent = rng.choice([None, 0, 1, 4, "\t"])
    separators = rng.choice([(",", ":"), (", ", ": "), (" ,  ", " :\n ")])
    text = json.dumps(value, indent=indent, separators=separators, ensure_ascii=rng.random() < 0.5)
    return rng.choice(["", " ", "\n", "\r\n\t"]) + text + rng.choice(["", "\n", "  \n"])


@settings(max_examples=40, deadline=None)
@given(plans(), st.integers(0, 2**32))
def test_hash_ignores_key_order_whitespace_and_list_order(doc: dict[str, Any], seed: int):
    rng = random.Random(seed)
    first = validate_plan(json.dumps(doc))
    assert isinstance(first, ValidatedPlan)
    second = validate_plan(dumps(reshaped(doc, rng), rng).encode())
    assert isinstance(second, ValidatedPlan)
    assert second.hash == first.hash
    assert second.plan == first.plan == canonical(first.plan)


def _mutations(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """One copy per change of meaning: the summary, each task's id, title and instructions, a dep, an intent."""
    out = []

    def changed(edit: Any) -> None:
        copy = json.loads(json.dumps(doc))
        edit(copy)
        out.append(copy)

    changed(lambda d: d.update(summary=d["summary"] + "!"))
    for i, t in enumerate(doc["tasks"]):
        changed(lambda d, i=i: d["tasks"][i].update(title=d["tasks"][i]["title"] + " "))
        changed(lambda d, i=i: d["tasks"][i].update(instructions=d["tasks"][i]["instructions"] + "."))
        changed(lambda d, i=i: d["tasks"][i]["intents"].append({"path": "NEW.md", "mode": "create"}))
        for k, intent in enumerate(t["intents"]):
            other = {"create": "modify", "modify": "delete", "delete": "create"}[intent["mode"]]
            changed(lambda d, i=i, k=k, other=other: d["tasks"][i]["intents"][k].update(mode=other))
            changed(
                lambda d, i=i, k=k: d["tasks"][i]["intents"][k].update(path="x/" + d["tasks"][i]["intents"][k]["path"])
            )
        if t["deps"]:
            changed(lambda d, i=i: d["tasks"][i]["deps"].pop())
        changed(lambda d, old=t["id"]: _rename(d, old, old + "Z"))
    # A new edge that keeps the graph acyclic: from a task that nothing depends on to one that is not it.
    order = [t["id"] for t in doc["tasks"]]
    wanted = {dep for t in doc["tasks"] for dep in t["deps"]}
    sinks = [t for t in order if t not in wanted]
    for i, t in enumerate(doc["tasks"]):
        if t["id"] in sinks:
            target = next((o for o in order if o != t["id"] and o not in t["deps"]), None)
            if target is not None:
                changed(lambda d, i=i, target=target: d["tasks"][i]["deps"].append(target))
            break
    return out


def _rename(doc: dict[str, Any], old: str, new: str) -> None:
    for t in doc["tasks"]:
        t["id"] = new if t["id"] == old else t["id"]
        t["deps"] = [new if dep == old else dep for dep in t["deps"]]


@settings(max_examples=30, deadline=None)
@given(plans(max_tasks=5))
def test_any_change_of_meaning_changes_the_hash(doc: dict[str, Any]):
    original = validate_plan(json.dumps(doc))
    assert isinstance(original, ValidatedPlan)
    hashes = {original.hash}
    mutations = _mutations(doc)
    for mutated in mutations:
        result = validate_plan(json.dumps(mutated))
        assert isinstance(result, ValidatedPlan), result
        hashes.add(result.hash)
    assert len(hashes) == len(mutations) + 1


def test_hash_is_pinned():
    # The canonical form is a format: if this changes, stored plans no longer match their hashes.
    assert validate_plan(json.dumps(oauth_plan())).hash == (
        "7933560689aa8cfceb54f00aa5887f3c2d47e8301290283632a27d07b4539e39"
    )


# --- order --------------------------------------------------------------------------------------------------


@st.composite
def dags(draw: st.DrawFn) -> Plan:
    # A seeded Random for the edges: hypothesis's own randoms draw each number and are ten times slower.
    n = draw(st.integers(1, 40))
    rng = random.Random(draw(st.integers(0, 2**32)))
    ids = [f"t{i}" for i in range(1, n + 1)]
    rng.shuffle(ids)  # position in `ids` is the hidden order the edges respect
    tasks = [
        PlannedTask(
            id=task_id, title=task_id, instructions=".", deps=tuple(rng.sample(ids[:i], min(i, rng.randint(0, 3))))
        )
        for i, task_id in enumerate(ids)
    ]
    rng.shuffle(tasks)
    return Plan(summary="random", tasks=tuple(tasks))


@settings(max_examples=100, deadline=None)
@given(dags())
def test_topological_order_puts_every_task_after_its_deps(plan: Plan):
    order = topological_order(plan)
    assert sorted(order) == sorted(t.id for t in plan.tasks)
    position = {task_id: i for i, task_id in enumerate(order)}
    for t in plan.tasks:
        assert all(position[dep] < position[t.id] for dep in t.deps)
    # Running ready tasks wave after wave finishes the plan, and the waves are exactly those rounds.
    done: set[str] = set()
    rounds = []
    while len(done) < len(plan.tasks):
        now = ready(plan, done)
        assert now, "a plan without cycles always has a ready task"
        rounds.append(now)
        done |= set(now)
    assert rounds == waves(plan)
    result = validate_plan(plan)
    assert isinstance(result, ValidatedPlan) and list(result.order) == order


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**32))
def test_cycles_are_found_exactly_when_there_is_one_and_each_is_real(n: int, seed: int):
    rng = random.Random(seed)
    ids = [f"t{i}" for i in range(1, n + 1)]
    deps = {t: sorted(rng.sample([o for o in ids if o != t], min(n - 1, rng.randint(0, 2)))) for t in ids}
    doc = {"summary": "s", "tasks": [task(t, deps[t]) for t in ids]}
    result = validate_plan(json.dumps(doc))
    # Reference: a graph is acyclic when repeatedly removing tasks with no remaining deps empties it.
    left = dict(deps)
    while free := [t for t, d in left.items() if not set(d) & set(left)]:
        for t in free:
            del left[t]
    if not left:
        assert isinstance(result, ValidatedPlan)
        return
    assert isinstance(result, list) and result
    seen: set[str] = set()
    for error in result:
        match = re.fullmatch(r"dependency cycle: (.*) \(each task depends on the next\)", error.message)
        assert match, error
        cycle = match[1].split(" -> ")
        assert cycle[0] == cycle[-1] and len(set(cycle[:-1])) == len(cycle) - 1
        assert all(b in deps[a] for a, b in itertools.pairwise(cycle))
        assert error.path == f"$.tasks[{ids.index(cycle[0])}].deps"
        assert not seen & set(cycle), "one cycle per group of tasks"
        seen |= set(cycle)
    assert seen <= set(left)


def test_ready_tasks_in_natural_order():
    plan = Plan(
        summary="s",
        tasks=tuple(
            PlannedTask(id=i, title=i, instructions=".", deps=("t1",) if i != "t1" else ())
            for i in ["t10", "t1", "t2", "t9"]
        ),
    )
    assert ready(plan, set()) == ["t1"]
    assert ready(plan, {"t1"}) == ["t2", "t9", "t10"]
    assert ready(plan, {"t1", "t9"}) == ["t2", "t10"]
    assert topological_order(plan) == ["t1", "t2", "t9", "t10"]


def test_topological_order_refuses_a_cycle():
    plan = Plan(
        summary="s",
        tasks=(
            PlannedTask(id="a", title="a", instructions=".", deps=("b",)),
            PlannedTask(id="b", title="b", instructions=".", deps=("a",)),
        ),
    )
    with pytest.raises(ValueError, match="cycle"):
        topological_order(plan)


# --- renderings ---------------------------------------------------------------------------------------------


def validated() -> Plan:
    result = validate_plan(json.dumps(oauth_plan()))
    assert isinstance(result, ValidatedPlan)
    return result.plan


def test_render_text():
    assert render_text(validated()) == (
        "Add GitHub OAuth login: a user model, settings, the login routes, then tests and docs.\n"
        "5 tasks in 3 waves\n"
        "\n"
        "wave 1\n"
        "  t1  Add the User model\n"
        "        modify  src/app/models/__init__.py\n"
        "        create  src/app/models/user.py\n"
        "  t2  OAuth settings\n"
        "        modify  src/app/config.py\n"
        "\n"
        "wave 2\n"
        "  t3  Login and callback routes  (after t1, t2)\n"
        "        create  src/app/routes/auth.py\n"
        "\n"
        "wave 3\n"
        "  t4  Tests for the login flow  (after t3)\n"
        "        create  tests/**/test_auth*.py\n"
        "  t5  Document the login  (after t3)\n"
        "        modify  README.md\n"
    )


def test_render_dot():
    assert render_dot(validated()) == (
        "digraph plan {\n"
        "  rankdir=LR;\n"
        '  node [shape=box, fontname="sans-serif"];\n'
        '  "t1" [label="t1\\nAdd the User model"];\n'
        '  "t2" [label="t2\\nOAuth settings"];\n'
        '  "t3" [label="t3\\nLogin and callback routes"];\n'
        '  "t4" [label="t4\\nTests for the login flow"];\n'
        '  "t5" [label="t5\\nDocument the login"];\n'
        '  "t1" -> "t3";\n'
        '  "t2" -> "t3";\n'
        '  "t3" -> "t4";\n'
        '  "t3" -> "t5";\n'
        "}\n"
    )


def test_render_mermaid():
    assert render_mermaid(validated()) == (
        "flowchart LR\n"
        '  n1["t1: Add the User model"]\n'
        '  n2["t2: OAuth settings"]\n'
        '  n3["t3: Login and callback routes"]\n'
        '  n4["t4: Tests for the login flow"]\n'
        '  n5["t5: Document the login"]\n'
        "  n1 --> n3\n"
        "  n2 --> n3\n"
        "  n3 --> n4\n"
        "  n3 --> n5\n"
    )


def test_renderings_escape_what_the_model_wrote():
    title = 'Fix "quoted" <b>\\n</b> & #1\nsecond line ' + "x" * 80
    plan = Plan(summary="s", tasks=(PlannedTask(id="end", title=title, instructions="."),))
    dot = render_dot(plan)
    assert '"end" [label="end\\nFix \\"quoted\\" <b>\\\\n</b> & #1 second line ' in dot
    assert dot.count("\n") == 5 and 'x…"];' in dot
    mermaid = render_mermaid(plan)
    assert mermaid.startswith(
        'flowchart LR\n  n1["end: Fix #quot;quoted#quot; #lt;b#gt;\\n#lt;/b#gt; & #35;1 second line'
    )
    assert mermaid.count('"') == 2
    assert render_text(plan).splitlines()[4] == f"  end  {' '.join(title.split())}"


# --- the schema given to codex ------------------------------------------------------------------------------


def _walk(node: Any, path: str = "$", depth: int = 0):
    yield path, node, depth
    for key in ("items",):
        if key in node:
            yield from _walk(node[key], f"{path}.{key}", depth)
    for name, sub in node.get("properties", {}).items():
        yield from _walk(sub, f"{path}.properties.{name}", depth + 1)


def test_the_schema_file_is_strict_structured_outputs():
    on_disk = json.loads((schemas.ROOT / "schemas" / "plan.schema.json").read_text())
    assert on_disk == output_schema()
    assert on_disk["type"] == "object" and "anyOf" not in on_disk
    objects = 0
    for path, node, depth in _walk(on_disk):
        assert set(node) <= STRICT_KEYWORDS, (path, set(node) - STRICT_KEYWORDS)
        assert "type" in node, path
        assert depth <= 10
        if node["type"] == "object":
            objects += 1
            assert node["additionalProperties"] is False, path
            assert node["required"] == list(node["properties"]), path
        if "enum" in node:
            assert node["type"] == "string" and all(isinstance(v, str) for v in node["enum"])
        if "pattern" in node:
            re.compile(node["pattern"])
    assert objects == 3
    task_schema = on_disk["properties"]["tasks"]["items"]
    assert list(task_schema["properties"]) == ["id", "title", "instructions", "role", "deps", "intents"]
    assert task_schema["properties"]["id"]["pattern"] == "^[A-Za-z0-9_][A-Za-z0-9_-]{0,63}$"


def _conforms(instance: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """A validator for exactly the keywords the strict subset uses (jsonschema is not a dependency)."""
    kind = schema["type"]
    python = {"object": dict, "array": list, "string": str}[kind]
    if not isinstance(instance, python):
        return [f"{path}: not {kind}"]
    problems = []
    if "enum" in schema and instance not in schema["enum"]:
        problems.append(f"{path}: not in enum")
    if "pattern" in schema and not re.search(schema["pattern"], instance):
        problems.append(f"{path}: does not match pattern")
    if kind == "array":
        if len(instance) < schema.get("minItems", 0):
            problems.append(f"{path}: too few items")
        for i, item in enumerate(instance):
            problems += _conforms(item, schema["items"], f"{path}[{i}]")
    if kind == "object":
        problems += [f"{path}: missing {key}" for key in schema["required"] if key not in instance]
        problems += [f"{path}: extra {key}" for key in instance if key not in schema["properties"]]
        for key, sub in schema["properties"].items():
            if key in instance:
                problems += _conforms(instance[key], sub, f"{path}.{key}")
    return problems


@settings(max_examples=15, deadline=None)
@given(plans())
def test_valid_plans_conform_to_the_schema(doc: dict[str, Any]):
    assert _conforms(doc, output_schema()) == []


def test_the_schema_refuses_what_validation_refuses():
    schema = output_schema()
    assert _conforms(oauth_plan(), schema) == []
    bad = oauth_plan()
    bad["tasks"][0]["id"] = "not a token"
    bad["tasks"][0]["mode"] = "x"
    bad["tasks"][1]["role"] = "reviewer"
    del bad["tasks"][4]["deps"]
    assert _conforms(bad, schema) == [
        "$.tasks[0]: extra mode",
        "$.tasks[0].id: does not match pattern",
        "$.tasks[1].role: not in enum",
        "$.tasks[4]: missing deps",
    ]
    assert _conforms({"summary": "s", "tasks": []}, schema) == ["$.tasks: too few items"]
