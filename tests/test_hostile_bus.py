"""Hostile agents against the bus (issue 14, attacks 1 and 2): an agent that finds the client credentials and the
signing key (here it can read them: the sandbox, where it runs, hides both) can still neither delete the history
nor add a forged event to it, because no client role may administer the streams or publish on them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, git_repo

pytestmark = pytest.mark.slow  # a real daemon runs the hostile agent

#: What the agent runs: every login it can find in connection.json, each trying to delete NUMERUS_EVENTS, purge
#: it, and publish an event signed with the real key.
ATTACK = r"""
import asyncio, json, sys
from datetime import UTC, datetime
from pathlib import Path
import nats
from numerusd.keys import Keyring
from numerusd.protocol.envelope import seal
from numerusd.protocol.events import JobSubmitted

state = Path(sys.argv[1])
info = json.loads((state / "connection.json").read_text())
logins = [(info["user"], info["password"])] + [(r["user"], r["password"]) for r in info.get("roles", {}).values()]
ring = Keyring.load(state / "keys.json")
job = "01HOSTILEHOSTILEHOSTILE000"
event = seal(JobSubmitted(goal="forged", repo="/", agent="quick"), id="01HOSTILEEVENT000000000000", job=job,
             task=None, time=datetime.now(UTC), actor="numerusd", correlation_id="x", causation_id=None, prev="",
             kid=ring.current_kid, key=ring.current_key)

async def attack(user, password):
    # Its role's own inbox (the user is the role's name), so that refusals, not missing replies, stop it.
    nc = await nats.connect(info["url"], user=user, password=password, inbox_prefix=f"_INBOX_{user}")
    js = nc.jetstream(timeout=0.5)
    for name, call in (("delete", lambda: js.delete_stream("NUMERUS_EVENTS")),
                       ("purge", lambda: js.purge_stream("NUMERUS_EVENTS")),
                       ("forge", lambda: js.publish(f"numerus.job.{job}.job_submitted", event.wire))):
        try:
            await call()
            print(f"ATTACK {name} as {user}: succeeded")
        except Exception as e:
            print(f"ATTACK {name} as {user}: {type(e).__name__}")
    await nc.close()

async def main():
    for user, password in logins:
        await attack(user, password)

asyncio.run(main())
"""


def test_an_agent_with_the_client_logins_and_the_key_cannot_touch_the_history(tmp_path: Path):
    script = tmp_path / "attack.py"
    script.write_text(ATTACK)
    state = tmp_path / "state"
    steps = [{"run": f"{sys.executable} {script} {state}"}, {"say": "done"}]
    # Unsandboxed, so that it holds what the sandbox would hide: this is the bus's own line of defence.
    unsandboxed = {"hostile": 'sandbox = "none"'}
    with Daemon(state, agents={"quick": [{"say": "hi"}], "hostile": steps}, profiles=unsandboxed).start() as daemon:
        repo = git_repo(tmp_path / "repo")
        first = daemon.ctl("--json", "run", "--no-plan", "Hi", "--repo", str(repo), "--agent", "quick", "--wait")
        job = json.loads(first.stdout.splitlines()[0])["job"]
        before = daemon.events(job)
        attack = daemon.ctl("--json", "run", "--no-plan", "Attack", "--repo", str(repo), "--agent", "hostile", "--wait")
        hostile = json.loads(attack.stdout.splitlines()[0])["job"]
        log = b"".join(path.read_bytes() for path in (state / "runs" / hostile).rglob("*.log")).decode()
        assert log.count("ATTACK") >= 6, log  # it ran, with every client login
        assert log.count("permissions violation for publish") >= 6, log  # and the server refused each attempt
        assert "succeeded" not in log
        assert daemon.events(job) == before  # the history is still there, unchanged
        assert "01HOSTILEHOSTILEHOSTILE000" not in daemon.ctl("status", "--all").stdout
        audit = daemon.ctl("audit", "verify")
        assert audit.returncode == 0, audit.stdout
        assert daemon.stop() == 0
