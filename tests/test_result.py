"""The result, reviewed and taken: `numerusctl diff`, `accept` and `discard` on jobs a real daemon ran.

The real numerusd and numerusctl, a real nats-server and git; the agents are the scripted fake `codex exec`,
writing known files. The user's repositories carry hooks that must never run, and a bare repository stands for
the remote `accept --push` pushes to (never the network).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

import pytest

from numerusd.git import mirror_path
from tests.daemon_harness import Daemon, claim, git, git_repo

pytestmark = pytest.mark.slow  # real daemons run planned jobs

CONFIG = "max_attempts = 1\nreview = false\n"


def team(*files: tuple[str, dict]) -> dict:
    """A planned job of one task per (file, executor step): each claims its file and takes its step."""
    tasks = [{"id": f"t{n}", "title": name, "instructions": f"write {name}", "intents": []} for n, (name, _) in
             enumerate(files, 1)]  # fmt: skip
    cases: list[dict] = [{"match": {"role": "planner"}, "steps": [{"answer": {"summary": "files", "tasks": tasks}}]}]
    for n, (name, step) in enumerate(files, 1):
        cases.append({"match": {"role": "claimer", "task": f"t{n}"}, "steps": [{"answer": claim((name, "create"))}]})
        cases.append({"match": {"role": "executor", "task": f"t{n}"}, "steps": [step]})
    return {"cases": cases}


#: Two tasks, two known files.
PAIR = team(("a.txt", {"write": "a.txt", "content": "alpha\n"}), ("b.txt", {"write": "b.txt", "content": "beta\n"}))
#: The pair (b.txt holding terminal escapes) and a file of about 6 MB, more than a reply holds (half the embedded
#: server's max_payload of 8 MiB).
BIG = team(
    ("a.txt", {"write": "a.txt", "content": "alpha\n"}),
    ("b.txt", {"write": "b.txt", "content": "beta\x1b]0;pwned\x07\x1b[2J\n"}),  # retitle, clear the screen
    ("big.txt", {"run": "seq 1 800000 > big.txt"}),
)
#: t1 merges, t2 fails for good: the job fails with t1's work on its integration branch.
HALF = team(("a.txt", {"write": "a.txt", "content": "alpha\n"}), ("b.txt", {"exit": 1}))
SLOW = [{"say": "working"}, {"run": "sleep 300"}]

HOOKS = ("post-merge", "reference-transaction", "pre-push", "post-checkout")


def plant_hooks(repo: Path, markers: Path) -> None:
    """Hooks in the user's repository that would leave a marker if git ran them."""
    for hook in HOOKS:
        path = repo / ".git" / "hooks" / hook
        path.write_text(f"#!/bin/sh\ntouch {markers}/{hook}\n")
        path.chmod(0o755)


def commit(repo: Path, message: str, **files: str) -> str:
    for name, text in files.items():
        (repo / name).write_text(text)
    git(repo, "add", *files)
    git(repo, "-c", "user.name=u", "-c", "user.email=u@example.invalid", "commit", "-qm", message)
    return git(repo, "rev-parse", "HEAD").strip()


def ref(repo: Path, name: str) -> str | None:
    found = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "-q", "--verify", name], capture_output=True, text=True
    )
    return found.stdout.strip() or None


def submit(daemon: Daemon, repo: Path, agent: str) -> str:
    return daemon.ctl("run", "files", "--repo", str(repo), "--agent", agent, check=True).stdout.split()[0]


async def ended(daemon: Daemon, *jobs: str) -> None:
    async with daemon.client() as client:
        await asyncio.gather(
            *(client.wait_for(job, lambda v: v["status"] in ("completed", "failed"), timeout=120) for job in jobs)
        )


async def test_diff_shows_the_result_and_each_tasks_work_cut_with_a_mark_when_too_large(tmp_path: Path):
    with Daemon(tmp_path / "state", agents={"pair": PAIR, "big": BIG}, config=CONFIG).start() as daemon:
        small, large = git_repo(tmp_path / "small"), git_repo(tmp_path / "large")
        job, big = submit(daemon, small, "pair"), submit(daemon, large, "big")
        await ended(daemon, job, big)
        assert daemon.status(job)["status"] == "completed"
        base = daemon.status(job)["base_sha"]

        shown = daemon.ctl("diff", job, check=True).stdout  # not a terminal: no colour
        assert "diff --git a/a.txt b/a.txt" in shown and "+alpha" in shown and "+beta" in shown
        assert "\x1b[" not in shown and "numerus: diff cut" not in shown
        # The same diff git gives in the user's repository, where the integration branch is published.
        assert shown == git(small, "diff", f"{base}..numerus/{job}.integration")
        # A task's work: its merge's changes only; by a unique end of the job's id, and by `last`.
        task = daemon.ctl("diff", job[-6:], "t1", check=True).stdout
        assert "+alpha" in task and "b.txt" not in task
        stat = daemon.ctl("diff", job, "--stat", check=True).stdout
        assert "a.txt | 1 +" in stat and "2 files changed, 2 insertions(+)" in stat
        coloured = daemon.ctl("diff", job, "--color", "always", check=True).stdout
        assert "\x1b[32m+alpha\x1b[m" in coloured and "\x1b[1mdiff --git a/a.txt b/a.txt\x1b[m" in coloured
        assert "\x1b[" not in daemon.ctl("diff", job, "--color", "never", check=True).stdout
        assert " a.txt | 1 \x1b[32m+\x1b[m" in daemon.ctl("diff", job, "--stat", "--color=always", check=True).stdout
        # Reading is a viewer's right.
        assert daemon.ctl("--role", "viewer", "diff", job, check=True).stdout == shown

        # About 6.7 MB of diff: cut at a line's end, and the last line says so and how to see it all.
        cut = daemon.ctl("diff", "last", check=True).stdout
        assert len(cut.encode()) < 4.1 * 1024 * 1024
        *lines, mark = cut.rstrip("\n").split("\n")
        assert "+alpha" in cut and lines[-1].startswith("+")
        # What the agents wrote cannot drive the terminal: escapes are shown, not sent.
        assert "+beta\\x1b]0;pwned\\x07\\x1b[2J\n" in cut and "\x1b" not in cut
        # Asked for the patch itself (a file, `git apply`): its bytes as git has them.
        assert daemon.ctl("diff", job, "--raw", check=True).stdout == shown  # plain text: the same
        assert "+beta\x1b]0;pwned\x07\x1b[2J\n" in daemon.ctl("diff", "last", "--raw", check=True).stdout
        big_base = daemon.status(big)["base_sha"][:12]
        assert mark.startswith("[numerus: diff cut after ") and mark.endswith(
            f"see it whole in the repository: git -C {large} diff {big_base}..numerus/{big}.integration]"
        )
        reply = json.loads(daemon.ctl("--json", "diff", big, check=True).stdout)
        assert reply["shown"] < reply["size"] and reply["size"] > 6_000_000

        missing = daemon.ctl("diff", job, "t9")
        assert missing.returncode == 1 and f"job {job} has no task 't9'" in missing.stderr
        assert daemon.alive


async def test_accept_fast_forwards_a_clean_checkout_else_takes_a_branch_and_never_touches_uncommitted_work(
    tmp_path: Path,
):
    markers = tmp_path / "markers"
    markers.mkdir()
    with Daemon(tmp_path / "state", agents={"pair": PAIR}, config=CONFIG).start() as daemon:
        repos = {name: git_repo(tmp_path / name) for name in ("clean", "dirty", "moved", "diverged", "detached")}
        for repo in repos.values():
            plant_hooks(repo, markers)
        jobs = {name: submit(daemon, repo, "pair") for name, repo in repos.items()}
        await ended(daemon, *jobs.values())
        tips = {name: git(repo, "rev-parse", f"numerus/{jobs[name]}.integration").strip() for name, repo in
                repos.items()}  # fmt: skip
        assert list(markers.iterdir()) == []  # the branches were fetched into the repositories, hooks off
        # What the users did meanwhile (their own git commands run their hooks: those markers are theirs).
        remote = tmp_path / "remote.git"
        subprocess.run(["git", "init", "-q", "--bare", str(remote)], check=True)
        git(repos["clean"], "remote", "add", "origin", str(remote))
        (repos["clean"] / "README.md").write_text("my notes\n")  # uncommitted, in a file the result leaves alone
        (repos["dirty"] / "a.txt").write_text("mine\n")  # untracked, where the result writes a.txt
        moved = commit(repos["moved"], "more work", **{"c.txt": "c\n"})
        git(repos["diverged"], "checkout", "-qb", "feature")
        feature = commit(repos["diverged"], "feature work", **{"f.txt": "f\n"})
        git(repos["detached"], "checkout", "-q", "--detach")
        for marker in markers.iterdir():
            marker.unlink()

        # Clean: main is fast-forwarded and the checkout's files follow; the uncommitted README stays; pushed.
        clean, job = repos["clean"], jobs["clean"]
        taken = daemon.ctl("accept", job, "--push", "origin")
        assert taken.returncode == 0, taken.stderr
        assert taken.stdout.splitlines()[0].startswith(f"job {job}: result main fast-forwarded to {tips['clean'][:7]}")
        assert f"the checkout at {clean} was updated with it" in taken.stdout
        assert "pushed main to origin" in taken.stdout
        assert ref(clean, "main") == tips["clean"] and ref(remote, "main") == tips["clean"]
        assert (clean / "a.txt").read_text() == "alpha\n" and (clean / "README.md").read_text() == "my notes\n"
        assert git(clean, "status", "--porcelain").split("\n")[0] == " M README.md"
        [event] = [e for e in daemon.events(job) if e["type"] == "JobAccepted"]
        assert event["data"]["branch"] == "main" and event["data"]["how"] == "fast-forward"
        assert event["data"]["sha"] == tips["clean"] and event["data"]["pushed"] == "origin"
        assert event["data"]["by"].endswith("(operator)")
        detail = daemon.ctl("status", job, check=True).stdout
        assert f"accepted main fast-forwarded to {tips['clean'][:7]}, pushed to origin, by " in detail
        assert daemon.status(job)["status"] == "completed"

        # Dirty: the result would overwrite the user's a.txt: refused, naming it, nothing changed.
        dirty, job = repos["dirty"], jobs["dirty"]
        base = ref(dirty, "main")
        refused = daemon.ctl("accept", job)
        assert refused.returncode == 1
        assert f"main is checked out in {dirty} with uncommitted changes to files the result changes: a.txt" in (
            refused.stderr
        )
        assert "Nothing was changed" in refused.stderr and "--branch" in refused.stderr
        assert ref(dirty, "main") == base and (dirty / "a.txt").read_text() == "mine\n"
        assert not any(e["type"] == "JobAccepted" for e in daemon.events(job))
        # ... or on a branch of its own, with --branch: the checkout is left alone.
        taken = daemon.ctl("accept", job, "--branch", "review/numerus", check=True)
        assert taken.stdout.startswith(f"job {job}: result on branch review/numerus at {tips['dirty'][:7]}")
        assert ref(dirty, "review/numerus") == tips["dirty"] and ref(dirty, "main") == base
        assert (dirty / "a.txt").read_text() == "mine\n"

        # Moved: main has a commit the result does not: it goes on numerus/<job>.accepted; main stays.
        job = jobs["moved"]
        taken = daemon.ctl("accept", job, check=True)
        own = f"numerus/{job}.accepted"
        assert taken.stdout.startswith(f"job {job}: result on branch {own} at {tips['moved'][:7]}")
        assert "not on your branch: main is at" in taken.stdout and f"git merge {own}" in taken.stdout
        assert ref(repos["moved"], "main") == moved and ref(repos["moved"], own) == tips["moved"]
        assert daemon.status(job)["accepted"]["how"] == "branch"

        # Diverged: the user is on another branch with its own commit: likewise; and --branch naming it is refused.
        diverged, job = repos["diverged"], jobs["diverged"]
        refused = daemon.ctl("accept", job, "--branch", "feature")
        assert (
            refused.returncode == 1
            and "which the result" in refused.stderr
            and "Nothing was changed" in (refused.stderr)
        )
        taken = daemon.ctl("accept", job, check=True)
        assert f"on branch numerus/{job}.accepted" in taken.stdout
        assert ref(diverged, "feature") == feature and not (diverged / "a.txt").exists()

        # Detached HEAD: the branch the job started from moves (it is not checked out: no file changes).
        detached, job = repos["detached"], jobs["detached"]
        taken = daemon.ctl("accept", job, check=True)
        assert taken.stdout.startswith(f"job {job}: result main fast-forwarded to {tips['detached'][:7]}")
        assert ref(detached, "main") == tips["detached"] and not (detached / "a.txt").exists()

        # No hook of the user's ran, in all of it (fetches, a fast-forward, a push).
        assert sorted(p.name for p in markers.iterdir()) == []
        for job in jobs.values():
            assert daemon.ctl("audit", "verify", job, "--finished").returncode == 0


async def test_discard_a_partial_accept_and_the_hostile_side(tmp_path: Path):
    markers = tmp_path / "markers"
    markers.mkdir()
    with Daemon(tmp_path / "state", agents={"pair": PAIR, "half": HALF, "slow": SLOW}, config=CONFIG).start() as daemon:
        repo, other = git_repo(tmp_path / "repo"), git_repo(tmp_path / "other")
        plant_hooks(repo, markers)
        job, half = submit(daemon, repo, "pair"), submit(daemon, other, "half")
        await ended(daemon, job, half)
        tip = ref(repo, f"numerus/{job}.integration")

        # A viewer may look, not take.
        for verb in ("accept", "discard"):
            viewer = daemon.ctl("--role", "viewer", verb, job)
            assert viewer.returncode == 1
            assert f"not allowed: the viewer role may not publish on numerus.cmd.{verb}" in viewer.stderr
        assert ref(repo, "main") != tip and ref(repo, f"numerus/{job}.integration") == tip

        # Branch names that are options, escape, or name what is not a branch of the user's; remotes that are not.
        for name, why in (
            ("-f", "cannot be empty or start with '-'"),
            ("../x", "git does not take it as a branch name"),
            ("refs/heads/main", "name the branch by its short name"),
            (f"numerus/{job}.integration", "a branch Numerus keeps for a job"),
            ("a b", "git does not take it as a branch name"),
        ):
            refused = daemon.ctl("accept", job, f"--branch={name}")
            assert refused.returncode == 1, name
            assert why in refused.stderr and "Nothing was changed" in refused.stderr, refused.stderr
        pwned = tmp_path / "pwned"
        for remote in (f"ext::sh -c touch% {pwned}", "-f", str(tmp_path)):
            refused = daemon.ctl("accept", job, f"--push={remote}")
            assert refused.returncode == 1 and "is not a remote of" in refused.stderr, refused.stderr
        assert ref(repo, "main") != tip and not ref(repo, f"numerus/{job}.accepted")
        # A remote the repository names whose URL runs a command: the ext transport is refused anyway.
        git(repo, "remote", "add", "evil", f"ext::sh -c touch% {pwned}")
        pushed = daemon.ctl("accept", job, "--push", "evil")
        assert pushed.returncode == 1 and "the push to evil failed" in pushed.stderr
        assert ref(repo, "main") == tip and not pwned.exists()
        assert daemon.status(job)["accepted"]["pushed"] == ""

        # A failed job holds only what merged: taken only when asked for with --partial.
        refused = daemon.ctl("accept", half)
        assert refused.returncode == 1
        assert f"job {half} is failed: its integration branch holds the work of t1 only" in refused.stderr
        assert f"'numerusctl accept {half} --partial' takes that" in refused.stderr
        taken = daemon.ctl("accept", half, "--partial", check=True)
        assert "main fast-forwarded" in taken.stdout and (other / "a.txt").read_text() == "alpha\n"

        # Discard: the job's branches go from the mirror and the user's repository; main, accepted, stays.
        mirror = mirror_path(daemon.state_dir / "repos", other)
        assert ref(other, f"numerus/{half}/t2") and ref(mirror, f"numerus/{half}.integration")
        discarded = daemon.ctl("discard", half[-5:], check=True)
        assert discarded.stdout.startswith(f"job {half}: discarded; removed 1 worktree, 2 branches (")
        for where in (other, mirror):
            assert git(where, "for-each-ref", "--format=%(refname:short)", "refs/heads/numerus/") == ""
        assert not (daemon.state_dir / "worktrees" / half).exists()
        assert ref(other, "main") == daemon.status(half)["accepted"]["sha"]
        [event] = [e for e in daemon.events(half) if e["type"] == "JobDiscarded"]
        assert event["data"]["branches"] == [f"numerus/{half}/t2", f"numerus/{half}.integration"]
        assert event["data"]["by"].endswith("(operator)")
        assert "removed with its worktrees ('numerusctl discard')" in daemon.ctl("status", half, check=True).stdout
        for verb in ("diff", "accept"):
            gone = daemon.ctl(verb, half)
            assert gone.returncode == 1 and "was discarded" in gone.stderr
        assert daemon.ctl("audit", "verify", half, "--finished").returncode == 0

        # A job that has not ended is neither accepted nor discarded.
        slow = daemon.ctl("run", "wait", "--repo", str(repo), "--agent", "slow", "--no-plan", check=True)
        busy = slow.stdout.split()[0]
        for verb in ("accept", "discard"):
            refused = daemon.ctl(verb, busy)
            assert refused.returncode == 1 and "Nothing was" in refused.stderr, refused.stderr
        assert sorted(p.name for p in markers.iterdir()) == []
        assert daemon.alive
