"""Fuzzing the daemon's edges: every command, plan answer, claim answer and line of agent output it can be sent.

Bad input never hurts (DESIGN.md, invariant 5): each property feeds the daemon's real decoders and validators
inputs that are sometimes well formed and often hostile (random bytes, wrong types, huge strings, deep nesting,
NULs and control characters, paths with `..` or absolute, duplicate ids, dependency cycles) and checks that the
answer is a valid value or the project's clear refusal, never another exception. One property sends such
requests to a real daemon. How many examples each runs is the Hypothesis profile's (tests/conftest.py):
a few hundred each in `make test`, 100,000 each in `make fuzz`.
"""

from __future__ import annotations

import asyncio
import json
import os
import types
import typing
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from unittest import mock

import hypothesis
import msgspec
import nats
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from numerusd import domain, locks, plans
from numerusd.agents import base
from numerusd.agents.base import SPLIT_MARK, LineBuffer
from numerusd.agents.codex import CodexOutputParser
from numerusd.domain import observations as seen
from numerusd.errors import BadRequest, CommandRefused, InvalidTransition
from numerusd.protocol import envelope
from numerusd.protocol.claims import Claim, Lock, decode_claim
from numerusd.protocol.commands import REQUESTS
from numerusd.protocol.events import EventData, Usage
from numerusd.protocol.ids import is_token
from numerusd.protocol.plan import Plan, PlanError
from numerusd.service import decode_request
from tests.daemon_harness import Daemon, git_repo

# --- hostile values ------------------------------------------------------------------------------------------

#: Strings an attacker would try first: traversal, absolute and home paths, git's own files, NATS wildcards, NULs,
#: control characters, bidi overrides, option-looking names, lone surrogates (invalid UTF-8 once encoded).
NASTY = [
    "",
    " ",
    "\x00",
    "a\x00b",
    "..",
    "../x",
    "a/../../b",
    "./../etc/passwd",
    "/etc/passwd",
    "//x",
    "~",
    "~root/.ssh",
    ".git",
    ".git/config",
    "a/.git/../.git/hooks/pre-commit",
    "a\\..\\b",
    "\n",
    "a\r\nb",
    "\t",
    "\x1b[2J",
    "\u202etxt.exe",
    "*",
    ">",
    "numerus.>",
    "a.b",
    "-rf",
    "--upload-pack=x",
    "t1",
    "é/ü",
    "\U0001f600",
    "\ud800",
    "\ufeff",
]

nasty_text = st.one_of(
    st.text(max_size=24),
    st.sampled_from(NASTY),
    st.text(alphabet=st.characters(codec="utf-8", categories=["Cc", "Cf", "Zs", "Zl", "Zp"]), max_size=8),
    # Huge strings: rare (each costs milliseconds), but there.
    st.builds(str.__mul__, st.sampled_from(["a", "é", "\x00", "../", "\n"]), st.integers(1_000, 300_000)),
)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and infinities encode as bare words, which are not JSON: a hostile input of their own
    nasty_text,
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(nasty_text, inner, max_size=4),
    max_leaves=12,
)


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON as a sloppy client would write it: lone surrogates escaped, or written raw as invalid UTF-8."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


def documents(values: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """Bytes built from `values`: whole, truncated, with a byte changed; or random bytes, or very deep nesting."""
    encoded = st.builds(encode, values, st.booleans())
    return st.one_of(
        encoded,
        encoded,
        st.builds(lambda doc, cut: doc[: cut % (len(doc) + 1)], encoded, st.integers(0, 1 << 16)),
        st.builds(
            lambda doc, at, byte: doc[:at] + bytes([byte]) + doc[at + 1 :] if doc else doc,
            encoded,
            st.integers(0, 200),
            st.integers(0, 255),
        ),
        st.binary(max_size=256),
        st.integers(1, 200_000).map(lambda depth: b"[" * depth + b"]" * depth),
        st.integers(1, 200_000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth),
    )


def shaped_like(cls: type[msgspec.Struct]) -> st.SearchStrategy[dict]:
    """Objects with `cls`'s fields, each a value of its type or a hostile one, some left out, some unknown added."""

    def plausible(tp: Any) -> st.SearchStrategy[Any]:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Annotated:
            return plausible(args[0])
        if origin is typing.Literal:
            return st.sampled_from(args)
        if origin in (typing.Union, types.UnionType):
            return st.one_of([plausible(arg) for arg in args])
        if origin in (list, tuple):
            return st.lists(plausible(args[0]), max_size=4)
        if origin is dict:
            return st.dictionaries(plausible(args[0]), plausible(args[1]), max_size=3)
        if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
            return shaped_like(tp)
        return {str: nasty_text, int: st.integers(-5, 10_000), bool: st.booleans(), type(None): st.none()}.get(
            tp, json_values
        )

    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {
        field.encode_name: st.one_of(plausible(hints[field.name]), plausible(hints[field.name]), json_values)
        for field in msgspec.structs.fields(cls)
    }
    return st.builds(
        lambda present, extra: {**present, **extra},
        st.fixed_dictionaries({}, optional=fields),
        st.dictionaries(nasty_text, json_values, max_size=1) | st.just({}),
    )


def one_clear_line(message: str) -> None:
    """What a user is told: one non-empty line, short enough to read."""
    assert message.strip(), "an empty error message"
    assert len(message.splitlines()) == 1, f"a message of several lines: {message[:300]!r}"
    assert len(message) <= 1000, f"a message of {len(message)} characters"


# --- commands ------------------------------------------------------------------------------------------------

verbs = st.sampled_from(sorted(REQUESTS))


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes]:
    """A verb and the bytes of a request for it: shaped like its type, or any JSON, mangled or not."""
    verb = draw(verbs)
    return verb, draw(st.one_of(documents(shaped_like(REQUESTS[verb])), documents(json_values)))


@given(requests())
@example(("run", b'{"goal": "x", "repo": "/r", "a\\nb": 1}'))  # an unknown field whose name holds a newline
@example(("run", b'{"goal": "x", "repo": "/r", "' + b"k" * 5_000 + b'": 1}'))  # a long unknown field name
@example(("status", b'{"limit": 0}'))
def test_a_request_decodes_to_its_command_or_is_refused_in_one_clear_line(request: tuple[str, bytes]):
    verb, data = request
    try:
        command = decode_request(verb, data)
    except BadRequest as e:
        assert e.code == "bad_request"
        one_clear_line(e.message)
        return
    assert type(command) is REQUESTS[verb]
    # What decoded encodes and decodes back to itself: the handler sees exactly what was sent.
    assert decode_request(verb, msgspec.json.encode(command)) == command


# --- plan answers --------------------------------------------------------------------------------------------

task_ids = st.sampled_from(["t1", "t2", "t3", "t10", "a_b", "-x", "t 1", "", "t1.x", "x" * 65]) | nasty_text
intent_paths = st.sampled_from(["src/a.py", "docs/", "src/**/*.py", "out/x", "out", "in/../out/y", "[a", "{a,b}"])
planned_tasks = st.fixed_dictionaries(
    {
        "id": task_ids,
        "title": st.sampled_from(["Do it", " "]) | nasty_text,
        "instructions": st.sampled_from(["Write the code."]) | nasty_text,
    },
    optional={
        "deps": st.lists(task_ids, max_size=4),
        "intents": st.lists(
            st.fixed_dictionaries(
                {"path": intent_paths | nasty_text, "mode": st.sampled_from(["create", "modify", "delete", "move"])}
            ),
            max_size=3,
        ),
        "role": st.sampled_from(["executor", "queen"]),
    },
)
plan_answers = st.fixed_dictionaries(
    {"summary": nasty_text, "tasks": st.lists(planned_tasks | shaped_like(Plan), max_size=6)}
)


@pytest.fixture(scope="module")
def repo_with_an_exit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository whose `out` is a symlink to a directory outside it: a plan must not reach through it."""
    root = tmp_path_factory.mktemp("planned")
    (root / "elsewhere").mkdir()
    repo = root / "repo"
    (repo / "src").mkdir(parents=True)
    (repo / "in").mkdir()
    (repo / "out").symlink_to(root / "elsewhere")
    return repo


def leaves_the_repository(path: str, repo: Path) -> bool:
    """Whether the literal part of `path` (before any wildcard) resolves, symlinks followed, outside `repo`."""
    literal = path.split("*")[0].split("?")[0].split("[")[0]
    full = os.path.realpath(repo / literal)
    return full != str(repo) and not full.startswith(f"{repo}/")


@given(answer=st.one_of(documents(plan_answers), documents(json_values), documents(shaped_like(Plan))))
@example(
    answer=b'{"summary": "s", "tasks": [{"id": "a", "title": "t", "instructions": "i", "deps": ["b"]},'
    b'{"id": "b", "title": "t", "instructions": "i", "deps": ["a"]}]}'
)
@example(
    answer=b'{"summary": "s", "tasks": [{"id": "a", "title": "t", "instructions": "i",'
    b'"intents": [{"path": "out/x", "mode": "create"}]}]}'
)
@example(answer=b"[" * 5000 + b"]" * 5000)  # deeper than msgspec's limit: a RecursionError, once
def test_a_plan_answer_is_a_valid_plan_or_rejected_with_its_reasons(answer: bytes, repo_with_an_exit: Path):
    repo = Path(os.path.realpath(repo_with_an_exit))
    text = answer.decode("utf-8", "replace")  # as the daemon reads the planner's answer file
    result = plans.validate_plan(text, repo=repo)
    if isinstance(result, list):
        assert result, "a rejection without a reason"
        for error in result:
            assert isinstance(error, PlanError) and error.path.startswith("$") and error.message.strip()
        return
    tasks = {task.id: task for task in result.plan.tasks}
    assert len(tasks) == len(result.plan.tasks), "duplicate task ids accepted"
    assert all(is_token(task_id) for task_id in tasks)
    done: set[str] = set()
    for task_id in result.order:  # an order in which every dependency comes first: no cycle
        assert set(tasks[task_id].deps) <= done, f"{task_id} runs before one of its dependencies"
        done.add(task_id)
    assert done == set(tasks)
    for task in tasks.values():
        assert task.title.strip() and task.instructions.strip()
        for intent in task.intents:
            path = intent.path
            assert "\0" not in path and not path.startswith(("/", "~", "../")) and path != ".."
            assert path != ".git" and not path.startswith(".git/")
            assert not leaves_the_repository(path, repo), f"{path} leads out of the repository"
    assert plans.validate_plan(msgspec.json.encode(result.plan), repo=repo) == result, "not stable under re-checking"


# --- claim answers -------------------------------------------------------------------------------------------

claim_paths = st.sampled_from(["src/a.py", "src/", ".", "./", "out/x", "in/../out", "a//b/./c", "x/"]) | nasty_text
claim_answers = st.fixed_dictionaries(
    {
        "paths": st.lists(
            st.fixed_dictionaries(
                {
                    "path": claim_paths,
                    "kind": st.sampled_from(["file", "dir", "link"]),
                    "mode": st.sampled_from(["create", "modify", "delete", "read", "write"]),
                }
            ),
            max_size=4,
        ),
        "commands": st.lists(nasty_text, max_size=3),
    }
)


@given(answer=st.one_of(documents(claim_answers), documents(shaped_like(Claim)), documents(json_values)))
def test_a_claim_answer_is_locks_inside_the_worktree_or_refused_with_its_reasons(
    answer: bytes, repo_with_an_exit: Path
):
    worktree = Path(os.path.realpath(repo_with_an_exit))
    text = answer.decode("utf-8", "replace")
    try:
        claim = decode_claim(text)
    except msgspec.DecodeError as e:
        assert str(e).strip()
        return
    wanted = locks.claim_locks(claim, worktree)
    if isinstance(wanted, locks.BadClaim):
        assert wanted.errors and str(wanted).strip()
        return
    for lock in wanted:
        assert lock.path == locks.ROOT or not lock.path.startswith(("/", "~", "./", "../")), lock
        parts = lock.path.rstrip("/").split("/")
        assert ".." not in parts and parts[0] != ".git" and "" not in parts[:-1], lock
        assert not leaves_the_repository(lock.path, worktree), f"{lock.path} leads out of the worktree"
    assert locks.canonical(wanted) == wanted


# --- agent output --------------------------------------------------------------------------------------------

codex_items = st.fixed_dictionaries(
    {"type": st.sampled_from(["agent_message", "command_execution", "file_change", "reasoning"]) | nasty_text},
    optional={
        "id": json_values,
        "text": json_values,
        "command": nasty_text,
        "exit_code": st.none() | st.integers(-(2**65), 2**65),
        "status": st.sampled_from(["completed", "failed"]) | nasty_text,
        "changes": st.lists(
            st.fixed_dictionaries({"path": nasty_text | st.just("/repo/a.py"), "kind": nasty_text}), max_size=3
        )
        | json_values,
    },
)
codex_events = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["thread.started", "turn.started", "turn.completed", "turn.failed", "item.completed", "error"]
        )
        | nasty_text
    },
    optional={
        "thread_id": nasty_text,
        "usage": st.fixed_dictionaries(
            {},
            optional={
                key: st.integers(-(2**65), 2**65) | json_values
                for key in ("input_tokens", "cached_input_tokens", "output_tokens")
            },
        ),
        "error": st.fixed_dictionaries({}, optional={"message": json_values}),
        "message": json_values,
        "item": codex_items | json_values,
    },
)
codex_lines = st.one_of(
    st.builds(encode, codex_events, st.booleans()).map(lambda line: line.decode("utf-8", "replace")),
    st.builds(
        lambda prefix, line: prefix + line,
        st.sampled_from(["", "\x1b[31m", "Error: ", "warn {", " \r"]),
        st.builds(encode, codex_events, st.just(True)).map(bytes.decode),
    ),
    nasty_text,
    # Nested deeper than msgspec's limit where the parser skips a value or keeps it raw.
    st.builds(
        lambda key, depth: f'{{"type": "item.completed", "{key}": {"[" * depth}{"]" * depth}}}',
        st.sampled_from(["item", "unknown"]),
        st.integers(1, 5000),
    ),
)


def payloads_encode(events: list[EventData]) -> None:
    """Each payload encodes to JSON and decodes back to its type: it can be appended as an event."""
    for event in events:
        assert type(msgspec.json.decode(msgspec.json.encode(event), type=type(event))) is type(event)


@given(st.lists(codex_lines, max_size=8))
@example(['{"type": "turn.completed", "usage": {"input_tokens": 18446744073709551616}}'])  # 2**64: cannot encode
def test_the_codex_parser_never_raises_and_every_payload_encodes(lines: list[str]):
    parser = CodexOutputParser(usage_baseline=(5, 0, 5), repo=Path("/repo"))
    for line in lines:
        events = parser.feed(line)
        payloads_encode(events)
    assert all(0 <= count < 2**64 for count in parser.thread_usage)


@st.composite
def chunked(draw: st.DrawFn) -> list[bytes]:
    """Terminal output, cut into chunks anywhere (inside a UTF-8 character, between `\\r` and `\\n`)."""
    data = draw(
        st.one_of(
            st.binary(max_size=300),
            st.lists(codex_lines | st.sampled_from(["\r", "\n", "\r\n", "é", "\U0001f600"]), max_size=10).map(
                lambda parts: "".join(parts).encode("utf-8", "surrogatepass")
            ),
        )
    )
    # At most one terminal read (64 KiB) at a time in the daemon; here much less, since MAX_LINE is made tiny.
    data = data[:4096]
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def rejoined(lines: list[str]) -> list[str]:
    """The lines as they were before LineBuffer cut the long ones (each cut piece ends with SPLIT_MARK)."""
    whole, partial = [], ""
    for line in lines:
        if line.endswith(SPLIT_MARK):
            partial += line.removesuffix(SPLIT_MARK)
        else:
            whole.append(partial + line)
            partial = ""
    return [*whole, partial] if partial else whole


@given(chunked(), st.sampled_from([4, 17, base.MAX_LINE]))
def test_a_line_buffer_gives_back_exactly_the_lines_it_was_fed(chunks: list[bytes], max_line: int):
    data = b"".join(chunks)
    with mock.patch.object(base, "MAX_LINE", max_line):
        buffer = LineBuffer()
        parser = CodexOutputParser()
        lines = [line for chunk in chunks for line in buffer.feed(chunk)] + buffer.close()
        for line in lines:
            assert "\n" not in line and len(line) <= max_line + len(SPLIT_MARK)
            payloads_encode(parser.feed(line))
    *ended, rest = data.decode("utf-8", "replace").split("\n")
    expected = [line.removesuffix("\r") for line in ended] + (
        [rest.removesuffix("\r")] if rest.removesuffix("\r") else []
    )
    if SPLIT_MARK not in data.decode("utf-8", "replace"):  # a line that holds the mark itself is ambiguous
        assert rejoined(lines) == expected


# --- the domain ----------------------------------------------------------------------------------------------

T0 = datetime(2026, 12, 1, tzinfo=UTC)
KEY = b"k" * 32
TASKS = ["t1", "t2", "t3"]
small_text = st.sampled_from(["", "x", "fix it", "a\nb"]) | st.text(max_size=8)
some_tasks = st.sampled_from([*TASKS, "t9"])
counts = st.integers(0, 5)
usages = st.builds(Usage, input_tokens=counts, output_tokens=counts)


def valid_plans() -> st.SearchStrategy[Plan]:
    """Small plans that pass validation: ids among TASKS, dependencies on earlier tasks only."""

    def build(size: int, deps: list[list[bool]]) -> Plan:
        tasks = [
            {
                "id": TASKS[i],
                "title": f"task {i}",
                "instructions": "do",
                "deps": [TASKS[j] for j in range(i) if deps[i][j]],
            }
            for i in range(size)
        ]
        result = plans.validate_plan(json.dumps({"summary": "s", "tasks": tasks}))
        assert not isinstance(result, list), result
        return result.plan

    return st.builds(
        build, st.integers(1, 3), st.lists(st.lists(st.booleans(), min_size=3, max_size=3), min_size=3, max_size=3)
    )


def task_observations(task: st.SearchStrategy[str]) -> dict[type, st.SearchStrategy[Any]]:
    """A strategy for each observation of one task, about the task `task` draws."""
    texts = st.lists(small_text, max_size=2).map(tuple)
    reported = st.one_of(
        st.builds(
            lambda n: CodexOutputParser().feed(json.dumps({"type": "turn.completed", "usage": {"input_tokens": n}}))[0],
            counts,
        ),
        st.builds(lambda text: CodexOutputParser().feed(json.dumps({"type": "error", "message": text}))[0], small_text),
        st.builds(Usage),  # not something an agent may report: refused
    )
    return {
        seen.TaskReady: st.builds(seen.TaskReady, task=task),
        seen.ClaimAnswered: st.builds(
            seen.ClaimAnswered,
            task=task,
            attempt=counts,
            locks=st.lists(
                st.builds(Lock, st.sampled_from(["a", "b/", "./"]), st.sampled_from(["create", "read"])), max_size=2
            ).map(tuple),
            errors=st.lists(small_text, max_size=1).map(tuple),
            max_attempts=st.integers(1, 2),
        ),
        seen.WorktreeReady: st.builds(
            seen.WorktreeReady, task=task, path=st.just("/w"), branch=st.just("b"), base_sha=st.just("0")
        ),
        seen.AgentStarting: st.builds(
            seen.AgentStarting, task=task, argv=st.just(("codex",)), workdir=st.just("/w"), log_path=st.just("l")
        ),
        seen.AgentStarted: st.builds(seen.AgentStarted, task=task, pid=st.integers(1, 99), start_ticks=counts),
        seen.AgentFailedToStart: st.builds(seen.AgentFailedToStart, task=task, reason=small_text),
        seen.AgentReported: st.builds(seen.AgentReported, task=task, events=st.lists(reported, max_size=2).map(tuple)),
        seen.AgentExited: st.builds(
            seen.AgentExited,
            task=task,
            exit_code=st.none() | st.integers(-1, 2),
            signal=st.none() | counts,
            log_path=st.just("l"),
            log_sha256=st.just("0"),
            log_bytes=counts,
            duration_s=st.floats(0, 10),
        ),
        seen.WorkCommitted: st.builds(seen.WorkCommitted, task=task, commit=st.just("c"), changes=texts),
        seen.ClaimCompared: st.builds(
            seen.ClaimCompared, task=task, violations=st.lists(small_text, max_size=1).map(tuple)
        ),
        seen.CheckRan: st.builds(
            seen.CheckRan, task=task, command=small_text, exit_code=st.none() | counts, duration_s=st.floats(0, 9)
        ),
        seen.Reviewed: st.builds(
            seen.Reviewed, task=task, verdict=st.sampled_from(["approve", "reject"]), usage=usages
        ),
        seen.GateDone: st.builds(seen.GateDone, task=task, reasons=st.lists(small_text, max_size=1).map(tuple)),
        seen.MergeBegun: st.builds(
            seen.MergeBegun, task=task, integration=st.just("i"), parent=st.just("p"), task_sha=st.just("s")
        ),
        seen.MergeWaiting: st.builds(seen.MergeWaiting, task=task, reason=small_text, retry_s=st.floats(0, 5)),
        seen.MergeConflict: st.builds(seen.MergeConflict, task=task, paths=texts),
        seen.Merged: st.builds(seen.Merged, task=task, sha=st.just("s"), created=st.booleans()),
        seen.FinishedInPlace: st.builds(seen.FinishedInPlace, task=task),
        seen.AttemptFailed: st.builds(
            seen.AttemptFailed,
            task=task,
            reasons=st.lists(small_text, min_size=1, max_size=2).map(tuple),
            fresh_worktree=st.booleans(),
        ),
        seen.StoppedForKill: st.builds(seen.StoppedForKill, task=task),
    }


submits = st.builds(
    seen.SubmitJob,
    goal=small_text,
    repo=st.just("/repo"),
    roles=st.just({"executor": "a"}),
    plan=st.booleans(),
    max_attempts=st.integers(1, 3),
    max_replans=st.integers(0, 2),
)
job_observations = {
    seen.SubmitJob: submits,
    seen.Kill: st.builds(seen.Kill, by=st.just("u (operator)"), task=st.one_of(st.none(), st.sampled_from(TASKS))),
    seen.Resume: st.builds(seen.Resume, by=st.just("numerusd")),
    seen.Retry: st.builds(seen.Retry, tasks=st.lists(st.sampled_from(TASKS), max_size=2).map(tuple)),
    seen.Skip: st.builds(seen.Skip, task=st.sampled_from(TASKS)),
    seen.CleanedUp: st.builds(
        seen.CleanedUp, worktrees=st.lists(small_text, max_size=2).map(tuple), logs=st.booleans()
    ),
    seen.PlanAsked: st.builds(
        seen.PlanAsked,
        role=st.sampled_from(["planner", "queen"]),
        attempt=counts,
        agent=st.just("a"),
        log_path=st.just("l"),
    ),
    seen.PlanAnswered: st.builds(
        lambda plan, role, attempt, errors, most: seen.PlanAnswered(
            role=role,
            attempt=attempt,
            plan=plan,
            plan_hash="" if plan is None else plans.plan_hash(plan),
            errors=errors,
            max_attempts=most,
        ),
        st.none() | valid_plans() | valid_plans(),
        st.sampled_from(["planner", "queen"]),
        counts,
        st.lists(small_text, max_size=1).map(tuple) | st.just(()),
        st.integers(1, 3),
    ),
    seen.IntegrationReady: st.builds(seen.IntegrationReady, branch=st.just("numerus/J"), base_sha=st.just("0" * 40)),
    seen.Stalled: st.builds(seen.Stalled, idle_s=st.floats(0, 1e6)),
    seen.ReplanGaveUp: st.builds(seen.ReplanGaveUp, reason=small_text),
    seen.PipelineFailed: st.builds(seen.PipelineFailed, reason=small_text),
    seen.Settled: st.builds(seen.Settled),
    seen.Interrupted: st.builds(seen.Interrupted, reason=small_text),
}
#: Any message about any task, whatever the job's state: mostly refused.
any_message = st.one_of([*job_observations.values(), *task_observations(some_tasks).values()])
#: The observations that may move a task on from each status (the pipeline's order), and a job from its own.
TASK_STEPS: dict[str, tuple[type, ...]] = {
    "pending": (seen.TaskReady, seen.ClaimAnswered, seen.AgentStarting),
    "granted": (seen.WorktreeReady, seen.AgentStarting, seen.AttemptFailed),
    "retrying": (seen.WorktreeReady, seen.AgentStarting),
    "running": (
        seen.AgentStarted,
        seen.AgentFailedToStart,
        seen.AgentReported,
        seen.AgentExited,
        seen.WorkCommitted,
        seen.FinishedInPlace,
        seen.AttemptFailed,
    ),
    "checking": (seen.ClaimCompared, seen.CheckRan, seen.Reviewed, seen.GateDone, seen.AttemptFailed),
    "merging": (seen.MergeBegun, seen.MergeWaiting, seen.MergeConflict, seen.Merged, seen.AttemptFailed),
}
JOB_STEPS: dict[str, tuple[type, ...]] = {
    "planning": (seen.PlanAsked, seen.PlanAnswered),
    "replanning": (seen.PlanAsked, seen.PlanAnswered, seen.ReplanGaveUp),
    "running": (seen.IntegrationReady, seen.Settled, seen.Stalled),
}
COMMANDS = (seen.SubmitJob, seen.Kill, seen.Resume, seen.Retry, seen.Skip, seen.CleanedUp)


@st.composite
def next_message(draw: st.DrawFn, job: domain.JobState | None) -> Any:
    """Mostly a message the job's state allows (a step of its pipeline), sometimes any message at all."""
    if job is None:
        return draw(submits) if draw(st.integers(0, 3)) else draw(any_message)
    if draw(st.integers(0, 9)) == 0:
        return draw(any_message)
    moving = [task for task in job.tasks.values() if task.status in TASK_STEPS]
    if moving and draw(st.integers(0, 3)):
        task = draw(st.sampled_from(moving))
        steps = task_observations(st.just(task.id))
        return draw(st.one_of([steps[cls] for cls in TASK_STEPS[task.status]]))
    kinds = JOB_STEPS.get(job.status, ())
    if not kinds or draw(st.integers(0, 5)) == 0:  # the ends: rarely, or the job ends before it got anywhere
        kinds += (seen.Kill, seen.Retry, seen.Skip, seen.CleanedUp, seen.Interrupted, seen.Resume, seen.PipelineFailed)
    return draw(st.one_of([job_observations[cls] for cls in kinds]))


@given(st.data())
def test_decide_refuses_only_with_its_own_errors_and_replaying_its_events_gives_the_same_job(data: st.DataObject):
    job: domain.JobState | None = None
    replayed: domain.JobState | None = None
    prev, count = "", 0
    for _ in range(data.draw(st.integers(1, 40), label="steps")):
        message = data.draw(next_message(job))
        try:
            decision = domain.decide(job, message)
        except InvalidTransition as e:
            assert e.message.strip()
            continue
        except CommandRefused as e:
            assert isinstance(message, COMMANDS), f"{type(message).__name__} refused as a command: {e}"
            assert e.message.strip()
            continue
        for task, payload in decision:
            count += 1
            sealed = envelope.seal(
                payload,
                id=f"e{count}",
                job="J",
                task=task,
                time=T0,
                actor="fuzz",
                correlation_id="c",
                causation_id=None,
                prev=prev,
                kid="k",
                key=KEY,
            )
            prev = sealed.digest
            job = domain.evolve(job, sealed.envelope)
            # The same event read back from the stream (as a restart or an audit does) changes the job the same.
            envelope.check_signature(sealed.wire, {"k": KEY}, "k")
            replayed = domain.evolve_untyped(replayed, envelope.decode_wire(sealed.wire))
        assert replayed == job
        if job is not None:
            assert set(job.tasks) <= {*TASKS, "t9"}
            assert job.status in ("planning", "running", "replanning", "completed", "failed", "killed", "interrupted")
            domain.job_view(job)  # what status shows can always be drawn
    if job is not None:  # how far the runs got: `pytest --hypothesis-show-statistics` shows it
        hypothesis.event(f"{job.status} " + ",".join(sorted({t.status for t in job.tasks.values()})))


# --- a real daemon -------------------------------------------------------------------------------------------

#: Stands in a request for the id of a job this example's earlier `run` created (else it stays a bad id).
EARLIER_JOB = "$job"
AGENT = "quiet"


@pytest.fixture(scope="module")
def fuzzed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, whose default agent says one line and exits: accepted jobs end quickly."""
    root = tmp_path_factory.mktemp("fuzzed")
    daemon = Daemon(root / "state", agents={AGENT: [{"say": "nothing to do"}]}, config=f'default_agent = "{AGENT}"')
    with daemon.start():
        yield daemon


def daemon_requests(repo: Path, plain: Path) -> st.SearchStrategy[list[tuple[str, bytes]]]:
    """Requests as numerusctl sends them, with hostile values; a few of them valid (a job is accepted)."""
    good_ids = st.sampled_from([EARLIER_JOB, EARLIER_JOB, "01JZZZZZZZZZZZZZZZZZZZZZZZ"])
    good = {
        "job": good_ids,
        "jobs": st.lists(good_ids, min_size=1, max_size=2),
        "repo": st.sampled_from([str(repo), str(plain)]),
        "agent": st.none() | st.just(AGENT),
        "task": st.sampled_from(["t1", "t2"]),
        "ended": st.booleans(),
    }
    paths = st.sampled_from([str(repo), str(plain), "/", "relative/dir"]) | nasty_text
    typed = {
        "job": good_ids | nasty_text,
        "jobs": st.lists(good_ids | nasty_text, max_size=3),
        "repo": paths,
        "agent": st.none() | st.just(AGENT) | nasty_text,
    }

    def values_for(verb: str) -> st.SearchStrategy[dict]:
        """A request shaped like the verb's, some of its fields given values that name this daemon's things."""
        fields = msgspec.structs.fields(REQUESTS[verb])
        known = {f.encode_name: st.one_of(typed[f.encode_name], json_values) for f in fields if f.encode_name in typed}
        return st.builds(
            lambda body, chosen: {**body, **chosen},
            shaped_like(REQUESTS[verb]),
            st.fixed_dictionaries({}, optional=known),
        )

    @st.composite
    def accepted_run(draw: st.DrawFn) -> tuple[str, bytes]:
        body = {"goal": draw(nasty_text.filter(str.strip) | st.just("say hello")), "repo": str(repo)}
        body |= {"plan": False} if draw(st.booleans()) else {"agent": AGENT}
        return "run", json.dumps(body).encode()

    @st.composite
    def one(draw: st.DrawFn) -> tuple[str, bytes]:
        verb = draw(verbs)
        if verb != "run" and draw(st.integers(0, 2)) == 0:  # well formed, about a job that may exist
            fields = {f.encode_name: f.required for f in msgspec.structs.fields(REQUESTS[verb])}
            required = {name: good[name] for name, needed in fields.items() if needed and name in good}
            optional = {name: good[name] for name, needed in fields.items() if not needed and name in good}
            body = draw(st.fixed_dictionaries(required, optional=optional))
            return verb, json.dumps(body).encode()
        return verb, draw(documents(values_for(verb)) | documents(json_values))

    # Half the lists start with a run meant to be accepted, whose job the requests after it may name.
    return st.builds(
        lambda first, rest: [*first, *rest], st.lists(accepted_run(), max_size=1), st.lists(one(), max_size=4)
    )


async def send_all(daemon: Daemon, sent: list[tuple[str, bytes]]) -> list[tuple[str, dict, dict | None]]:
    """Send each request in turn (an earlier run's job standing for EARLIER_JOB): (verb, body, error) of each."""
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    answers, jobs = [], []
    try:
        for verb, data in sent:
            if jobs:
                data = data.replace(EARLIER_JOB.encode(), jobs[-1].encode())
            reply = await nc.request(f"numerus.cmd.{verb}", data, timeout=15)
            body = json.loads(reply.data)
            failed = reply.headers is not None and "Nats-Service-Error-Code" in reply.headers
            answers.append((verb, body, body if failed else None))
            if verb == "run" and not failed:
                jobs.append(body["job"])
    finally:
        await nc.close()
    return answers


async def ask(daemon: Daemon, verb: str, body: dict) -> tuple[dict, str | None]:
    """The reply to one request (always JSON, an error too) and its error code, if an error."""
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    try:
        reply = await nc.request(f"numerus.cmd.{verb}", json.dumps(body).encode(), timeout=15)
        return json.loads(reply.data), (reply.headers or {}).get("Nats-Service-Error-Code")
    finally:
        await nc.close()


@pytest.mark.slow
def test_huge_goals_are_refused_before_decoding_and_status_still_answers(fuzzed_daemon: Daemon, tmp_path: Path):
    """Found by fuzzing: jobs with huge goals made `status` a reply bigger than the server's max_payload (8 MB), which
    NATS refused to carry, and the caller got an empty error. Such a request is refused now, in one line, before
    it is decoded (`max_request_bytes`), and `status` goes on answering."""
    for _ in range(2):
        body, code = asyncio.run(
            ask(fuzzed_daemon, "run", {"goal": "x" * 5_000_000, "repo": str(tmp_path), "plan": False})
        )
        assert code == "413" and body["code"] == "too_large", body
        one_clear_line(body["message"])
    body, code = asyncio.run(ask(fuzzed_daemon, "status", {}))
    assert code is None and "jobs" in body
    body, code = asyncio.run(ask(fuzzed_daemon, "status", {"limit": 1}))
    assert code is None and len(body["jobs"]) <= 1


async def known_jobs(daemon: Daemon, jobs: list[str]) -> tuple[int, set[str]]:
    """How many jobs the daemon knows, and which of `jobs` it shows."""
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    try:
        total = json.loads((await nc.request("numerus.cmd.status", b'{"limit": 1}', timeout=15)).data)["total"]
        shown = set()
        for job in jobs:
            reply = await nc.request("numerus.cmd.status", json.dumps({"job": job}).encode(), timeout=15)
            shown |= {view["id"] for view in json.loads(reply.data)["jobs"]}
        return total, shown
    finally:
        await nc.close()


async def dead_letters(daemon: Daemon) -> int:
    """How many refused requests the daemon keeps on its dead-letter stream."""
    connection = daemon.connection()
    nc = await nats.connect(connection["url"], user=connection["user"], password=connection["password"])
    try:
        info = await nc.jetstream().stream_info("NUMERUS_DLQ", subjects_filter="numerus.dlq.cmd.bad_request")
        return (info.state.subjects or {}).get("numerus.dlq.cmd.bad_request", 0)
    finally:
        await nc.close()


@pytest.mark.slow
def test_a_daemon_sent_random_requests_answers_each_clearly_stays_up_and_loses_nothing(
    fuzzed_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory
):
    repo = git_repo(tmp_path_factory.mktemp("fuzzed-repo") / "repo")
    plain = tmp_path_factory.mktemp("plain")
    accepted: list[str] = []
    before = asyncio.run(ask(fuzzed_daemon, "status", {"limit": 1}))[0]["total"]
    refused = {"bad_request": 0}

    @settings(max_examples=max(200, settings.default.max_examples // 20), deadline=None)
    @given(daemon_requests(repo, plain))
    def each_answered(sent: list[tuple[str, bytes]]) -> None:
        for verb, body, error in asyncio.run(send_all(fuzzed_daemon, sent)):
            if error is None:
                if verb == "run":
                    accepted.append(body["job"])
                continue
            assert error["code"] in ("bad_request", "not_found", "refused", "too_large"), error
            one_clear_line(error["message"])
            refused["bad_request"] += error["code"] == "bad_request"
        assert fuzzed_daemon.alive, fuzzed_daemon.stderr()[-3000:]

    each_answered()
    assert fuzzed_daemon.alive
    # Job by job: a list of jobs whose goals are huge may be more than one reply can carry.
    assert asyncio.run(known_jobs(fuzzed_daemon, accepted)) == (before + len(accepted), set(accepted))
    assert asyncio.run(dead_letters(fuzzed_daemon)) == refused["bad_request"]
