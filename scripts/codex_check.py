"""make codex-check: a planned job run by the real `codex exec`, with a scripted model instead of OpenAI's.

It starts the fake model (tests/fake_model.py) on 127.0.0.1, a real numerusd on a fresh state directory whose
`codex` profile runs the installed Codex CLI against that model (its own CODEX_HOME, no API key), and a job like
tests/test_pipeline.py's: a plan of four tasks, t1 and t2 independent, t3 claiming the file t1 creates (NO GO until
t1 is merged), t4 depending on t2 and retried once after a failing check; executors that run shell commands and
apply patches through codex's own tools, and a reviewer that passes. It prints what happened and exits 0 only when
the job completed with every change on its integration branch, and what codex printed was read as the daemon
expects (threads, commands, file changes, tokens, answers).

Codex is `--codex PATH`, else `$CODEX_BIN`, else `codex` on PATH; nothing is downloaded. Not part of `make test`:
CI has no codex. Exit status: 0 all good, 1 a check failed, 2 no codex or the run could not start.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

# The check lives beside the tests and uses their harness and fake model; it runs from a checkout, not an install.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.daemon_harness import Daemon, git_repo  # noqa: E402
from tests.fake_model import FakeModel, codex_args  # noqa: E402

GOAL = "Greet, take notes, sign the greeting and index the notes"

PLAN = {
    "summary": "Greet, take notes, sign the greeting, index the notes",
    "tasks": [
        {
            "id": "t1",
            "title": "Greeting",
            "instructions": "Create HELLO.md with a greeting.",
            "role": "executor",
            "deps": [],
            "intents": [{"path": "HELLO.md", "mode": "create"}],
        },
        {
            "id": "t2",
            "title": "Notes",
            "instructions": "Create NOTES.md.",
            "role": "executor",
            "deps": [],
            "intents": [{"path": "NOTES.md", "mode": "create"}],
        },
        {
            "id": "t3",
            "title": "Sign the greeting",
            "instructions": "Append a signature to HELLO.md.",
            "role": "executor",
            "deps": [],
            "intents": [{"path": "HELLO.md", "mode": "modify"}],
        },
        {
            "id": "t4",
            "title": "Index the notes",
            "instructions": "Create INDEX.md listing NOTES.md.",
            "role": "executor",
            "deps": ["t2"],
            "intents": [{"path": "INDEX.md", "mode": "create"}],
        },
    ],
}


def claim(path: str, mode: str, *commands: str) -> dict:
    return {"paths": [{"path": path, "kind": "file", "mode": mode}], "commands": list(commands)}


def add_file(path: str, *lines: str) -> str:
    return "\n".join(["*** Begin Patch", f"*** Add File: {path}", *(f"+{line}" for line in lines), "*** End Patch"])


SCENARIO = {
    "description": "make codex-check: every role of a planned job, through the real codex exec",
    "cases": [
        {"match": {"role": "planner"}, "responses": [{"answer": PLAN}]},
        {"match": {"role": "claimer", "task": "t1"}, "responses": [{"answer": claim("HELLO.md", "create")}]},
        {
            "match": {"role": "claimer", "task": "t2"},
            "responses": [{"answer": claim("NOTES.md", "create", "printf 'notes\\n' > NOTES.md")}],
        },
        # t3 claims the file t1 creates, a little after t1 did, while t1 still holds it: NO GO naming t1.
        {
            "match": {"role": "claimer", "task": "t3"},
            "responses": [{"answer": claim("HELLO.md", "modify"), "delay": 2}],
        },
        {
            "match": {"role": "claimer", "task": "t4"},
            "responses": [{"answer": claim("INDEX.md", "create", "cat NOTES.md")}],
        },
        # t1 takes its time, so that it still holds HELLO.md when t3 asks for it.
        {
            "match": {"role": "executor", "task": "t1"},
            "responses": [
                {"run": "git status --short", "delay": 4},
                {"patch": add_file("HELLO.md", "# Hello")},
                {"say": "Added HELLO.md."},
            ],
        },
        {
            "match": {"role": "executor", "task": "t2"},
            "responses": [{"run": "printf 'notes\\n' > NOTES.md"}, {"say": "Wrote NOTES.md."}],
        },
        {
            "match": {"role": "executor", "task": "t3"},
            "responses": [
                {"patch": "*** Begin Patch\n*** Update File: HELLO.md\n@@\n # Hello\n+-- signed\n*** End Patch"},
                {"say": "Signed HELLO.md."},
            ],
        },
        # t4 leaves a TODO the configured check refuses; its second attempt, told why, fixes it in the same worktree.
        {
            "match": {"role": "executor", "task": "t4", "attempt": 1},
            "responses": [
                {"run": "cat NOTES.md"},
                {"patch": add_file("INDEX.md", "- NOTES.md TODO")},
                {"say": "Indexed the notes."},
            ],
        },
        {
            "match": {"role": "executor", "task": "t4"},
            "responses": [{"run": "printf -- '- NOTES.md\\n' > INDEX.md"}, {"say": "Removed the TODO."}],
        },
        {
            "match": {"role": "reviewer"},
            "responses": [
                {"run": "git diff --stat HEAD~1"},
                {"answer": {"verdict": "pass", "reasons": ["{task}: does what was asked, nothing else"]}},
            ],
        },
    ],
}

#: What the integration branch must hold when the job is done.
EXPECTED_FILES = {"HELLO.md": "# Hello\n-- signed\n", "NOTES.md": "notes\n", "INDEX.md": "- NOTES.md\n"}


def find_codex(given: str | None) -> str | None:
    """The codex program: `--codex`, else $CODEX_BIN, else `codex` on PATH."""
    candidate = given or os.environ.get("CODEX_BIN") or "codex"
    return shutil.which(candidate)


def config_toml(
    codex: str, base_url: str, codex_home: Path, model: str | None, agent_sandbox: str | None = None
) -> str:
    """numerus.toml: a `codex` profile on the real CLI and the fake model, and the job's settings."""

    def toml(value: object) -> str:
        return json.dumps(value)  # a JSON string or list of strings is TOML as well

    return "\n".join(
        [
            'default_agent = "codex"',
            "parallel = 4",
            "backoff_s = [0.5]",
            "idle_timeout_s = 120",
            "task_timeout_s = 300",
            f"checks = {toml(['! grep -rq TODO --include=*.md .'])}",
            "",
            "[agents.codex]",
            f"binary = {toml(codex)}",
            *([f"model = {toml(model)}"] if model else []),
            *([f"agent_sandbox = {toml(agent_sandbox)}"] if agent_sandbox else []),
            f"args = {toml(codex_args(base_url))}",
            f"env = {{ CODEX_HOME = {toml(str(codex_home))} }}",
        ]
    )


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False).stdout


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def show(result: subprocess.CompletedProcess[str]) -> None:
    print((result.stdout + result.stderr).rstrip())


def by_type(events: list[dict], kind: str, task: str | None = None) -> list[dict]:
    return [e for e in events if e["type"] == kind and (task is None or e.get("task") == task)]


def judge(
    daemon: Daemon, job: str, repo: Path, events: list[dict], fake: FakeModel, main_before: str
) -> list[tuple[bool, str]]:
    """Every check, as (passed, what)."""
    checks: list[tuple[bool, str]] = []
    view = daemon.status(job)
    statuses = {task["id"]: task["status"] for task in view["tasks"]}
    checks.append((view["status"] == "completed", f"the job completed (status {view['status']})"))
    checks.append(
        (statuses == dict.fromkeys(("t1", "t2", "t3", "t4"), "completed"), f"every task completed {statuses}")
    )
    branch = view.get("integration") or f"numerus/{job}.integration"
    for path, content in EXPECTED_FILES.items():
        found = git(repo, "show", f"{branch}:{path}")
        checks.append((found == content, f"{branch} has {path} = {content!r} (found {found!r})"))
    untouched = sorted(p.name for p in repo.iterdir() if p.name != ".git") == ["README.md"]
    checks.append((untouched and git(repo, "rev-parse", "main") == main_before, "the user's branch and tree untouched"))

    denied = by_type(events, "ClaimDenied", "t3")
    granted, merged = by_type(events, "ClaimGranted", "t3"), by_type(events, "TaskMerged", "t1")
    checks.append((bool(denied) and denied[0]["data"].get("holders") == ["t1"], "t3 got NO GO naming t1"))
    # Events come in the order the stream holds them.
    in_order = bool(granted and merged) and events.index(merged[0]) < events.index(granted[-1])
    checks.append((in_order, "t3 got GO only after t1 was merged"))

    # What codex printed, as the daemon's parser read it.
    for task in ("t1", "t2", "t3", "t4"):
        threads = by_type(events, "AgentThreadStarted", task)
        tokens = sum(e["data"].get("input_tokens", 0) for e in by_type(events, "TokensUsed", task))
        checks.append((bool(threads) and tokens > 0, f"{task}: codex's thread and token usage were read"))
    changed = {(e["task"], e["data"]["path"], e["data"]["kind"]) for e in by_type(events, "AgentFileChanged")}
    for expected in (("t1", "HELLO.md", "add"), ("t3", "HELLO.md", "update"), ("t4", "INDEX.md", "add")):
        checks.append((expected in changed, f"{expected[0]}: apply_patch read as a change to {expected[1]}"))
    commands = [(e["task"], e["data"]) for e in by_type(events, "AgentCommandExecuted")]
    printf = [data for task, data in commands if task == "t2" and "NOTES.md" in data["command"]]
    checks.append((any(d.get("exit_code") == 0 for d in printf), "t2: its shell command read, exit code 0"))
    check_codes = [e["data"]["exit_code"] for e in by_type(events, "CheckCompleted", "t4")]
    retried = [e["data"]["attempt"] for e in by_type(events, "TaskStarted", "t4")] == [1, 2]
    checks.append((retried and check_codes == [1, 0], f"t4: check failed, retried, passed {check_codes}"))
    messages = {e["task"] for e in by_type(events, "AgentMessageReceived")}
    checks.append((messages >= {"t1", "t2", "t3", "t4"}, "every executor's last message read"))
    planned = by_type(events, "PlanValidated")
    checks.append((bool(planned), "the planner's answer (the -o file) was a valid plan"))
    reviews = by_type(events, "ReviewCompleted")
    checks.append((len(reviews) == 4 and all(r["data"]["verdict"] == "pass" for r in reviews), "4 reviews passed"))
    used = [e["data"].get("usage", {}).get("input_tokens", 0) for e in [*planned, *reviews]]
    checks.append((bool(used) and all(n > 0 for n in used), "the planner's and reviewers' token usage counted"))

    # Every tool call the model made ran: codex told it an exit code of 0 (the reviewers' `git diff` in a
    # read-only sandbox included).
    failed_calls = [str(x) for x in fake.exchanges if x.previous and x.previous != "exit code 0"]
    checks.append(
        (bool(fake.exchanges) and not failed_calls, f"every tool call exited 0 {failed_calls or ''}".rstrip())
    )
    checks.append(
        (
            bool(fake.exchanges) and not fake.misses,
            f"the fake model answered every request ({len(fake.exchanges)} requests)",
        )
    )
    audit = daemon.ctl("audit", "verify", job)
    checks.append((audit.returncode == 0, "numerusctl audit verify"))
    return checks


def run(
    codex: str,
    work: Path,
    timeout: float,
    model: str | None = None,
    symlinked: bool = False,
    agent_sandbox: str | None = None,
) -> int:
    section("codex")
    version = subprocess.run([codex, "--version"], capture_output=True, text=True, timeout=60, check=False)
    print(f"{codex}: {(version.stdout or version.stderr).strip()}")
    if version.returncode != 0:
        print(f"codex-check: `{codex} --version` failed", file=sys.stderr)
        return 2

    if symlinked:
        # As on macOS, where /tmp and /var are symlinks into /private: the state directory (so every worktree) and
        # the repository are reached through a symlink.
        (work / "real").mkdir()
        (work / "link").symlink_to(work / "real")
        work = work / "link"
    fake = FakeModel(SCENARIO).start()
    codex_home = work / "codex-home"
    codex_home.mkdir()
    daemon = Daemon(work / "state", config=config_toml(codex, fake.base_url, codex_home, model, agent_sandbox))
    try:
        section(f"the fake model at {fake.base_url}; numerusd on {work / 'state'}")
        daemon.start()
        print((work / "state" / "numerus.toml").read_text().rstrip())
        repo = git_repo(work / "repo")
        main_before = git(repo, "rev-parse", "main")

        section(f"numerusctl run {GOAL!r} --repo {repo} --agent codex --wait")
        try:
            result = daemon.ctl("run", GOAL, "--repo", str(repo), "--agent", "codex", "--wait", timeout=timeout)
        except subprocess.TimeoutExpired:
            print(f"codex-check: the job did not end within {timeout:g} s; everything is kept in {work}")
            return 1
        show(result)
        job = result.stdout.splitlines()[0].strip() if result.stdout.strip() else ""
        if not job:
            print("codex-check: no job id from numerusctl run", file=sys.stderr)
            print(daemon.stderr()[-3000:], file=sys.stderr)
            return 1

        section(f"numerusctl plan {job}")
        show(daemon.ctl("plan", job))
        section(f"numerusctl status {job}")
        show(daemon.ctl("status", job))
        events = daemon.events(job)
        section(f"events of {job}: {len(events)}")
        counts = collections.Counter(e["type"] for e in events)
        print(", ".join(f"{kind} {n}" for kind, n in counts.most_common()))
        for e in events:
            if e["type"] in ("AgentCommandExecuted", "AgentFileChanged", "AgentErrorReported", "TaskExited"):
                print(f"  {e.get('task') or '-':4} {e['type']:22} {json.dumps(e['data'])[:150]}")
        asked = ", ".join(f"{name} ({style}) {n}x" for (name, style), n in fake.models.items())
        section(f"what the fake model was asked, in order; codex asked for {asked}")
        for exchange in fake.exchanges:
            print(f"  {exchange}")
        section(f"numerusctl audit verify {job}")
        show(daemon.ctl("audit", "verify", job))
        section(f"the integration branch numerus/{job}.integration")
        print(git(repo, "log", "--oneline", "--graph", f"numerus/{job}.integration").rstrip())

        checks = judge(daemon, job, repo, events, fake, main_before)
    except Exception:
        print(daemon.stderr()[-3000:], file=sys.stderr)
        raise
    finally:
        daemon.stop()
        fake.stop()

    section("verdict")
    for passed, what in checks:
        print(f"  {'ok  ' if passed else 'FAIL'} {what}")
    failed = [what for passed, what in checks if not passed]
    if failed:
        stderr = daemon.stderr()
        errors = [line for line in stderr.splitlines() if "ERROR" in line or "Traceback" in line]
        if errors:
            print("\nnumerusd logged:\n" + "\n".join(errors[-20:]))
        print(f"\ncodex-check: {len(failed)} of {len(checks)} checks failed; everything is kept in {work}")
        return 1
    print(f"\ncodex-check: all {len(checks)} checks passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/codex_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--codex", help="the codex program (default: $CODEX_BIN, else codex on PATH)")
    parser.add_argument(
        "--model",
        help="the profile's model, e.g. numerus-fake (unknown to codex: its classic tools); default: none, as in the "
        "built-in codex profile, so codex's own default model and its tools (code mode in codex 0.169)",
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds the job may take (default 300)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory even when all is well")
    parser.add_argument(
        "--symlinked", action="store_true", help="reach the state directory and the repository through a symlink"
    )
    parser.add_argument(
        "--agent-sandbox",
        help="codex's own --sandbox for executors, inside Numerus's (default: the profile's, danger-full-access)",
    )
    args = parser.parse_args(argv)
    codex = find_codex(args.codex)
    if codex is None:
        print(
            "codex-check: no codex found; install the Codex CLI (npm install @openai/codex) and put it on PATH, "
            "or point CODEX_BIN or --codex at it",
            file=sys.stderr,
        )
        return 2
    work = Path(tempfile.mkdtemp(prefix="numerus-codex-check."))
    status = run(codex, work, args.timeout, args.model, args.symlinked, args.agent_sandbox)
    if status == 0 and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    elif status == 0:
        print(f"(kept: {work})")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
