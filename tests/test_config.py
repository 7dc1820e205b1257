"""Settings: defaults < file < environment < flags, one-line errors with the field's path, the connection file."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from numerusd.config import Settings, load_settings, write_connection_file
from numerusd.errors import ConfigError


def test_defaults_without_file_or_environment(tmp_path: Path):
    settings = load_settings(state_dir=tmp_path, env={})
    assert settings.state_dir == tmp_path
    assert settings.nats_url is None and settings.default_agent == "codex"
    assert {name: p.kind for name, p in settings.agents.items()} == {"codex": "codex", "scripted": "scripted"}
    assert settings.kill_grace_s == 5.0
    assert settings.connection_path == tmp_path / "connection.json"
    assert settings.keys_path == tmp_path / "keys.json"
    assert settings.nats_store_dir == tmp_path / "nats"
    assert all(p.parent == tmp_path for p in (settings.runs_dir, settings.wal_path, settings.db_path))


def test_default_state_dir_is_under_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_settings(env={}).state_dir == tmp_path / ".local/state/numerus"


def test_flags_beat_environment_beat_file_beat_defaults(tmp_path: Path):
    (tmp_path / "numerus.toml").write_text(
        'nats_url = "nats://file:4222"\nnats_user = "file-user"\nkill_grace_s = 7\ndefault_agent = "scripted"\n'
        "log_flush_ms = 250\n"
    )
    env = {"NUMERUS_STATE_DIR": str(tmp_path), "NUMERUS_NATS_URL": "nats://env:4222", "NUMERUS_KILL_GRACE_S": "9.5"}
    settings = load_settings(env=env)
    assert settings.nats_url == "nats://env:4222"  # env over file
    assert settings.kill_grace_s == 9.5  # env over file, converted from text
    assert settings.nats_user == "file-user"  # file over default
    assert settings.default_agent == "scripted" and settings.log_flush_ms == 250
    assert settings.log_chunk_bytes == Settings().log_chunk_bytes  # default
    settings = load_settings(env=env, nats_url="nats://flag:4222")
    assert settings.nats_url == "nats://flag:4222"  # flag over env


def test_explicit_config_file_and_agents_merged_over_builtins(tmp_path: Path):
    conf = tmp_path / "elsewhere.toml"
    conf.write_text(
        '[agents.codex]\nmodel = "gpt-5-codex"\nargs = ["-c", "x=1"]\n'
        '[agents.careful]\nagent_sandbox = "read-only"\nsandbox = "none"\nnetwork = false\n'
        'env = { OPENAI_API_KEY = "sk-secret" }\n'
    )
    settings = load_settings(config_file=conf, state_dir=tmp_path / "s", env={})
    codex = settings.agents["codex"]
    assert (codex.kind, codex.model, codex.args) == ("codex", "gpt-5-codex", ("-c", "x=1"))
    assert settings.agents["scripted"].kind == "scripted"
    careful = settings.agents["careful"]
    assert (careful.agent_sandbox, careful.sandbox, careful.network) == ("read-only", "none", False)
    assert settings.agents["codex"].sandbox == "bwrap"  # unless written out
    assert "sk-secret" not in repr(settings)


def test_relative_paths_in_a_file_are_relative_to_it(tmp_path: Path):
    conf = tmp_path / "conf" / "numerus.toml"
    conf.parent.mkdir()
    conf.write_text('state_dir = "state"\nnats_creds = "/etc/n.creds"\n')
    settings = load_settings(config_file=conf, env={})
    assert settings.state_dir == tmp_path / "conf" / "state"
    assert settings.nats_creds == Path("/etc/n.creds")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '[agents.codex]\nargs = "--fast"\n',
            r"numerus\.toml: Expected `array`, got `str` - at `\$\.agents\.codex\.args`$",
        ),
        ("kill_grace_s = -1\n", r"numerus\.toml: Expected `float` >= 0\.0 - at `\$\.kill_grace_s`$"),
        ("kill_grace = 3\n", r"numerus\.toml: Object contains unknown field `kill_grace`"),
        ("[agents.mine]\nmodell = 'x'\n", r"unknown field `modell` - at `\$\.agents\.mine`$"),
        ("agents = 3\n", r"at `\$\.agents`$"),
        ("nats_url = \n", r"numerus\.toml: not valid TOML"),
    ],
)
def test_bad_file_gives_one_line_naming_file_and_field(tmp_path: Path, text: str, expected: str):
    (tmp_path / "numerus.toml").write_text(text)
    with pytest.raises(ConfigError, match=expected) as info:
        load_settings(state_dir=tmp_path, env={})
    assert "\n" not in info.value.message
    assert str(tmp_path / "numerus.toml") in info.value.message


def test_bad_environment_value_and_missing_explicit_file(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"^\$NUMERUS_LOG_FLUSH_MS: Expected `int`, got `str`$"):
        load_settings(state_dir=tmp_path, env={"NUMERUS_LOG_FLUSH_MS": "soon"})
    with pytest.raises(ConfigError, match=r"nope\.toml: configuration file not found"):
        load_settings(state_dir=tmp_path, env={"NUMERUS_CONFIG": str(tmp_path / "nope.toml")})
    with pytest.raises(ConfigError, match=r"default_agent 'ghost' is not a configured agent profile"):
        load_settings(state_dir=tmp_path, env={"NUMERUS_DEFAULT_AGENT": "ghost"})


def test_password_never_in_repr(tmp_path: Path):
    settings = load_settings(state_dir=tmp_path, nats_password="hunter2", env={})
    assert settings.nats_password == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings)
    assert "nats_password=<set>" in repr(settings)
    # Nor in the address it gives to whatever connects (the daemon, a rebuild's reading process).
    address = load_settings(
        state_dir=tmp_path, nats_url="nats://127.0.0.1:4222", nats_user="numerus", nats_password="hunter2", env={}
    ).configured_nats()
    assert address is not None and address.options() == {"user": "numerus", "password": "hunter2"}
    assert "hunter2" not in repr(address) and "password=<set>" in repr(address)


def test_connection_file_is_private_and_replaced_atomically(tmp_path: Path):
    path = tmp_path / "state" / "connection.json"
    old_umask = os.umask(0)  # even with a permissive umask the file is created 0600
    try:
        write_connection_file(path, "nats://127.0.0.1:4222", "numerus", "s3cret")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {
        "url": "nats://127.0.0.1:4222",
        "user": "numerus",
        "password": "s3cret",
        "pid": os.getpid(),
        "roles": {},
    }
    inode = path.stat().st_ino
    write_connection_file(path, "nats://127.0.0.1:5555", None, None)
    assert json.loads(path.read_text())["url"] == "nats://127.0.0.1:5555"
    assert path.stat().st_ino != inode  # a new file renamed over the old one, not rewritten in place
    assert [p.name for p in path.parent.iterdir()] == ["connection.json"]


def test_each_role_has_a_profile_and_the_claim_is_asked_of_the_executor_unless_a_claimer_is_named():
    settings = Settings(default_agent="codex", roles={"executor": "strong", "reviewer": "careful"})
    assert settings.role_agents() == {
        "planner": "codex", "queen": "codex", "claimer": "strong", "executor": "strong", "reviewer": "careful"
    }  # fmt: skip
    assert settings.role_agents(overrides={"executor": "other"})["claimer"] == "other"
    assert settings.role_agents(overrides={"claimer": "cheap"})["claimer"] == "cheap"
    assert set(settings.role_agents("scripted").values()) == {"scripted"}
    assert settings.role_agents("scripted", {"reviewer": "careful"})["reviewer"] == "careful"
