"""Each program's exit code comes from the type of the error that stopped it, never from its message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from numerusd import state_lock
from numerusd.cli import _exit_code
from numerusd.errors import ConfigError, NatsUnavailable, StateLocked, StoreError, StreamMismatch
from numerusd.protocol.exit_codes import CtlExit, DaemonExit


def test_a_second_lock_on_the_state_directory_is_state_locked(tmp_path: Path):
    fd = state_lock.take(tmp_path)
    try:
        with pytest.raises(StateLocked) as refused:
            state_lock.take(tmp_path)
    finally:
        os.close(fd)
    assert isinstance(refused.value, ConfigError)
    assert refused.value.fields == {"pid": str(os.getpid()), "state_dir": str(tmp_path)}
    os.close(state_lock.take(tmp_path))  # free again once the holder is gone


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (StateLocked("the state directory is taken"), 75),
        (ConfigError("another numerusd, says this message, but it is a configuration error"), 78),
        (NatsUnavailable("no server"), 69),
        (StreamMismatch("purge allowed"), 70),
        (StoreError("could not append"), 70),
    ],
)
def test_numerusd_exit_code_follows_the_error_type(error: Exception, code: int):
    assert _exit_code(error) == code


def test_the_codes_are_the_documented_ones():
    assert [int(code) for code in DaemonExit] == [0, 69, 70, 75, 78]
    assert [int(code) for code in CtlExit] == [0, 1, 2, 3, 4]
    text = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    assert all(f"| {int(code)} |" in text for code in DaemonExit if code)
