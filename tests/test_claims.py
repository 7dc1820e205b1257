"""numerusd.claims: whether a task's real diff stays within its claim (the first step of the quality gate)."""

from __future__ import annotations

import pytest

from numerusd.claims import outside_claim
from numerusd.git import Change
from numerusd.protocol.claims import ClaimedPath, PathKind, PathMode


@pytest.mark.parametrize(
    ("change", "claims", "violates"),
    [
        (Change("src/a.py", "modify"), [("src/a.py", "file", "modify")], False),
        (Change("src/a.py", "modify"), [("./src//a.py", "file", "modify")], False),
        (Change("src/a.py", "modify"), [("src/a.py", "file", "create")], True),
        (Change("src/a.py", "add"), [("src/a.py", "file", "create")], False),
        (Change("src/a.py", "add"), [("src/a.py", "file", "modify")], True),
        (Change("src/a.py", "delete"), [("src/a.py", "file", "delete")], False),
        (Change("src/a.py", "delete"), [("src/a.py", "file", "modify")], True),
        (Change("src/a.py", "modify"), [("src/b.py", "file", "modify")], True),
        (Change("src/a.py", "modify"), [("src", "dir", "modify")], False),
        (Change("src/a.py", "modify"), [("src/", "dir", "modify")], False),
        (Change("src/pkg/new.py", "add"), [("src", "dir", "modify")], False),
        (Change("src/pkg/new.py", "add"), [("src", "dir", "create")], False),
        (Change("src/a.py", "modify"), [("src", "dir", "create")], True),
        (Change("src/a.py", "delete"), [("src", "dir", "modify")], True),
        (Change("src/a.py", "delete"), [("src", "dir", "delete")], False),
        (Change("srcx/a.py", "modify"), [("src", "dir", "modify")], True),
        (Change("src", "add"), [("src", "file", "create")], False),
        (Change("src/a.py", "add"), [("src", "file", "create")], True),
        (Change("anything/at/all.py", "add"), [(".", "dir", "modify")], False),
        (Change("src/a.py", "modify"), [("src/a.py", "file", "create"), ("src", "dir", "modify")], False),
        (Change("docs/new.md", "rename", "docs/old.md"), [("docs", "dir", "modify")], True),
        (
            Change("docs/new.md", "rename", "docs/old.md"),
            [("docs/old.md", "file", "delete"), ("docs/new.md", "file", "create")],
            False,
        ),
        (Change("docs/new.md", "rename", "docs/old.md"), [("docs/new.md", "file", "create")], True),
        (Change("x.py", "modify"), [], True),
        (Change("src/a.py", "modify"), [("src", "dir", "read")], True),
        (Change("src/a.py", "modify"), [("./", "dir", "modify")], False),
    ],
)
def test_outside_claim(change: Change, claims: list[tuple[str, PathKind, PathMode]], violates: bool) -> None:
    assert bool(outside_claim([change], [ClaimedPath(*claim) for claim in claims])) is violates


def test_outside_claim_says_why() -> None:
    changes = [
        Change("src/a.py", "modify"),
        Change("tools/run.sh", "add"),
        Change("docs/new.md", "rename", "docs/old.md"),
        Change("src/b.py", "delete"),
    ]
    claims = [
        ClaimedPath("src/a.py", "file", "modify"),
        ClaimedPath("docs/new.md", "file", "create"),
        ClaimedPath("src", "dir", "modify"),
    ]
    violations = outside_claim(changes, claims)
    assert [(v.path, v.reason) for v in violations] == [
        ("tools/run.sh", "created, but no claim covers it"),
        ("docs/old.md", "renamed docs/old.md -> docs/new.md: deleted, but no claim covers it"),
        ("src/b.py", "deleted, but directory src is claimed for modify"),
    ]
    assert violations[1].change == changes[2]


def test_outside_claim_reads_the_protocols_claimed_paths() -> None:
    changes = [Change("src/a.py", "modify"), Change("src/z.py", "add")]
    claims = [ClaimedPath("src/a.py", "file", "modify"), ClaimedPath("src/z.py", "file", "read")]
    assert [(v.path, v.reason) for v in outside_claim(changes, claims)] == [
        ("src/z.py", "created, but it is claimed for read")
    ]
