"""numerusd.git against the real git binary, in throwaway repositories: worktrees, real diffs, merges."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from numerusd import git
from numerusd.checkouts import Checkouts
from numerusd.git import (
    BaseNotAncestor,
    BranchCheckedOut,
    Change,
    Conflict,
    Done,
    GitError,
    Merged,
    Moved,
    NotStarted,
    RefMoved,
    Worktree,
)

JOB = "01JTESTJOB0000000000000000"
_ENV = {
    "PATH": os.environ.get("PATH", os.defpath),
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "LC_ALL": "C",
}


def run_git(cwd: Path, *args: str) -> str:
    """git as a user would run it, independent of the code under test."""
    done = subprocess.run(
        ["git", "-c", "user.name=User", "-c", "user.email=user@example.org", *args],
        cwd=cwd,
        env=_ENV,
        capture_output=True,
        check=True,
    )
    return done.stdout.decode().strip()


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def commit(cwd: Path, message: str) -> str:
    run_git(cwd, "add", "--all")
    run_git(cwd, "commit", "-q", "-m", message)
    return run_git(cwd, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The user's repository: branch main, a few files, one commit, and some uncommitted work of the user's."""
    root = tmp_path / "repo"
    root.mkdir()
    run_git(root, "init", "-q", "-b", "main")
    write(root / "src" / "a.py", "one\ntwo\nthree\n")
    write(root / "src" / "b.py", "alpha\nbeta\n")
    write(root / "README.md", "# project\n")
    write(
        root / "docs" / "old.md", "".join(f"line {i} of a document long enough to be recognised\n" for i in range(20))
    )
    write(root / ".gitignore", "*.log\n")
    commit(root, "base")
    # The user keeps working while Numerus runs: staged, unstaged and untracked changes of their own.
    write(root / "README.md", "# project, edited by the user\n")
    write(root / "notes.txt", "the user's untracked notes\n")
    write(root / "src" / "b.py", "alpha\nbeta\ngamma\n")
    run_git(root, "add", "src/b.py")
    return root


def snapshot(repo: Path) -> dict[str, bytes]:
    """Everything of the user's checkout: HEAD, the index, the current branch's tip and every file."""
    state = {
        ".git/HEAD": (repo / ".git" / "HEAD").read_bytes(),
        ".git/index": (repo / ".git" / "index").read_bytes(),
        "main": run_git(repo, "rev-parse", "refs/heads/main").encode(),
    }
    for path in sorted(repo.rglob("*")):
        if ".git" not in path.relative_to(repo).parts and path.is_file():
            state[str(path.relative_to(repo))] = path.read_bytes()
    return state


def worktree_path(repo: Path, task: str) -> Path:
    return repo.parent / "state" / "runs" / JOB / task / "worktree"


async def start_task(repo: Path, task: str, base: str | None = None) -> Worktree:
    base = base or git.integration_branch(JOB)
    return await git.create_worktree(repo, JOB, task, base, worktree_path(repo, task))


def changes_set(changes: list[Change]) -> set[tuple[str, str, str | None]]:
    return {(c.path, c.kind, c.old_path) for c in changes}


async def test_check_git() -> None:
    assert await git.check_git() >= (2, 38)


# --- names and the integration branch ----------------------------------------------------------------------


def test_branch_names_cannot_collide() -> None:
    assert git.integration_branch(JOB) == f"numerus/{JOB}.integration"
    assert git.task_branch(JOB, "t1") == f"numerus/{JOB}/t1"
    with pytest.raises(GitError):
        git.task_branch(JOB, "../main")
    with pytest.raises(GitError):
        git.integration_branch("a b")


async def test_integration_branch_from_head_is_idempotent(repo: Path) -> None:
    before = snapshot(repo)
    head = run_git(repo, "rev-parse", "HEAD")
    branch = await git.create_integration_branch(repo, JOB)
    assert branch == git.Branch(git.integration_branch(JOB), head)
    assert run_git(repo, "rev-parse", f"refs/heads/{branch.name}") == head
    # Again, as after a crash: same answer, nothing moves.
    assert await git.create_integration_branch(repo, JOB, head) == branch
    # Merges have moved it since: the recorded start is in its history, so it is accepted as it is.
    wt = await start_task(repo, "t1")
    write(wt.path / "src" / "new.py", "x\n")
    await git.commit_work(wt, "t1")
    merged = await git.merge_task(repo, branch.name, wt.branch, "merge t1")
    assert await git.create_integration_branch(repo, JOB, head) == branch
    assert run_git(repo, "rev-parse", f"refs/heads/{branch.name}") == merged.sha
    # A start that is not in its history is somebody else's branch: refused, left alone.
    stray = run_git(repo, "commit-tree", "-m", "stray", "HEAD^{tree}")
    with pytest.raises(GitError, match="does not contain"):
        await git.create_integration_branch(repo, JOB, stray)
    assert snapshot(repo) == before


async def test_resolve_errors_name_the_revision(repo: Path) -> None:
    with pytest.raises(GitError, match="no-such-branch"):
        await git.resolve(repo, "no-such-branch")
    with pytest.raises(GitError):
        await git.resolve(repo, "--output=/tmp/x")


async def test_uncommitted_lists_staged_unstaged_and_untracked_changes_but_not_ignored_files(repo: Path) -> None:
    write(repo / "build.log", "ignored\n")
    write(repo / "new dir" / "ünïcode.md", "in an untracked directory\n")
    (repo / "docs" / "old.md").unlink()
    before = snapshot(repo)
    assert sorted(await git.uncommitted(repo)) == ["README.md", "docs/old.md", "new dir/", "notes.txt", "src/b.py"]
    assert snapshot(repo) == before  # only looked
    run_git(repo, "add", "--all")
    run_git(repo, "commit", "-q", "-m", "the user's work")
    assert await git.uncommitted(repo) == []


async def test_a_directory_inside_a_repository_is_not_taken_for_it(repo: Path) -> None:
    # git would otherwise walk up from src/ and act on the repository around it.
    with pytest.raises(GitError, match="not a git repository"):
        await git.resolve(repo / "src", "HEAD")
    with pytest.raises(GitError):
        await git.commit_work(Worktree(repo / "src", "main", run_git(repo, "rev-parse", "HEAD")), "x")


# --- worktrees ---------------------------------------------------------------------------------------------


async def test_create_worktree_then_reuse_it(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    before = snapshot(repo)
    wt = await start_task(repo, "t1")
    assert wt == Worktree(worktree_path(repo, "t1"), f"numerus/{JOB}/t1", integration.sha)
    assert (wt.path / "src" / "a.py").read_text() == "one\ntwo\nthree\n"
    assert run_git(wt.path, "symbolic-ref", "HEAD") == f"refs/heads/numerus/{JOB}/t1"
    # The user's uncommitted work stays theirs: the worktree starts from the commit.
    assert (wt.path / "README.md").read_text() == "# project\n"
    assert not (wt.path / "notes.txt").exists()

    write(wt.path / "work.txt", "in progress\n")
    run_git(wt.path, "commit", "-q", "--allow-empty", "-m", "agent commit")
    again = await start_task(repo, "t1", integration.sha)
    assert again == wt
    assert (wt.path / "work.txt").read_text() == "in progress\n"
    assert snapshot(repo) == before


async def test_many_worktrees_created_and_removed_at_once_in_one_repository(repo: Path) -> None:
    # Concurrent `git worktree` commands in one repository race (a `list` reads a half-written entry of an
    # `add`: "failed to read .git/worktrees/t17/commondir"); a job starts many tasks at once.
    import asyncio

    integration = await git.create_integration_branch(repo, JOB)
    tasks = [f"t{n}" for n in range(24)]
    made = await asyncio.gather(*(start_task(repo, task, integration.sha) for task in tasks))
    assert [wt.branch for wt in made] == [f"numerus/{JOB}/{task}" for task in tasks]
    assert all((wt.path / "README.md").exists() for wt in made)
    await asyncio.gather(*(git.remove_worktree(repo, wt) for wt in made))
    assert not any(wt.path.exists() for wt in made)
    assert len(run_git(repo, "worktree", "list").splitlines()) == 1  # only the main checkout


async def test_create_worktree_repairs_an_interrupted_checkout(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    # What a crash in the middle of `git worktree add` leaves: still locked "initializing", files missing.
    admin = Path(run_git(wt.path, "rev-parse", "--absolute-git-dir"))
    (admin / "locked").write_text("initializing")
    (wt.path / "src" / "a.py").unlink()
    again = await start_task(repo, "t1", wt.base_sha)
    assert again == wt
    assert (wt.path / "src" / "a.py").read_text() == "one\ntwo\nthree\n"
    listing = run_git(repo, "worktree", "list", "--porcelain")
    assert listing.count(str(wt.path)) == 1
    assert "locked" not in listing


async def test_create_worktree_checks_out_a_worktree_registered_but_never_filled(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    # What a crash between the registration and the checkout leaves: a worktree with no index and no files.
    branch = git.task_branch(JOB, "t1")
    run_git(repo, "branch", branch, integration.sha)
    run_git(repo, "worktree", "add", "--quiet", "--no-checkout", str(worktree_path(repo, "t1")), branch)
    assert not (worktree_path(repo, "t1") / "src").exists()
    wt = await start_task(repo, "t1")
    assert (wt.path / "src" / "a.py").read_text() == "one\ntwo\nthree\n"
    assert run_git(wt.path, "status", "--porcelain") == ""
    # Once filled it is reused as it is: the agent's work stays.
    (wt.path / "src" / "a.py").unlink()
    assert await start_task(repo, "t1") == wt
    assert not (wt.path / "src" / "a.py").exists()


async def test_create_worktree_repairs_a_vanished_directory(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    shutil.rmtree(wt.path)
    again = await start_task(repo, "t1", wt.base_sha)
    assert again == wt
    assert (wt.path / "src" / "a.py").exists()
    assert run_git(repo, "worktree", "list", "--porcelain").count(str(wt.path)) == 1


async def test_create_worktree_for_a_branch_left_without_one(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    run_git(repo, "branch", git.task_branch(JOB, "t1"), integration.sha)
    wt = await start_task(repo, "t1")
    assert (wt.path / "src" / "a.py").exists()


async def test_create_worktree_refuses_what_is_not_its_own(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    stranger = worktree_path(repo, "t1")
    write(stranger / "precious.txt", "not Numerus's\n")
    with pytest.raises(GitError, match="not empty"):
        await start_task(repo, "t1")
    assert (stranger / "precious.txt").read_text() == "not Numerus's\n"
    # A task branch that does not contain the base is not adopted either.
    stray = run_git(repo, "commit-tree", "-m", "stray", "HEAD^{tree}")
    run_git(repo, "branch", git.task_branch(JOB, "t2"), stray)
    with pytest.raises(GitError, match="does not contain"):
        await start_task(repo, "t2", integration.sha)
    assert not worktree_path(repo, "t2").exists()


async def test_remove_worktree(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    write(wt.path / "uncommitted.txt", "x\n")
    await git.remove_worktree(repo, wt)
    assert not wt.path.exists()
    assert str(wt.path) not in run_git(repo, "worktree", "list", "--porcelain")
    assert run_git(repo, "rev-parse", "--verify", f"refs/heads/{wt.branch}")
    await git.remove_worktree(repo, wt)  # again: nothing to do
    await git.remove_worktree(repo, wt, delete_branch=True)
    assert f"numerus/{JOB}/t1" not in run_git(repo, "branch", "--list")
    # A fresh start for a retry.
    again = await start_task(repo, "t1")
    assert not (again.path / "uncommitted.txt").exists()


# --- read-only checkouts ----------------------------------------------------------------------------------


def files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".git"
    }


async def test_a_checkout_holds_the_commit_not_the_working_tree_and_replaces_what_a_crash_left(repo: Path) -> None:
    before = snapshot(repo)
    head = run_git(repo, "rev-parse", "HEAD")
    path = repo.parent / "state" / "checkouts" / head
    assert await git.create_checkout(repo, head, path) == path
    assert files(path)["README.md"] == "# project\n" and "notes.txt" not in files(path)
    # Left by a crash: scribbled on, then its directory gone while git still has it registered.
    write(path / "scribble.txt", "x\n")
    await git.create_checkout(repo, head, path)
    assert "scribble.txt" not in files(path)
    shutil.rmtree(path)
    await git.create_checkout(repo, head, path)
    assert files(path)["src/a.py"] == "one\ntwo\nthree\n"
    await git.remove_checkout(repo, path)
    await git.remove_checkout(repo, path)  # again: nothing to do
    assert not path.exists() and str(path) not in run_git(repo, "worktree", "list", "--porcelain")
    assert snapshot(repo) == before


async def test_checkouts_are_shared_at_one_commit_moved_when_unread_and_removed_once_superseded(repo: Path) -> None:
    first = run_git(repo, "rev-parse", "HEAD")
    second = commit(repo, "the user's work")
    root = repo.parent / "state" / "job.checkouts"
    (root / "left-by-a-crash").mkdir(parents=True)
    checkouts = Checkouts(repo, root)
    await checkouts.clear()
    assert not root.exists()  # what a crash left, and the directory, made again when asked for
    async with checkouts.at(first) as one, checkouts.at(first) as same:
        assert one == same and "notes.txt" not in files(one)
        async with checkouts.at(second) as newer:
            assert files(newer)["notes.txt"] == "the user's untracked notes\n"
        assert one.exists() and newer.exists()  # `one` is read; `newer` is the newest asked for
    assert not one.exists() and newer.exists()
    async with checkouts.at(second) as again:
        assert again == newer
    # The checkout nobody reads is moved to the next commit asked for, not made again.
    async with checkouts.at(first) as moved:
        assert moved == newer and "notes.txt" not in files(moved) and len(list(root.iterdir())) == 1
    await checkouts.clear()
    assert not root.exists() and str(root) not in run_git(repo, "worktree", "list", "--porcelain")


# --- the real diff -----------------------------------------------------------------------------------------


async def test_commit_work_sees_committed_staged_unstaged_untracked_deleted_renamed(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    write(wt.path / "src" / "a.py", "one\nTWO\nthree\n")
    run_git(wt.path, "commit", "-q", "-am", "the agent commits one change")  # committed
    write(wt.path / "src" / "staged.py", "staged\n")
    run_git(wt.path, "add", "src/staged.py")  # staged, never committed
    write(wt.path / "src" / "b.py", "alpha\nBETA\n")  # unstaged
    write(wt.path / "src" / "pkg" / "untracked.py", "new\n")  # untracked, in a new directory
    (wt.path / "README.md").unlink()  # deleted
    (wt.path / "docs" / "old.md").rename(wt.path / "docs" / "new.md")  # renamed, git never told
    write(wt.path / "build.log", "ignored by .gitignore\n")

    work = await git.commit_work(wt, "t1")
    assert changes_set(list(work.changes)) == {
        ("src/a.py", "modify", None),
        ("src/staged.py", "add", None),
        ("src/b.py", "modify", None),
        ("src/pkg/untracked.py", "add", None),
        ("README.md", "delete", None),
        ("docs/new.md", "rename", "docs/old.md"),
    }
    # The commit holds every one of them, and what the repository ignores stays out of it.
    files = run_git(wt.path, "ls-tree", "-r", "--name-only", work.commit).splitlines()
    assert {"src/staged.py", "src/pkg/untracked.py", "docs/new.md"} <= set(files)
    assert not {"README.md", "docs/old.md", "build.log"} & set(files)
    assert run_git(wt.path, "status", "--porcelain") == ""


async def test_commit_work_sees_a_shell_command_edit(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    assert await git.commit_work(wt, "nothing yet") == git.Work(integration.sha, ())
    script = "sed -i 's/two/2/' src/a.py && printf 'x\\n' > 'with space.txt' && rm src/b.py && mkdir -p d && touch d/e"
    subprocess.run(["sh", "-c", script], cwd=wt.path, check=True)
    assert changes_set(list((await git.commit_work(wt, "t1")).changes)) == {
        ("src/a.py", "modify", None),
        ("with space.txt", "add", None),
        ("src/b.py", "delete", None),
        ("d/e", "add", None),
    }


async def test_commit_work_refuses_a_branch_that_left_its_base(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    write(wt.path / "x.txt", "x\n")
    rewritten = Worktree(wt.path, wt.branch, commit(wt.path, "x"))
    run_git(wt.path, "reset", "-q", "--hard", integration.sha)
    write(wt.path / "y.txt", "y\n")
    with pytest.raises(BaseNotAncestor):
        await git.commit_work(rewritten, "t1")
    assert run_git(wt.path, "rev-parse", "HEAD") == integration.sha


async def test_commit_work_keeps_the_agents_commits_and_lists_the_real_diff(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    write(wt.path / "src" / "a.py", "one\nTWO\nthree\n")
    agent_commit = commit(wt.path, "agent")
    write(wt.path / "src" / "b.py", "changed after\n")
    write(wt.path / "fresh.txt", "new\n")
    write(wt.path / "debug.log", "ignored\n")

    work = await git.commit_work(wt, "t1: the task's work\n\nwith a body", author=("Codex", "codex@example.org"))
    assert changes_set(list(work.changes)) == {
        ("src/a.py", "modify", None),
        ("src/b.py", "modify", None),
        ("fresh.txt", "add", None),
    }
    assert run_git(wt.path, "rev-parse", "HEAD") == work.commit
    assert run_git(wt.path, "rev-parse", "HEAD^") == agent_commit
    assert run_git(wt.path, "log", "-1", "--format=%an <%ae>|%cn|%B", work.commit) == (
        "Codex <codex@example.org>|Numerus|t1: the task's work\n\nwith a body"
    )
    assert run_git(wt.path, "status", "--porcelain") == ""
    assert "debug.log" not in run_git(wt.path, "ls-files")
    # Nothing left to commit: the same tip and the same diff, so a repeat after a crash is harmless.
    assert await git.commit_work(wt, "again") == work


async def test_commit_work_of_nothing_is_the_base(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    write(wt.path / "debug.log", "ignored\n")
    assert await git.commit_work(wt, "t1") == git.Work(integration.sha, ())
    assert run_git(wt.path, "rev-parse", "HEAD") == integration.sha


async def test_commit_work_refuses_a_detached_head(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    run_git(wt.path, "checkout", "-q", "--detach")
    write(wt.path / "x.txt", "x\n")
    with pytest.raises(GitError, match="detached"):
        await git.commit_work(wt, "t1")


# --- merging -----------------------------------------------------------------------------------------------


async def finished_task(repo: Path, task: str, edits: dict[str, str], base: str | None = None) -> Worktree:
    wt = await start_task(repo, task, base)
    for path, text in edits.items():
        write(wt.path / path, text)
    await git.commit_work(wt, f"{task}: work")
    return wt


async def test_two_tasks_merge_in_order_without_touching_the_user(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    before = snapshot(repo)
    t1 = await finished_task(repo, "t1", {"src/a.py": "one\nTWO\nthree\n"})
    t2 = await finished_task(repo, "t2", {"src/c.py": "new\n"})
    t1_sha, t2_sha = (run_git(repo, "rev-parse", f"refs/heads/{t.branch}") for t in (t1, t2))

    first = await git.merge_task(repo, integration.name, t1.branch, "Merge t1")
    assert first == Merged(sha=first.sha, parent=integration.sha, task_sha=t1_sha)
    second = await git.merge_task(repo, integration.name, t2.branch, "Merge t2", expected_integration=first.sha)
    assert isinstance(second, Merged)
    assert second.parent == first.sha

    tip = f"refs/heads/{integration.name}"
    assert run_git(repo, "rev-parse", tip) == second.sha
    assert run_git(repo, "show", f"{tip}:src/a.py") == "one\nTWO\nthree"
    assert run_git(repo, "show", f"{tip}:src/c.py") == "new"
    assert run_git(repo, "rev-list", "--first-parent", "--parents", f"{integration.sha}..{tip}").splitlines() == [
        f"{second.sha} {first.sha} {t2_sha}",
        f"{first.sha} {integration.sha} {t1_sha}",
    ]
    assert run_git(repo, "log", "-1", "--format=%s|%cn", tip) == "Merge t2|Numerus"
    assert snapshot(repo) == before


async def test_conflict_changes_nothing(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    t1 = await finished_task(repo, "t1", {"src/a.py": "one\nTWO by t1\nthree\n"})
    t2 = await finished_task(repo, "t2", {"src/a.py": "one\ntwo by t2\nthree\n", "src/other.py": "fine\n"})
    first = await git.merge_task(repo, integration.name, t1.branch, "Merge t1")
    assert isinstance(first, Merged)
    before = snapshot(repo)
    refs_before = run_git(repo, "for-each-ref")

    result = await git.merge_task(repo, integration.name, t2.branch, "Merge t2")
    assert isinstance(result, Conflict)
    assert result.paths == ("src/a.py",)
    assert result.parent == first.sha
    assert any("src/a.py" in m for m in result.messages)
    assert run_git(repo, "for-each-ref") == refs_before
    assert snapshot(repo) == before
    assert run_git(repo, "symbolic-ref", "HEAD") == "refs/heads/main"
    # Deterministic: asking again after a crash gives the same answer.
    assert await git.merge_task(repo, integration.name, t2.branch, "Merge t2") == result


async def test_modify_delete_conflict_names_the_file(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    t1 = await start_task(repo, "t1")
    (t1.path / "src" / "b.py").unlink()
    await git.commit_work(t1, "t1")
    t2 = await finished_task(repo, "t2", {"src/b.py": "alpha\nchanged\n"})
    assert isinstance(await git.merge_task(repo, integration.name, t1.branch, "Merge t1"), Merged)
    result = await git.merge_task(repo, integration.name, t2.branch, "Merge t2")
    assert isinstance(result, Conflict)
    assert result.paths == ("src/b.py",)


async def test_merge_refuses_a_moved_or_checked_out_branch(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    t1 = await finished_task(repo, "t1", {"src/c.py": "c\n"})
    tip = f"refs/heads/{integration.name}"
    # Somebody moved the branch after the merge was decided.
    run_git(repo, "update-ref", tip, run_git(repo, "commit-tree", "-p", integration.sha, "-m", "x", "HEAD^{tree}"))
    moved = run_git(repo, "rev-parse", tip)
    with pytest.raises(RefMoved) as raised:
        await git.merge_task(repo, integration.name, t1.branch, "Merge t1", expected_integration=integration.sha)
    assert raised.value.fields["actual"] == moved
    assert run_git(repo, "rev-parse", tip) == moved
    # A checkout of the integration branch (here the user's second worktree) would go stale under its owner.
    run_git(repo, "worktree", "add", "-q", str(repo.parent / "look"), integration.name)
    with pytest.raises(BranchCheckedOut):
        await git.merge_task(repo, integration.name, t1.branch, "Merge t1")
    assert run_git(repo, "rev-parse", tip) == moved


async def test_nothing_to_merge(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    t1 = await start_task(repo, "t1")
    assert (await git.commit_work(t1, "nothing")).commit == integration.sha
    result = await git.merge_task(repo, integration.name, t1.branch, "Merge t1")
    assert result == Merged(sha=integration.sha, parent=integration.sha, task_sha=integration.sha, created=False)
    assert await git.merge_state(repo, integration.name, integration.sha, integration.sha) == Done(integration.sha)


async def test_merge_state_tells_a_crash_after_the_ref_moved(repo: Path) -> None:
    integration = await git.create_integration_branch(repo, JOB)
    t1 = await finished_task(repo, "t1", {"src/c.py": "c\n"})
    t2 = await finished_task(repo, "t2", {"src/d.py": "d\n"})
    # The intent, as MergeStarted would record it.
    parent = await git.resolve(repo, integration.name)
    task_sha = await git.resolve(repo, t1.branch)
    assert await git.merge_state(repo, integration.name, parent, task_sha) == NotStarted()

    # The ref moves, then the daemon dies before TaskMerged is appended: the result is lost.
    await git.merge_task(repo, integration.name, t1.branch, "Merge t1", expected_integration=parent, task_sha=task_sha)
    tip = run_git(repo, "rev-parse", f"refs/heads/{integration.name}")
    state = await git.merge_state(repo, integration.name, parent, task_sha)
    assert state == Done(tip)
    # On restart the daemon records the outcome instead of merging again; a blind second merge would be refused.
    with pytest.raises(RefMoved):
        await git.merge_task(
            repo, integration.name, t1.branch, "Merge t1", expected_integration=parent, task_sha=task_sha
        )

    # Later merges on top do not hide it.
    later = await git.merge_task(repo, integration.name, t2.branch, "Merge t2")
    assert isinstance(later, Merged)
    assert await git.merge_state(repo, integration.name, parent, task_sha) == Done(tip)
    # A branch moved some other way is neither.
    other = run_git(repo, "commit-tree", "-p", integration.sha, "-m", "foreign", f"{integration.sha}^{{tree}}")
    run_git(repo, "update-ref", f"refs/heads/{integration.name}", other)
    assert await git.merge_state(repo, integration.name, parent, task_sha) == Moved(other)


async def test_git_errors_carry_the_command_and_stderr(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    with pytest.raises(GitError) as raised:
        await git.merge_task(repo, git.integration_branch(JOB), "numerus/nope", "m")
    assert "nope" in raised.value.message
    with pytest.raises(GitError) as raised:
        await git.remove_worktree(repo / "missing", Worktree(repo / "w", "b", "0" * 40))
    assert "not a directory" in raised.value.message


async def test_remove_a_half_deleted_worktree(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    (wt.path / ".git").unlink()  # what an interrupted removal, or a careless agent, leaves
    await git.remove_worktree(repo, wt)
    assert not wt.path.exists()
    assert str(wt.path) not in run_git(repo, "worktree", "list", "--porcelain")
    assert (await start_task(repo, "t1")).path == wt.path


# --- the mirror Numerus owns, and what an agent can plant in its worktree -------------------------------------


def hooks_and_config(repo: Path) -> dict[str, bytes]:
    """The user's `.git/config` and every hook file: what an agent must never change."""
    dot_git = repo / ".git"
    found = {"config": (dot_git / "config").read_bytes()}
    for path in sorted((dot_git / "hooks").rglob("*")) if (dot_git / "hooks").is_dir() else ():
        found[str(path.relative_to(dot_git))] = path.read_bytes()
    return found


async def test_the_mirror_is_a_copy_without_hooks_that_fetches_the_base_and_publishes_only_fast_forwards(
    repo: Path, tmp_path: Path
) -> None:
    write(repo / ".git" / "hooks" / "post-merge", "#!/bin/sh\ntouch hooked\n")
    before = hooks_and_config(repo)
    mirror = git.mirror_path(tmp_path / "state" / "repos", repo)
    assert mirror.parent == tmp_path / "state" / "repos" and mirror.name.startswith("repo-")
    base = await git.prepare_mirror(repo, mirror, "HEAD")
    assert base == run_git(repo, "rev-parse", "HEAD")
    # Its own files: no hook copied, no object file shared with the user's repository.
    assert not (mirror / "hooks").exists()
    user_objects = {os.stat(p).st_ino for p in (repo / ".git" / "objects").rglob("*") if p.is_file()}
    assert not user_objects & {os.stat(p).st_ino for p in (mirror / "objects").rglob("*") if p.is_file()}
    # A commit made since is fetched when a job starts from it; a second call changes nothing.
    newer = commit(repo, "the user's next commit")
    assert await git.prepare_mirror(repo, mirror, newer) == newer
    assert run_git(mirror, "cat-file", "-t", newer) == "commit"
    assert await git.prepare_mirror(repo, mirror, newer) == newer

    # The job's branches reach the user as fetched refs; one the mirror lost is deleted there too.
    integration = await git.create_integration_branch(mirror, JOB, newer)
    task = git.task_branch(JOB, "t1")
    run_git(mirror, "branch", task, newer)
    await git.publish(mirror, repo, integration.name, task)
    assert run_git(repo, "rev-parse", integration.name) == run_git(repo, "rev-parse", task) == newer
    run_git(mirror, "branch", "-D", task)
    await git.publish(mirror, repo, task)
    assert run_git(repo, "branch", "--list", task) == ""
    # A branch the user committed on is theirs: never overwritten, and a merge checks it first.
    mine = run_git(repo, "commit-tree", "-p", newer, "-m", "the user's own", f"{newer}^{{tree}}")
    run_git(repo, "update-ref", f"refs/heads/{integration.name}", mine)
    other = run_git(mirror, "commit-tree", "-p", newer, "-m", "numerus", f"{newer}^{{tree}}")
    run_git(mirror, "update-ref", f"refs/heads/{integration.name}", other)
    with pytest.raises(GitError):
        await git.publish(mirror, repo, integration.name)
    assert run_git(repo, "rev-parse", integration.name) == mine
    with pytest.raises(RefMoved):
        await git.check_published(repo, mirror, integration.name, other)
    # Behind the mirror (a publication refused earlier) is no move; a checkout of it blocks the merge.
    run_git(repo, "update-ref", f"refs/heads/{integration.name}", newer)
    await git.check_published(repo, mirror, integration.name, other)
    run_git(repo, "worktree", "add", "-q", str(tmp_path / "look"), integration.name)
    with pytest.raises(BranchCheckedOut):
        await git.check_published(repo, mirror, integration.name, other)
    assert hooks_and_config(repo) == before


async def test_a_planted_dot_git_is_a_change_never_a_repository_git_trusts(repo: Path, tmp_path: Path) -> None:
    mirror = git.mirror_path(tmp_path / "state" / "repos", repo)
    await git.prepare_mirror(repo, mirror, "HEAD")
    await git.create_integration_branch(mirror, JOB)
    wt = await start_task(mirror, "t1")
    assert wt.git_dir is not None and wt.git_dir.parent == mirror / "worktrees"
    # The agent replaces its worktree's `.git` file by a repository whose config runs a command on any status.
    pwned = tmp_path / "pwned"
    (wt.path / ".git").unlink()
    run_git(tmp_path, "init", "-q", str(wt.path / "planted"))
    (wt.path / "planted" / ".git").rename(wt.path / ".git")
    (wt.path / "planted").rmdir()
    with (wt.path / ".git" / "config").open("a") as config:
        config.write(f'[core]\n\tfsmonitor = "touch {pwned}"\n')
    write(wt.path / ".git" / "hooks" / "post-commit", f"#!/bin/sh\ntouch {pwned}\n")
    (wt.path / ".git" / "hooks" / "post-commit").chmod(0o755)
    write(wt.path / "src" / "a.py", "changed\n")
    # And a `.git` directory that is no repository, deeper down: git skips it, the gate must still hear of it.
    write(wt.path / "vendor" / ".git" / "config", f'[core]\n\tfsmonitor = "touch {pwned}"\n')

    work = await git.commit_work(wt, "t1")
    assert not pwned.exists()
    assert changes_set(list(work.changes)) == {
        ("src/a.py", "modify", None),
        (".git", "modify", None),
        ("vendor/.git", "add", None),
    }
    # The work went onto the task's branch in the mirror, not into the planted repository.
    assert run_git(mirror, "show", f"{wt.branch}:src/a.py") == "changed"
    assert not pwned.exists()


async def test_commit_work_reads_modes_and_symlink_targets_from_the_tree(repo: Path) -> None:
    await git.create_integration_branch(repo, JOB)
    wt = await start_task(repo, "t1")
    (wt.path / "s2.txt").symlink_to("/etc/passwd")
    (wt.path / "src" / "up").symlink_to("../README.md")
    run_git(wt.path, "init", "-q", "embedded")
    run_git(wt.path / "embedded", "commit", "-q", "--allow-empty", "-m", "inside")

    work = await git.commit_work(wt, "t1")
    found = {change.path: (change.mode, change.target) for change in work.changes}
    assert found == {
        "s2.txt": ("120000", "/etc/passwd"),
        "src/up": ("120000", "../README.md"),
        "embedded": ("160000", None),
        "embedded/.git": ("", None),  # the repository behind the gitlink, which git never commits
    }
