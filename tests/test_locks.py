"""Claims and the lock table: GO / NO GO as a user would check it, and a stateful proof of the invariants.

The proof (`LockMachine`) drives random tasks with random overlapping claims through claim, denial, waiting,
waking and release in random orders, and checks at every step, against a brute-force oracle written separately
from the indexed implementation: no two conflicting locks are held; every task holds all of its claim or nothing;
the waits-for graph has no cycle and every waiting task waits on someone; first come, first served on overlapping
paths; the table folded again from its JSON events is the same table. At the end it drains the system (holders
release) and checks that every waiting task was granted: nobody starves, nothing deadlocks.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from numerusd import locks
from numerusd.locks import EMPTY, BadClaim, Denied, Granted, LockTable, arbitrate, normalise
from numerusd.protocol.claims import (
    Claim,
    ClaimedPath,
    Conflict,
    Lock,
    PathRefused,
    decode_claim,
    output_schema,
)

# --- helpers ------------------------------------------------------------------------------------------------


def grant(table: LockTable, task: str, *claim: tuple[str, str]) -> LockTable:
    """`task` claims `(path, mode)` pairs and must get GO."""
    decision = arbitrate(table, task, [Lock(path, mode) for path, mode in claim])  # type: ignore[arg-type]
    assert isinstance(decision, Granted), str(decision)
    return locks.apply_granted(table, task, decision.locks)


def deny(table: LockTable, task: str, *claim: tuple[str, str]) -> tuple[LockTable, Denied]:
    """`task` claims `(path, mode)` pairs and must get NO GO; it then waits."""
    decision = arbitrate(table, task, [Lock(path, mode) for path, mode in claim])  # type: ignore[arg-type]
    assert isinstance(decision, Denied), decision
    return locks.apply_denied(table, task, decision.locks), decision


def refused(path: str, kind: str = "file", worktree: Path | None = None) -> str:
    result = normalise(path, worktree, kind=kind)  # type: ignore[arg-type]
    assert isinstance(result, PathRefused), result
    return str(result)


# --- GO / NO GO, as a user checks it ------------------------------------------------------------------------


def test_two_tasks_claiming_the_same_file_second_is_denied_naming_the_first() -> None:
    table = grant(EMPTY, "t1", ("src/app.py", "modify"))
    _, denied = deny(table, "t2", ("src/app.py", "modify"), ("README.md", "modify"))
    assert denied.holders == ("t1",)
    assert denied.conflicts == (
        Conflict(path="src/app.py", holder="t1", holder_mode="modify", holder_path="src/app.py"),
    )
    assert str(denied) == "NO GO: src/app.py held by t1 (modify)"


def test_a_denied_claim_gets_nothing_not_even_its_free_paths() -> None:
    table = grant(EMPTY, "t1", ("a.py", "modify"))
    table, _ = deny(table, "t2", ("a.py", "modify"), ("b.py", "modify"))
    assert table.held_by("t2") == ()
    assert table.waiting == ("t2",)
    # b.py is not held by t2, but it is reserved for it: a later writer of b.py queues behind t2.
    _, denied = deny(table, "t3", ("b.py", "modify"))
    assert denied.conflicts[0].queued and denied.holders == ("t2",)


def test_directory_lock_covers_a_file_beneath_it() -> None:
    table = grant(EMPTY, "t1", ("src/", "modify"))
    _, denied = deny(table, "t2", ("src/deep/er/app.py", "modify"))
    assert str(denied) == "NO GO: src/deep/er/app.py overlaps src/, held by t1 (modify)"


def test_file_lock_blocks_a_directory_above_it() -> None:
    table = grant(EMPTY, "t1", ("src/deep/app.py", "read"))
    _, denied = deny(table, "t2", ("src/", "delete"))
    assert denied.conflicts == (Conflict(path="src/", holder="t1", holder_mode="read", holder_path="src/deep/app.py"),)


def test_the_whole_worktree_as_a_directory_covers_everything() -> None:
    table = grant(EMPTY, "t1", ("./", "modify"))
    _, denied = deny(table, "t2", ("anything/at/all", "read"))
    assert denied.holders == ("t1",)
    _, denied = deny(grant(EMPTY, "t1", ("x", "read")), "t2", ("./", "modify"))
    assert denied.holders == ("t1",)


def test_a_file_and_a_path_beneath_the_same_name_overlap() -> None:
    # Creating file 'a/b' and creating 'a/b/c' cannot both succeed: 'a/b' cannot be a file and a directory.
    table = grant(EMPTY, "t1", ("a/b", "create"))
    _, denied = deny(table, "t2", ("a/b/c", "create"))
    assert denied.holders == ("t1",)


def test_siblings_sharing_a_name_prefix_do_not_conflict() -> None:
    table = grant(EMPTY, "t1", ("src/", "modify"), ("a/b", "modify"))
    table = grant(table, "t2", ("src2/", "modify"), ("src.py", "modify"), ("a/bc", "modify"), ("a/b-c/", "modify"))
    assert set(table.holders) == {"t1", "t2"}


def test_readers_share() -> None:
    table = grant(EMPTY, "t1", ("docs/", "read"))
    table = grant(table, "t2", ("docs/index.md", "read"))
    table = grant(table, "t3", ("docs/", "read"), ("docs/index.md", "read"))
    assert list(table.holders) == ["t1", "t2", "t3"]


@pytest.mark.parametrize("mode", ["create", "modify", "delete"])
def test_a_writer_excludes_readers_and_readers_exclude_a_writer(mode: str) -> None:
    table = grant(EMPTY, "t1", ("lib/", mode))
    _, denied = deny(table, "t2", ("lib/x.py", "read"))
    assert denied.holders == ("t1",)
    table = grant(EMPTY, "t1", ("lib/x.py", "read"))
    _, denied = deny(table, "t2", ("lib/", mode))
    assert denied.holders == ("t1",)


def test_a_tasks_own_locks_never_conflict() -> None:
    table = grant(EMPTY, "t1", ("src/", "modify"), ("src/app.py", "read"), ("src/app.py", "delete"))
    assert len(table.held_by("t1")) == 3


def test_conflicts_name_every_holder() -> None:
    table = grant(EMPTY, "t1", ("a/x", "read"))
    table = grant(table, "t2", ("a/y", "read"))
    _, denied = deny(table, "t3", ("a/", "modify"))
    assert denied.holders == ("t1", "t2")


def test_a_holder_must_release_before_claiming_again() -> None:
    table = grant(EMPTY, "t1", ("a", "modify"))
    with pytest.raises(ValueError, match="already holds locks"):
        arbitrate(table, "t1", [Lock("b", "modify")])


def test_release_wakes_the_waiter_which_then_gets_go() -> None:
    table = grant(EMPTY, "t1", ("src/app.py", "modify"))
    table, _ = deny(table, "t2", ("src/", "modify"))
    assert locks.wakeable(table) == []
    assert locks.waits_for(table) == {"t2": ("t1",)}
    table = locks.release(table, "t1")
    assert locks.wakeable(table) == ["t2"]
    claim = table.queued_claim("t2")
    assert claim is not None
    decision = arbitrate(table, "t2", claim)
    assert isinstance(decision, Granted)
    table = locks.apply_granted(table, "t2", decision.locks)
    assert table.waiting == () and table.held_by("t2") == (Lock("src/", "modify"),)


def test_wakeable_tasks_come_in_fifo_order_and_can_all_be_granted_in_it() -> None:
    table = grant(EMPTY, "t1", ("a/", "modify"))
    table, _ = deny(table, "t2", ("a/x", "read"))
    table, _ = deny(table, "t3", ("a/y", "modify"))
    table, _ = deny(table, "t4", ("a/x", "read"))
    table = locks.release(table, "t1")
    woken = locks.wakeable(table)
    assert woken == ["t2", "t3", "t4"]
    for task in woken:
        claim = table.queued_claim(task)
        assert claim is not None
        table = grant(table, task, *((lock.path, lock.mode) for lock in claim))
    assert table.waiting == ()


def test_a_waiting_writer_is_not_starved_by_a_stream_of_readers() -> None:
    table = grant(EMPTY, "r1", ("src/app.py", "read"))
    table, _ = deny(table, "w", ("src/", "modify"))  # the big claim waits for r1
    # Readers keep coming; without the queue each would be granted, and 'w' would wait for ever.
    table, denied = deny(table, "r2", ("src/app.py", "read"))
    assert denied.conflicts == (
        Conflict(path="src/app.py", holder="w", holder_mode="modify", holder_path="src/", queued=True),
    )
    assert str(denied) == "NO GO: src/app.py overlaps src/, wanted by w (modify), which was denied first and waits"
    table = locks.release(table, "r1")
    assert locks.wakeable(table) == ["w"]  # r2 overlaps w and queued after it: it waits for w's turn
    table = grant(table, "w", ("src/", "modify"))
    assert locks.waits_for(table) == {"r2": ("w",)}


def test_an_unrelated_claim_goes_ahead_of_the_queue() -> None:
    table = grant(EMPTY, "t1", ("a", "modify"))
    table, _ = deny(table, "t2", ("a", "modify"))
    table = grant(table, "t3", ("b", "modify"))  # overlaps neither t1 nor t2: no head-of-line blocking
    assert set(table.holders) == {"t1", "t3"}


def test_a_waiting_task_denied_again_keeps_its_place() -> None:
    table = grant(EMPTY, "t1", ("a", "modify"))
    table, _ = deny(table, "t2", ("a", "modify"), ("c", "read"))
    table, _ = deny(table, "t3", ("a", "read"))
    table, denied = deny(table, "t2", ("a", "modify"))  # re-claimed with part of its claim
    assert table.waiting == ("t2", "t3")
    assert denied.holders == ("t1",)  # t3 queued after t2 is not in t2's way
    assert table.queued_claim("t2") == (Lock("a", "modify"),)


def test_a_waiting_task_asking_for_more_goes_to_the_back() -> None:
    table = grant(EMPTY, "t1", ("a", "create"))
    table, _ = deny(table, "t2", ("a", "read"))
    table, denied = deny(table, "t3", ("a", "read"))
    assert denied.holders == ("t1",)  # two readers queue side by side
    # t2 now wants to write: in place, it would get in t3's way on a path t3 was never told about.
    table, denied = deny(table, "t2", ("a", "modify"))
    assert table.waiting == ("t3", "t2")
    assert denied.holders == ("t1", "t3")
    assert locks.waits_for(table) == {"t3": ("t1",), "t2": ("t1", "t3")}


def test_release_of_a_waiting_task_withdraws_it_from_the_queue() -> None:
    table = grant(EMPTY, "t1", ("a", "modify"))
    table, _ = deny(table, "t2", ("a", "modify"))
    table, _ = deny(table, "t3", ("a", "read"))
    table = locks.release(table, "t2")  # t2 was killed while waiting
    assert table.waiting == ("t3",)
    assert locks.waits_for(table) == {"t3": ("t1",)}
    assert locks.release(table, "nobody") is table


def test_the_fold_refuses_a_grant_that_would_break_mutual_exclusion() -> None:
    # Two decisions made concurrently on the same table would both say GO; the fold keeps only the first.
    table = locks.apply_granted(EMPTY, "t1", [Lock("a", "modify")])
    assert locks.apply_granted(table, "t2", [Lock("a", "read")]) is table
    assert locks.apply_granted(table, "t1", [Lock("b", "read")]) is table  # a holder is granted only once
    assert locks.apply_denied(table, "t1", [Lock("b", "read")]) is table  # and never waits


def test_claims_are_canonical() -> None:
    claim = [Lock("b", "read"), Lock("a", "modify"), Lock("b", "read")]
    decision = arbitrate(EMPTY, "t1", claim)
    assert decision == Granted((Lock("a", "modify"), Lock("b", "read")))


def test_a_claim_given_as_a_generator_is_judged_whole() -> None:
    table = grant(EMPTY, "t1", ("a", "modify"))
    table, _ = deny(table, "t2", ("a", "read"))
    claim = (lock for lock in [Lock("a", "read")])
    assert locks.conflicts_with(table, "t2", claim)
    assert isinstance(arbitrate(table, "t3", (lock for lock in [Lock("a", "read")])), Denied)


def test_an_empty_claim_is_granted_and_locks_nothing() -> None:
    table = grant(EMPTY, "t1", ("./", "modify"))
    table = grant(table, "t2")
    assert table.held_by("t2") == ()


# --- normalisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "kind", "expected"),
    [
        ("src/app.py", "file", "src/app.py"),
        ("./src//app.py", "file", "src/app.py"),
        ("src/./lib/../app.py", "file", "src/app.py"),
        ("src", "dir", "src/"),
        ("src/", "dir", "src/"),
        ("src//lib/.//", "dir", "src/lib/"),
        (".", "dir", "./"),
        ("./", "dir", "./"),
        ("a/..", "dir", "./"),
        ("ünïcödé/ファイル.txt", "file", "ünïcödé/ファイル.txt"),
        (" spaced name ", "file", " spaced name "),
    ],
)
def test_normalise(path: str, kind: str, expected: str) -> None:
    assert normalise(path, kind=kind) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "kind", "message"),
    [
        ("", "file", "'' is empty: name a file or directory relative to the repository root"),
        ("   ", "dir", "is empty"),
        ("/etc/passwd", "file", "'/etc/passwd' is absolute: give it relative to the repository root"),
        ("../secret", "file", "'../secret' leaves the worktree through '..'"),
        ("src/../../secret", "file", "leaves the worktree through '..'"),
        ("..", "dir", "leaves the worktree"),
        ("~/.ssh/id_rsa", "file", "starts with '~' (a home directory)"),
        ("src\\app.py", "file", "contains a backslash: separate directories with '/'"),
        ("a\x00b", "file", "contains a control character"),
        ("a\nb", "file", "contains a control character"),
        ("src/", "file", "ends with '/' but is claimed as a file: claim it with kind 'dir'"),
        (".git/config", "file", "'.git/config' is inside .git, which no task may touch"),
        ("src/../.git", "dir", "is inside .git"),
        (".", "file", "names the worktree itself, not a file"),
        ("a/..", "file", "names the worktree itself"),
    ],
)
def test_normalise_refuses_with_a_clear_message(path: str, kind: str, message: str) -> None:
    assert message in refused(path, kind)


def test_symlink_out_of_the_worktree_is_refused(tmp_path: Path) -> None:
    worktree = tmp_path / "wt"
    (worktree / "src").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (worktree / "src" / "out").symlink_to(outside)
    (worktree / "dangling").symlink_to(tmp_path / "nowhere" / "x")
    (worktree / "up").symlink_to("..")
    (worktree / "git").symlink_to(".git")
    assert "leads outside the worktree through a symlink" in refused("src/out/file.py", worktree=worktree)
    assert "leads outside the worktree" in refused("src/out", "dir", worktree)
    assert "leads outside the worktree" in refused("dangling", worktree=worktree)  # a link to nothing, outside
    assert "leads outside the worktree" in refused("up/wt/../outside/x", worktree=worktree)
    assert "is inside .git" in refused("git/hooks/pre-commit", worktree=worktree)
    # Without a worktree nothing is read from disk: the same path is only checked lexically.
    assert normalise("src/out/file.py") == "src/out/file.py"


def test_symlink_inside_the_worktree_is_named_by_its_target(tmp_path: Path) -> None:
    # Two names for one file must be one lock, or two tasks could write it through different names.
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "alias").symlink_to("src/pkg")
    (tmp_path / "self").symlink_to(".")
    assert normalise("alias/mod.py", tmp_path) == "src/pkg/mod.py"
    assert normalise("alias", tmp_path, kind="dir") == "src/pkg/"
    assert normalise("self", tmp_path, kind="dir") == "./"
    assert normalise("new/file.py", tmp_path) == "new/file.py"  # paths to be created need not exist
    worktree_via_link = tmp_path.parent / f"{tmp_path.name}-link"
    worktree_via_link.symlink_to(tmp_path)
    try:
        assert normalise("alias/mod.py", worktree_via_link) == "src/pkg/mod.py"
    finally:
        os.unlink(worktree_via_link)


def test_claim_locks_lists_every_refused_path(tmp_path: Path) -> None:
    claim = Claim(
        paths=(
            ClaimedPath("src//app.py", "file", "modify"),
            ClaimedPath("/etc/hosts", "file", "read"),
            ClaimedPath("docs", "dir", "create"),
            ClaimedPath("../x", "dir", "delete"),
        ),
        commands=("pytest",),
    )
    result = locks.claim_locks(claim, tmp_path)
    assert isinstance(result, BadClaim)
    assert [error.path for error in result.errors] == ["/etc/hosts", "../x"]
    assert str(result).startswith("'/etc/hosts' is absolute")
    good = Claim(paths=(ClaimedPath("docs", "dir", "create"), ClaimedPath("a.py", "file", "read")), commands=())
    assert locks.claim_locks(good, tmp_path) == (Lock("a.py", "read"), Lock("docs/", "create"))


# --- the claim as the executor answers it -------------------------------------------------------------------


def _assert_strict(node: Any, where: str = "$") -> None:
    """The strict structured-outputs subset: closed objects, every property required, no refs, typed enums."""
    assert isinstance(node, dict), where
    assert "$ref" not in node and "$defs" not in node, where
    if "enum" in node:
        assert node.get("type") == "string", where
    kind = node.get("type")
    assert kind in {"object", "array", "string"}, where
    if kind == "object":
        assert node["additionalProperties"] is False, where
        assert sorted(node["required"]) == sorted(node["properties"]), where
        for name, child in node["properties"].items():
            _assert_strict(child, f"{where}.{name}")
    if kind == "array":
        _assert_strict(node["items"], f"{where}[]")


def test_output_schema_is_strict_and_matches_the_decoder() -> None:
    schema = output_schema()
    _assert_strict(schema)
    assert schema["properties"]["paths"]["items"]["properties"]["mode"]["enum"] == [
        "create",
        "delete",
        "modify",
        "read",
    ]
    answer = b'{"paths": [{"path": "src/", "kind": "dir", "mode": "modify"}], "commands": ["pytest -q"]}'
    assert decode_claim(answer) == Claim((ClaimedPath("src/", "dir", "modify"),), ("pytest -q",))


@pytest.mark.parametrize(
    ("answer", "where"),
    [
        (b'{"paths": [{"path": "a", "kind": "file", "mode": "write"}], "commands": []}', "$.paths[0].mode"),
        (b'{"paths": [{"path": "a", "kind": "link", "mode": "read"}], "commands": []}', "$.paths[0].kind"),
        (b'{"paths": [{"path": "a", "kind": "file", "mode": "read", "why": 1}], "commands": []}', "$.paths[0]"),
        (b'{"paths": []}', "commands"),
    ],
)
def test_a_bad_claim_answer_names_the_bad_path(answer: bytes, where: str) -> None:
    with pytest.raises(msgspec.ValidationError, match=r"\$|commands") as raised:
        decode_claim(answer)
    assert where in str(raised.value)


# --- events: the table is a fold of them --------------------------------------------------------------------
# The payloads recommended for numerusd/protocol/events.py, here with the task inline (the envelope carries it).


class ClaimGranted(msgspec.Struct, frozen=True, tag=True):
    task: str
    locks: tuple[Lock, ...]


class ClaimDenied(msgspec.Struct, frozen=True, tag=True):
    task: str
    locks: tuple[Lock, ...]
    conflicts: tuple[Conflict, ...]


class LocksReleased(msgspec.Struct, frozen=True, tag=True):
    task: str


LockEvent = ClaimGranted | ClaimDenied | LocksReleased
_EVENTS = msgspec.json.Decoder(list[LockEvent])


def evolve(table: LockTable, event: LockEvent) -> LockTable:
    """What the domain's `evolve` does with the three events."""
    match event:
        case ClaimGranted(task=task, locks=granted):
            return locks.apply_granted(table, task, granted)
        case ClaimDenied(task=task, locks=denied):
            return locks.apply_denied(table, task, denied)
        case LocksReleased(task=task):
            return locks.release(table, task)


def fold(raw: bytes) -> LockTable:
    table = EMPTY
    for event in _EVENTS.decode(raw):
        table = evolve(table, event)
    return table


def assert_indexes_match(table: LockTable) -> None:
    """The incrementally maintained indexes equal ones built from scratch."""
    rebuilt = LockTable(dict(table.holders), {task: table.queued_claim(task) for task in table.waiting})  # type: ignore[misc]
    assert rebuilt == table
    for name in ("_held", "_queued"):
        mine, theirs = getattr(table, name), getattr(rebuilt, name)
        assert mine.keys == theirs.keys == sorted(mine.entries)
        assert {key: sorted(value) for key, value in mine.entries.items()} == {
            key: sorted(value) for key, value in theirs.entries.items()
        }
    assert [table._tickets[task] for task in table.waiting] == sorted(table._tickets.values())


def test_refolding_the_events_gives_the_same_table() -> None:
    history: list[LockEvent] = []
    table = EMPTY
    for task, claim in [("t1", [Lock("a/", "modify")]), ("t2", [Lock("a/x", "read")]), ("t3", [Lock("b", "read")])]:
        decision = arbitrate(table, task, claim)
        event: LockEvent = (
            ClaimGranted(task, decision.locks)
            if isinstance(decision, Granted)
            else ClaimDenied(task, decision.locks, decision.conflicts)
        )
        history.append(event)
        table = evolve(table, event)
    history.append(LocksReleased("t1"))
    table = evolve(table, history[-1])
    assert fold(msgspec.json.encode(history)) == table
    assert table.waiting == ("t2",) and list(table.holders) == ["t3"]


# --- the proof: a stateful machine against a brute-force oracle ---------------------------------------------

TASKS = [f"t{i}" for i in range(6)]
# Few paths, so that claims overlap often, in every way: same file, file under directory, nested directories,
# a file and a path beneath the same name, siblings sharing a name prefix, and rarely the whole worktree.
PATHS = ["a", "a/x", "a/b/y", "ab", "c/z", "d", "a/", "a/b/", "c/", "a/x", "c/z", "d", "./"]
MODES = ["create", "modify", "delete", "read", "read", "read"]
claims = st.lists(st.builds(Lock, st.sampled_from(PATHS), st.sampled_from(MODES)), max_size=4)


def _parts(path: str) -> tuple[str, ...]:
    return tuple(part for part in path.split("/") if part not in ("", "."))


def oracle_conflict(mine: Lock, theirs: Lock) -> bool:
    """Written apart from the implementation: component lists, one a prefix of the other; one side writes."""
    a, b = _parts(mine.path), _parts(theirs.path)
    overlap = a[: len(b)] == b or b[: len(a)] == a
    return overlap and (mine.mode != "read" or theirs.mode != "read")


class LockMachine(RuleBasedStateMachine):
    """Tasks claim, are denied, wait, are woken and release, in any order; the invariants hold at every step."""

    @initialize()
    def start(self) -> None:
        self.table = EMPTY
        self.history: list[LockEvent] = []
        self.claim_of: dict[str, tuple[Lock, ...]] = {}  # the last claim each task made
        self.queue: list[str] = []  # the model's FIFO of waiting tasks
        self.named: dict[str, set[str]] = {}  # the tasks each waiting task's last NO GO named

    def _record(self, event: LockEvent) -> None:
        self.history.append(event)
        self.table = evolve(self.table, event)

    def _expected_conflicts(self, task: str, claim: tuple[Lock, ...]) -> set[tuple[str, str, bool]]:
        """(holder, holder_path, queued) for every lock in the way, by brute force over the model."""
        expected = set()
        for holder, held in self.table.holders.items():
            for mine in claim:
                for theirs in held:
                    if holder != task and oracle_conflict(mine, theirs):
                        expected.add((holder, theirs.path, False))
        keeps_place = task in self.queue and set(claim) <= set(self.claim_of[task])
        ahead = self.queue[: self.queue.index(task)] if keeps_place else [t for t in self.queue if t != task]
        for waiter in ahead:
            for mine in claim:
                for theirs in self.claim_of[waiter]:
                    if oracle_conflict(mine, theirs):
                        expected.add((waiter, theirs.path, True))
        return expected

    def _claim(self, task: str, claim: tuple[Lock, ...]) -> None:
        decision = arbitrate(self.table, task, claim)
        canonical = locks.canonical(claim)
        expected = self._expected_conflicts(task, canonical)
        if isinstance(decision, Granted):
            # GO only when nothing is in the way: neither a holder nor a claim queued first (no barging).
            assert expected == set(), expected
            assert decision.locks == canonical
            self._record(ClaimGranted(task, decision.locks))
            if task in self.queue:
                self.queue.remove(task)
        else:
            assert {(c.holder, c.holder_path, c.queued) for c in decision.conflicts} == expected
            assert expected
            self._record(ClaimDenied(task, decision.locks, decision.conflicts))
            self.named[task] = set(decision.holders)
            if task in self.queue and not set(canonical) <= set(self.claim_of[task]):
                self.queue.remove(task)  # asking for more than it waited with: a new claim, at the back
            if task not in self.queue:
                self.queue.append(task)
        self.claim_of[task] = canonical

    @rule(task=st.sampled_from(TASKS), claim=claims)
    def claim(self, task: str, claim: list[Lock]) -> None:
        """A task that holds nothing claims (a new task, or a waiting one re-asked with a fresh claim)."""
        if task in self.table.holders:
            with pytest.raises(ValueError):
                arbitrate(self.table, task, claim)
            return
        self._claim(task, tuple(claim))

    @precondition(lambda self: locks.wakeable(self.table))
    @rule(data=st.data())
    def wake(self, data: st.DataObject) -> None:
        """A waiting task the table says is wakeable is re-arbitrated with its recorded claim and gets GO."""
        task = data.draw(st.sampled_from(locks.wakeable(self.table)))
        self._claim(task, self.claim_of[task])
        assert task in self.table.holders

    @precondition(lambda self: self.table.holders or self.table.waiting)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        """A holder ends (or a waiting task is killed) and releases whatever it has."""
        task = data.draw(st.sampled_from(sorted({*self.table.holders, *self.table.waiting})))
        before = set(locks.wakeable(self.table))
        self._record(LocksReleased(task))
        # Only the tasks whose NO GO named the releaser can have become wakeable: the daemon need check no other.
        named = [waiter for waiter in self.table.waiting if task in self.named[waiter]]
        assert set(locks.wakeable(self.table)) - before <= set(named)
        assert locks.wakeable(self.table, named) == [w for w in locks.wakeable(self.table) if w in named]
        if task in self.queue:
            self.queue.remove(task)

    @invariant()
    def no_two_conflicting_locks_are_held(self) -> None:
        held = [(task, lock) for task, task_locks in self.table.holders.items() for lock in task_locks]
        for i, (task, lock) in enumerate(held):
            for other, other_lock in held[i + 1 :]:
                assert task == other or not oracle_conflict(lock, other_lock), (task, lock, other, other_lock)

    @invariant()
    def each_task_holds_all_of_its_claim_or_nothing(self) -> None:
        for task in TASKS:
            held = self.table.held_by(task)
            assert held == () or held == self.claim_of[task]
            assert not (held and task in self.table.waiting), "a holder never waits"

    @invariant()
    def the_queue_is_fifo(self) -> None:
        assert list(self.table.waiting) == self.queue

    @invariant()
    def waits_for_graph_is_acyclic_and_ends_at_holders(self) -> None:
        graph = locks.waits_for(self.table)
        woken = set(locks.wakeable(self.table))
        assert list(graph) == self.queue
        for task, blockers in graph.items():
            assert (not blockers) == (task in woken)
            assert set(blockers) <= self.named[task], "a task in the way that its NO GO did not name"
            for blocker in blockers:
                # An edge points to a holder (which waits for nothing) or to a task queued earlier.
                assert blocker in self.table.holders or self.queue.index(blocker) < self.queue.index(task)
        # Acyclic, checked directly: peel off the tasks that wait for no waiting task until none is left.
        remaining = {task: {b for b in blockers if b in graph} for task, blockers in graph.items()}
        while remaining:
            free = [task for task, blockers in remaining.items() if not blockers]
            assert free, f"waits-for cycle among {sorted(remaining)}"
            for task in free:
                del remaining[task]
            for blockers in remaining.values():
                blockers.difference_update(free)
        # So every chain of waiting ends at a holder, or at a task that can go now.
        for task, blockers in graph.items():
            assert blockers or task in woken

    @invariant()
    def wakeable_means_go(self) -> None:
        for task in self.table.waiting:
            decision = arbitrate(self.table, task, self.claim_of[task])
            assert isinstance(decision, Granted) == (task in locks.wakeable(self.table))

    @invariant()
    def the_table_is_a_fold_of_its_events(self) -> None:
        assert fold(msgspec.json.encode(self.history)) == self.table
        assert_indexes_match(self.table)

    def teardown(self) -> None:
        """Liveness: let every holder finish; every waiting task must then run, without a stuck round."""
        if not hasattr(self, "table"):
            return
        must_run = set(self.table.waiting)
        ran: set[str] = set()
        for _ in range(4 * len(TASKS)):  # each round grants a waiter or releases a holder: bounded
            if not self.table.waiting:
                break
            woken = locks.wakeable(self.table)
            if woken:
                for task in woken:  # all of them, in FIFO order: the docstring promises this succeeds
                    self._claim(task, self.claim_of[task])
                    assert task in self.table.holders
                    ran.add(task)
            else:
                assert self.table.holders, f"nobody holds a lock, yet {self.table.waiting} wait: starvation"
                self._record(LocksReleased(next(iter(self.table.holders))))
        assert not self.table.waiting, f"still waiting after the drain: {self.table.waiting}"
        assert must_run <= ran


TestLockMachine = pytest.mark.slow(LockMachine.TestCase)
TestLockMachine.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
