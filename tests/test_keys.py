"""The keyring: created once and private, read back by auditors, secrets never shown."""

from __future__ import annotations

import json
import re

import pytest

from numerusd.errors import ConfigError
from numerusd.keys import KEY_BYTES, Keyring


def test_created_on_first_start_with_one_private_key(tmp_path):
    path = tmp_path / "state" / "keys.json"
    ring = Keyring.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"k\d{8}-[0-9a-f]{4}", ring.current_kid)
    assert len(ring.current_key) == KEY_BYTES
    assert ring.keys == {ring.current_kid: ring.current_key}
    assert not list(path.parent.glob(".*.tmp"))


def test_second_start_reads_the_same_keys(tmp_path):
    path = tmp_path / "keys.json"
    first = Keyring.load_or_create(path)
    second = Keyring.load_or_create(path)
    assert (second.current_kid, second.current_key) == (first.current_kid, first.current_key)
    assert Keyring.load(path).keys == first.keys


def test_old_keys_stay_for_verification(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({"current": "new", "keys": {"old": "11" * 32, "new": "22" * 32}}))
    ring = Keyring.load(path)
    assert ring.current_kid == "new" and ring.current_key == bytes.fromhex("22" * 32)
    assert ring.keys["old"] == bytes.fromhex("11" * 32)


def test_secrets_never_in_repr_or_str(tmp_path):
    ring = Keyring.load_or_create(tmp_path / "keys.json")
    for text in (repr(ring), str(ring), f"{ring}"):
        assert ring.current_key.hex() not in text
        assert ring.current_kid in text


def test_missing_file_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        Keyring.load(tmp_path / "nope.json")


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "{}",
        '{"current": "a", "keys": {}}',
        '{"current": "a", "keys": {"a": "zz-not-hex"}}',
        '{"current": "b", "keys": {"a": "' + "00" * 32 + '"}}',
        '{"current": "a", "keys": {"a": "0011"}}',
        '["a"]',
    ],
)
def test_malformed_file_is_a_clear_config_error(tmp_path, content):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="key") as caught:
        Keyring.load(path)
    assert caught.value.__cause__ is None  # a parse error could quote the secret


def test_unreadable_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        Keyring.load(tmp_path)  # a directory
