"""Hostile agents against Numerus's git: a real daemon, scripted executors that try to escape through git.

Each task of one planned job tries one attack. What must hold, with or without the sandbox that makes a worktree's
`.git` read-only for agents (so each attack is caught by the gate or by git isolation, not only by the sandbox):
the user's repository (its hooks, its config, its branch, its files) is byte-identical after the job; no command
an agent planted for git to run (a hook, `core.fsmonitor`) ever ran; and every task whose work escaped the
repository did not merge, its `ClaimViolated` naming the path and the job saying why.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, claim, git, git_repo
from tests.test_hostile_sandbox import command_outputs

pytestmark = pytest.mark.slow  # real daemons run planned jobs end to end

#: One planned task per attack: its id, the file it may create, the steps of its scripted executor.
HOOKS = ("post-merge", "reference-transaction", "post-checkout", "pre-commit", "post-commit", "post-rewrite")


def attacks(pwned: Path) -> dict[str, tuple[str, list[dict]]]:
    """Each attack by task id: the path its plan claims, and its executor's steps. `pwned` appears if any
    command an agent planted for git ever runs."""
    hook = f"#!/bin/sh\\ntouch {pwned}\\n"
    config = f'[core]\\n\\tfsmonitor = "touch {pwned}"\\n'
    plant_hooks = " ; ".join(
        f'printf \'{hook}\' > "$common/hooks/{name}" ; chmod +x "$common/hooks/{name}"' for name in HOOKS
    )
    return {
        # Writes through `..` out of its worktree (the sandbox refuses the write; without it the report names it).
        "up": ("up.md", [{"write": "up.md", "content": "up\n"}, {"write": "../../x", "content": "escaped\n"}]),
        # Reports a write to an absolute path: the gate hears the report even when nothing was written.
        "abs": (
            "abs.md",
            [
                {"write": "abs.md", "content": "abs\n"},
                {
                    "event": {
                        "type": "item.completed",
                        "item": {
                            "id": "item_99",
                            "type": "file_change",
                            "changes": [{"path": "/etc/shadow", "kind": "update"}],
                            "status": "completed",
                        },
                    }
                },
            ],
        ),
        # A symlink out of the repository, committed as one: its target is read from the tree.
        "link": ("s2.txt", [{"run": "ln -s /etc/passwd s2.txt"}]),
        # An embedded repository: committed as a gitlink (a submodule entry).
        "sub": (
            "sub/",
            [{"run": "git init -q sub && git -C sub -c user.name=a -c user.email=a@b.x commit -qm x --allow-empty"}],
        ),
        # A `.git` directory that is no repository, with a command in its config: git never commits it.
        "nested": (
            "vendor/",
            [
                {"write": "vendor/lib.txt", "content": "lib\n"},
                {"run": f"mkdir -p vendor/.git && printf '{config}' > vendor/.git/config"},
            ],
        ),
        # Hooks planted in the repository the worktree's `.git` file names (its common directory): the work itself
        # is fine and merges; the hooks must never run, and never reach the user's repository.
        "hooks": (
            "hooks.md",
            [
                {"run": f'd=$(sed -n "s/^gitdir: //p" .git) && common="$d/$(cat "$d/commondir")" && {plant_hooks}'},
                {"write": "hooks.md", "content": "hooks\n"},
            ],
        ),
        # The worktree's `.git` replaced by a repository whose config runs a command on every scan of the tree.
        "fsmon": (
            "fsmon.md",
            [
                {
                    "run": f"rm -f .git && git init -q . && git config core.fsmonitor 'touch {pwned}' && "
                    f"mkdir -p .git/hooks && printf '{hook}' > .git/hooks/post-commit && chmod +x .git/hooks/*"
                },
                {"write": "fsmon.md", "content": "fsmon\n"},
            ],
        ),
    }


#: What each escaping task's `ClaimViolated` must name, when its attack got as far as the worktree.
NAMED = {
    "up": "../../x",
    "abs": "/etc/shadow",
    "link": "s2.txt",
    "sub": "sub",
    "nested": "vendor/.git",
    "fsmon": ".git",
}


def user_state(repo: Path) -> dict[str, bytes]:
    """Everything of the user's repository an agent must not change: `.git`'s config, hooks, HEAD and index, the
    branch `main`, and the files of the working tree."""
    dot_git = repo / ".git"
    state = {name: (dot_git / name).read_bytes() for name in ("config", "HEAD", "index")}
    state["main"] = git(repo, "rev-parse", "refs/heads/main").encode()
    for path in sorted(dot_git.joinpath("hooks").rglob("*")):
        state[str(path.relative_to(repo))] = path.read_bytes() if path.is_file() else b"<dir>"
    for path in sorted(repo.rglob("*")):
        if ".git" not in path.relative_to(repo).parts:
            state[str(path.relative_to(repo))] = path.read_bytes() if path.is_file() else b"<dir>"
    return state


@pytest.mark.parametrize("sandbox", ["bwrap", "none"])
async def test_agents_cannot_poison_git_and_the_gate_names_every_escape(tmp_path: Path, sandbox: str) -> None:
    """Two lines of defence, each tried alone where it can be: with the sandbox most attacks fail in the agent;
    without it (a profile that says `sandbox = "none"`), the gate and the mirror must catch every one."""
    pwned = tmp_path / f"pwned-{os.getuid()}"
    planned = attacks(pwned)
    plan = {
        "summary": "attacks",
        "tasks": [
            {"id": task, "title": task, "instructions": task, "intents": [{"path": path, "mode": "create"}]}
            for task, (path, _steps) in planned.items()
        ],
    }
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            *({"match": {"role": "executor", "task": task}, "steps": steps} for task, (_p, steps) in planned.items()),
        ]
    }
    config = 'review = false\nclaims = "plan"\nmax_attempts = 1\nmax_replans = 0\n'
    profiles = {"team": f'sandbox = "{sandbox}"'}
    with Daemon(tmp_path / "state", agents={"team": team}, config=config, profiles=profiles).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        before = user_state(repo)
        result = daemon.ctl("run", "attacks", "--repo", str(repo), "--agent", "team", "--parallel", "4", "--wait")
        job = result.stdout.splitlines()[0].strip()
        view = daemon.status(job)
        events = daemon.events(job)
        assert daemon.ctl("audit", "verify", job).returncode == 0

    statuses = {task["id"]: task for task in view["tasks"]}
    assert set(statuses) == set(planned), view
    named, harmless = set(), {"hooks"}
    for task, path in NAMED.items():
        violated = [e["data"]["violations"] for e in events if e["type"] == "ClaimViolated" and e["task"] == task]
        if violated:  # the attack reached the worktree (without a sandbox): the gate named it, and the job says so
            (violations,) = violated
            assert statuses[task]["status"] != "completed", (task, statuses[task])
            assert any(v.startswith(f"{path}: ") for v in violations), (task, violations)
            assert path in statuses[task]["reason"], statuses[task]
            named.add(task)
            continue
        # Else the sandbox refused the attack in the agent: the agent failed, or the command that attacked did,
        # and what it did do (its own file) is harmless work that may merge.
        (exited,) = [e for e in events if e["type"] == "TaskExited" and e["task"] == task]
        if statuses[task]["status"] == "completed":
            ran = command_outputs(Path(exited["data"]["log_path"]))
            assert any(code != 0 for code, _ in ran.values()), (task, ran)
            harmless.add(task)
    if sandbox == "none":
        assert named == set(NAMED), named
    # Harmless work merges, planted hooks and all: they live in Numerus's mirror, where git never runs them.
    assert statuses["hooks"]["status"] == "completed", statuses["hooks"]
    assert git(repo, "show", f"numerus/{job}.integration:hooks.md") == "hooks\n"
    merged = git(repo, "ls-tree", "-r", "--name-only", f"numerus/{job}.integration").split()
    assert sorted(merged) == sorted(["README.md", *(planned[task][0] for task in harmless)])

    # An escaping task's work stays in Numerus's mirror: its branch in the user's repository, if any, holds none of it.
    for task in named:
        branch = f"refs/heads/numerus/{job}/{task}"
        if git(repo, "for-each-ref", branch).strip():
            assert git(repo, "ls-tree", "-r", "--name-only", branch).split() == ["README.md"], task

    assert not pwned.exists(), "a command an agent planted for git ran"
    after = user_state(repo)
    assert after == before
    # Only the job's branches were added to the user's repository, as fetched refs.
    branches = git(repo, "for-each-ref", "--format=%(refname)", "refs/heads").split()
    assert set(branches) - {"refs/heads/main"} <= {f"refs/heads/numerus/{job}.integration"} | {
        f"refs/heads/numerus/{job}/{task}" for task in planned
    }
    assert git(repo, "worktree", "list", "--porcelain").count("worktree ") == 1


async def test_a_command_the_claim_did_not_list_fails_the_task_when_the_profile_says_so(tmp_path: Path) -> None:
    plan = {"summary": "one", "tasks": [{"id": "t1", "title": "t1", "instructions": "t1", "intents": []}]}
    answer = claim(("t1.md", "create"))
    answer["commands"] = ["echo ok"]
    steps = [{"run": "echo ok"}, {"run": "echo ok && id"}, {"write": "t1.md", "content": "t1\n"}]
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {"match": {"role": "claimer"}, "steps": [{"answer": answer}]},
            {"match": {"role": "executor"}, "steps": steps},
        ]
    }
    daemon = Daemon(tmp_path / "state", agents={"team": team})
    scenarios = daemon.scenarios_dir
    scenario = json.dumps(str(scenarios / "scenario-team.json"))
    # The same scripted agent, as a profile that holds the commands it runs to its claim.
    daemon.config = (
        "review = false\nmax_attempts = 1\nmax_replans = 0\n"
        f'[agents.strict]\nkind = "scripted"\ncommands = "claimed"\nenv = {{ NUMERUS_SCENARIO = {scenario} }}\n'
        f"binds = [{json.dumps(str(scenarios))}]\n"
    )
    with daemon.start():
        repo = git_repo(tmp_path / "repo")
        lax = daemon.ctl("run", "lax", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        assert lax.returncode == 0, lax.stdout + lax.stderr
        strict = daemon.ctl("run", "strict", "--repo", str(repo), "--agent", "strict", "--wait", timeout=90)
        assert strict.returncode == 1, strict.stdout + strict.stderr
        job = strict.stdout.splitlines()[0].strip()
        (task,) = daemon.status(job)["tasks"]
        events = daemon.events(job)
    assert task["status"] == "failed"
    (violated,) = [e["data"]["violations"] for e in events if e["type"] == "ClaimViolated"]
    assert violated == ["echo ok && id: the command `id` was run, which the claim does not list"]
    assert "the command `id` was run" in task["reason"]
