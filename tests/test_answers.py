"""The answer file an agent call leaves (`-o`): what lies there is the agent's choice, so the daemon reads only a
regular file of bounded size, never through a symlink, and says in one line why it did not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from numerusd.errors import AgentError
from numerusd.protocol.events import Usage
from numerusd.supervisor import MAX_ANSWER_BYTES, CallResult, Outcome, read_answer


def test_a_regular_answer_is_read_and_a_missing_one_is_none(tmp_path: Path):
    answer = tmp_path / "answer.json"
    assert read_answer(answer) is None
    answer.write_text('{"verdict": "pass"}')
    assert read_answer(answer) == '{"verdict": "pass"}'


def test_a_symlink_is_not_followed_to_the_daemons_keys(tmp_path: Path):
    keys = tmp_path / "keys.json"
    keys.write_text('{"current": "k1", "keys": {"k1": "00ff"}}')
    answer = tmp_path / "answer.json"
    answer.symlink_to(keys)
    with pytest.raises(AgentError) as refused:
        read_answer(answer)
    assert refused.value.message == "the agent's answer answer.json cannot be read: Too many levels of symbolic links"


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path):
    answer = tmp_path / "answer.json"
    os.mkfifo(answer)
    with pytest.raises(AgentError, match="is not a regular file"):
        read_answer(answer)


def test_an_answer_past_the_limit_is_refused_not_read_whole(tmp_path: Path):
    answer = tmp_path / "answer.json"
    with answer.open("wb") as out:
        out.truncate(MAX_ANSWER_BYTES + 1)  # sparse: the size is what counts
    with pytest.raises(AgentError) as refused:
        read_answer(answer)
    assert refused.value.message == (
        f"the agent's answer is {MAX_ANSWER_BYTES + 1} bytes, over the limit of {MAX_ANSWER_BYTES} bytes"
    )
    # What the job is told: that reason, not "no answer".
    ended = Outcome(exit_code=0, signal=None, log_path="", log_sha256="", log_bytes=0, duration_s=0.0)
    result = CallResult(outcome=ended, answer=None, usage=Usage(), errors=[], unreadable=refused.value.message)
    assert result.failure() == refused.value.message
