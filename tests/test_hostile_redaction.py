"""Hostile agent, item 6 of issue 14: an agent that prints the secrets it can reach gets none of them stored.

The agent echoes the API key its profile gives it, a GitHub token and a private key block; the goal holds a
token and the daemon's own NATS password and signing key (which the agent cannot read: the sandbox hides the
state directory): afterwards no byte of any of them is in the run log, `numerusctl logs`, the job's events, the
views database, the WAL or the JetStream store, and the job shows how many were redacted.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from tests.conftest import eventually
from tests.daemon_harness import Daemon, claim, git_repo, write_scenario
from tests.views_reader import job_state

OPENAI = "sk-proj-HostileTest0123456789abcdefghijklmnop"
GITHUB = "ghp_" + "HostileGithubToken0123456789abcdefgh"
GOAL_TOKEN = "ghp_" + "GoalGithubToken0123456789abcdefghijkl"
KEY_BODY = "SG9zdGlsZVByaXZhdGVLZXlCb2R5MDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3A="
#: Files in the state directory that hold the secrets by design: what the user configured, and the sources.
SOURCES = {"numerus.toml", "keys.json", "connection.json", "nats-server.conf"}


def hostile_daemon(state_dir: Path) -> Daemon:
    """A daemon whose `hostile` profile gives its agent OPENAI_API_KEY, and whose agent prints every secret."""
    state_dir.mkdir(parents=True)
    steps = [
        {
            "run": (
                "echo $OPENAI_API_KEY; "
                f"echo {GITHUB[:12]}''{GITHUB[12:]}; "  # split in the script, whole in the output
                f"printf -- '-----BEGIN RSA PRIVATE KEY-----\\n{KEY_BODY}\\n-----END RSA PRIVATE KEY-----\\n'; "
                "printf '%s' \"$OPENAI_API_KEY\""
            )
        },
        {"say": f"my key is {OPENAI}"},
    ]
    # Beside the state directory, which the sandboxed agent does not see, and bound into its sandbox.
    scenario = write_scenario(state_dir.parent / "scenario-hostile.json", steps)
    config = (
        "[agents.hostile]\n"
        'kind = "scripted"\n'
        f"env = {{ NUMERUS_SCENARIO = {json.dumps(str(scenario))}, OPENAI_API_KEY = {json.dumps(OPENAI)} }}\n"
        f"binds = [{json.dumps(str(scenario))}]\n"
    )
    return Daemon(state_dir, config=config)


def stored_files(state_dir: Path) -> list[Path]:
    """Everything the daemon stored (logs, events, views, WAL, JetStream files), less the secrets' own sources."""
    return [
        path
        for path in state_dir.rglob("*")
        if path.is_file() and path.name not in SOURCES and not path.name.startswith("scenario-")
    ]


def test_secrets_an_agent_prints_are_stored_nowhere_and_counted(tmp_path: Path):
    repo = git_repo(tmp_path / "repo")
    with hostile_daemon(tmp_path / "state").start() as daemon:
        connection = daemon.connection()
        keys = json.loads((daemon.state_dir / "keys.json").read_text())["keys"]
        secrets = [OPENAI, GITHUB, GOAL_TOKEN, KEY_BODY, connection["password"], *keys.values()]
        (key,) = keys.values()
        goal = f"use the token {GOAL_TOKEN}, the password {connection['password']} and the key {key}"
        job = daemon.ctl_json("run", "--no-plan", goal, "--repo", str(repo), "--agent", "hostile")["job"]

        async def done() -> dict:
            async with daemon.client() as client:
                return await client.wait_for(job, lambda view: view["status"] in ("completed", "failed"))

        view = asyncio.run(done())
        assert view["status"] == "completed", view
        (task,) = view["tasks"]
        log = Path(task["log_path"]).read_text()
        assert "[REDACTED:OPENAI_API_KEY]" in log and "[REDACTED:github_token]" in log
        assert "[REDACTED:private_key]" in log
        logs = daemon.ctl("logs", job, check=True).stdout
        events = daemon.ctl("--json", "events", job, check=True).stdout
        shown = daemon.ctl("status", job, check=True).stdout
        told = daemon.ctl("events", job, check=True).stdout
        assert "secrets redacted in t1: " in told
        assert view["goal"] == (
            "use the token [REDACTED:github_token], the password [REDACTED:nats_password] and the key "
            "[REDACTED:signing_key]"
        )
        redacted = [json.loads(line) for line in events.splitlines() if '"SecretRedacted"' in line]
        counts = {}
        for event in redacted:
            for kind, count in event["data"]["counts"].items():
                counts[kind] = counts.get(kind, 0) + count
        # The agent printed the key three times (twice in output, once in a message) and the token once; the goal
        # held a token, the password and the key; the scripted agent's JSONL shows its commands too, counted again.
        assert counts["OPENAI_API_KEY"] >= 3 and counts["github_token"] >= 2, counts
        assert counts["private_key"] >= 1 and counts["nats_password"] >= 1 and counts["signing_key"] >= 1
        assert view["secrets_redacted"] == sum(counts.values())
        assert f"secrets  {view['secrets_redacted']} redacted" in shown
        views = daemon.state_dir / "views.sqlite3"

        def projected() -> bool:
            state = job_state(views, job)
            return state is not None and state.secrets_redacted == view["secrets_redacted"]

        asyncio.run(eventually(projected, timeout=20))
    shown_to_user = {"run log": log, "logs": logs, "events --json": events, "events": told, "status": shown}
    for secret in secrets:
        for where, text in shown_to_user.items():
            assert secret not in text, f"a secret is in the {where}"
        for path in stored_files(daemon.state_dir):
            assert secret.encode() not in path.read_bytes(), f"a secret is stored in {path}"


JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJob3N0aWxlIn0.HostileSignature0123456789abcdef"
AWS_ID = "AKIAHOSTILE0EXAMPLE7"


async def test_secrets_in_a_plan_a_check_and_a_review_are_recorded_redacted(tmp_path: Path):
    """What is not terminal output (the planner's plan, a check's output, the reviewer's reasons) is redacted
    before its events are sealed, and counted for the job (the plan) and the task (its check and review)."""
    plan = {
        "summary": "Greet",
        "tasks": [
            {
                "id": "t1",
                "title": "Greeting",
                "instructions": f"Create HELLO.md; the deploy token is {GITHUB}.",
                "intents": [{"path": "HELLO.md", "mode": "create"}],
            }
        ],
    }
    team = {
        "cases": [
            {"match": {"role": "planner"}, "steps": [{"answer": plan}]},
            {
                "match": {"role": "claimer"},
                "steps": [{"answer": claim(("HELLO.md", "create"))}],
            },
            {"match": {"role": "executor"}, "steps": [{"write": "HELLO.md", "content": "# Hello\n"}]},
            {"match": {"role": "reviewer"}, "steps": [{"answer": {"verdict": "pass", "reasons": [f"saw {JWT}"]}}]},
        ]
    }
    # The check's command holds no secret (split by the shell): a secret written into a command or a goal is
    # recorded, and so run, redacted.
    config = f"checks = [\"echo $OPENAI_API_KEY {AWS_ID[:6]}''{AWS_ID[6:]}\"]\n"
    state_dir = tmp_path / "state"
    with Daemon(state_dir, env={"OPENAI_API_KEY": OPENAI}, agents={"team": team}, config=config).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        result = daemon.ctl("run", "greet", "--repo", str(repo), "--agent", "team", "--wait", timeout=90)
        assert result.returncode == 0, result.stdout + result.stderr
        job = result.stdout.splitlines()[0].strip()
        async with daemon.client() as client:
            events = await client.events(job)
            view = await client.status(job)
        text = json.dumps(events)
        (validated,) = [e for e in events if e["type"] == "PlanValidated"]
        assert "[REDACTED:github_token]" in validated["data"]["plan"]["tasks"][0]["instructions"]
        (check,) = [e for e in events if e["type"] == "CheckCompleted"]
        assert check["data"]["output"] == "[REDACTED:OPENAI_API_KEY] [REDACTED:aws_access_key_id]\n"
        (review,) = [e for e in events if e["type"] == "ReviewCompleted"]
        assert review["data"]["reasons"] == ["saw [REDACTED:jwt]"]
        counted: dict[tuple[str, str], int] = {}
        for event in events:
            if event["type"] == "SecretRedacted":
                for kind, count in event["data"]["counts"].items():
                    where = (event["data"]["task"], kind)
                    counted[where] = counted.get(where, 0) + count
        # The plan and the verdict count twice: in the agent's output (which shows its answer) and its answer.
        assert counted == {
            ("", "github_token"): 2,
            ("t1", "OPENAI_API_KEY"): 1,
            ("t1", "aws_access_key_id"): 1,
            ("t1", "jwt"): 2,
        }
        assert view["secrets_redacted"] == sum(counted.values())
    for secret in (GITHUB, OPENAI, AWS_ID, JWT):
        assert secret not in text
        for path in stored_files(state_dir):
            assert secret.encode() not in path.read_bytes(), f"a secret is stored in {path}"
