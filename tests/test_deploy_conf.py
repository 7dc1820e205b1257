"""deploy/nats-server.conf gives a shared server the same users and permissions as the embedded one
(numerusd/bus_roles.py: the client roles and the workers'), and nats-server accepts it."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from numerusd.bus_roles import ROLES, WORKER_ROLE, permissions, worker_permissions
from numerusd.embedded_nats import find_binary

CONF = Path(__file__).parent.parent / "deploy" / "nats-server.conf"


def _users(text: str) -> dict[str, str]:
    """Each user's block of the configuration, by user name (comments removed)."""
    text = re.sub(r"#[^\n]*", "", text)
    parts = re.split(r"\buser:\s*(\w+)", text)[1:]
    return dict(zip(parts[::2], parts[1::2], strict=True))


def test_each_role_has_exactly_the_embedded_servers_permissions():
    users = _users(CONF.read_text())
    assert set(users) == {"numerusd", *ROLES, WORKER_ROLE}
    assert "permissions" not in users["numerusd"]
    for role in (*ROLES, WORKER_ROLE):
        publish, _, subscribe = users[role].partition("subscribe")
        expected = worker_permissions() if role == WORKER_ROLE else permissions(role)
        assert re.findall(r'"([^"]+)"', publish) == expected["publish"]["allow"], role
        assert re.findall(r'"([^"]+)"', subscribe) == expected["subscribe"]["allow"], role


def test_nats_server_accepts_it():
    env = {
        **os.environ,
        "NUMERUSD_PASSWORD": "a",
        "OPERATOR_PASSWORD": "b",
        "VIEWER_PASSWORD": "c",
        "WORKER_PASSWORD": "d",
    }
    command = [find_binary(), "-t", "-c", str(CONF)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    assert result.returncode == 0, result.stderr
