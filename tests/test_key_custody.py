"""Where the signing keys come from: a key file outside the state directory, a systemd credential, or the default
`<state>/keys.json`; `numerusd keys rotate` adds a key without losing the old ones."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

import pytest

from numerusd.config import KEYS_CREDENTIAL, load_settings
from numerusd.keys import Keyring
from tests.daemon_harness import BIN, Daemon, git_repo


def test_the_default_is_keys_json_in_the_state_directory(tmp_path: Path):
    assert load_settings(state_dir=tmp_path, env={}).keys_path == tmp_path / "keys.json"


def test_a_systemd_credential_is_read_when_present(tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    assert load_settings(state_dir=tmp_path, env=env).keys_path == tmp_path / "keys.json"  # none handed over
    (credentials / KEYS_CREDENTIAL).write_text("{}")
    assert load_settings(state_dir=tmp_path, env=env).keys_path == credentials / KEYS_CREDENTIAL


def test_key_file_wins_over_the_credential(tmp_path: Path):
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / KEYS_CREDENTIAL).write_text("{}")
    env = {"CREDENTIALS_DIRECTORY": str(credentials), "NUMERUS_KEY_FILE": str(tmp_path / "etc" / "keys.json")}
    assert load_settings(state_dir=tmp_path, env=env).keys_path == tmp_path / "etc" / "keys.json"
    (tmp_path / "numerus.toml").write_text(f'key_file = "{tmp_path / "other.json"}"\n')
    assert load_settings(state_dir=tmp_path, env={}).keys_path == tmp_path / "other.json"


def _numerusd(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "numerusd"), *args], capture_output=True, text=True, env=env, timeout=60)


def test_rotate_creates_then_adds_a_current_key_and_keeps_the_old(tmp_path: Path):
    path = tmp_path / "etc" / "keys.json"
    env = {"PATH": "/usr/bin:/bin", "NUMERUS_KEY_FILE": str(path), "NUMERUS_STATE_DIR": str(tmp_path / "state")}
    created = _numerusd("keys", "rotate", env=env)
    assert created.returncode == 0, created.stderr
    first = Keyring.load(path)
    assert len(first.keys) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    rotated = _numerusd("keys", "rotate", env=env)
    assert rotated.returncode == 0, rotated.stderr
    second = Keyring.load(path)
    assert second.current_kid != first.current_kid
    assert second.keys == {**first.keys, second.current_kid: second.current_key}  # the old key still verifies
    assert rotated.stdout == (
        f"{path}: new current key {second.current_kid} (2 keys); restart numerusd to sign with it\n"
    )


def test_rotate_names_a_file_it_cannot_write(tmp_path: Path):
    (tmp_path / "not-a-directory").write_text("")
    path = tmp_path / "not-a-directory" / "keys.json"  # as unwritable as a systemd credential, even for root
    env = {"PATH": "/usr/bin:/bin", "NUMERUS_KEY_FILE": str(path), "NUMERUS_STATE_DIR": str(tmp_path)}
    result = _numerusd("keys", "rotate", env=env)
    assert result.returncode == 78
    assert result.stderr.startswith(f"numerusd: cannot write {path}: ")


@pytest.mark.slow
def test_a_daemon_with_a_key_file_elsewhere_leaves_no_key_in_the_state_directory(tmp_path: Path):
    key_file = tmp_path / "etc" / "keys.json"
    daemon = Daemon(tmp_path / "state", env={"NUMERUS_KEY_FILE": str(key_file)}, agents={"quick": [{"say": "hi"}]})
    with daemon.start():
        repo = git_repo(tmp_path / "repo")
        run = daemon.ctl("--json", "run", "--no-plan", "Hi", "--repo", str(repo), "--agent", "quick", "--wait")
        assert run.returncode == 0, run.stderr
        job = json.loads(run.stdout.splitlines()[0])["job"]
        assert key_file.exists() and not (daemon.state_dir / "keys.json").exists()
        verified = daemon.ctl("audit", "verify", job, "--key-file", str(key_file))
        assert verified.returncode == 0, verified.stdout
        assert daemon.stop() == 0
