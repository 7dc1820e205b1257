"""`numerusd.redaction`: each secret shape and known value is replaced, whatever the chunks, and nothing else is."""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from numerusd.agents.base import LineBuffer
from numerusd.domain.observations import AgentReported, CheckRan
from numerusd.protocol.events import AgentMessageReceived
from numerusd.redaction import RedactingStream, Redactor, known_secrets

OPENAI = "sk-proj-Abc123Def456Ghi789Jkl012Mno345Pqr678"
ANTHROPIC = "sk-ant-api03-Zyx987Wvu654Tsr321Qpo098Nml765"
GITHUB = "ghp_" + "A1b2C3d4E5" * 3 + "F6g7H8"
GITHUB_PAT = "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"
AWS_ID = "AKIAIOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SLACK = "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"
GOOGLE = "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"
PRIVATE_KEY = (
    "-----BEGIN OPENSSH PRIVATE KEY-----\n"
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW\n"
    "QyNTUxOQAAACBzZWNyZXRzZWNyZXRzZWNyZXRzZWNyZXRzZWNyZXRzZWNyZXQAAAAA==\n"
    "-----END OPENSSH PRIVATE KEY-----"
)


@pytest.mark.parametrize(
    ("secret", "kind"),
    [
        (OPENAI, "openai_key"),
        (ANTHROPIC, "anthropic_key"),
        (GITHUB, "github_token"),
        ("gho_" + "x" * 36, "github_token"),
        ("ghs_" + "y" * 36, "github_token"),
        (GITHUB_PAT, "github_token"),
        (AWS_ID, "aws_access_key_id"),
        (SLACK, "slack_token"),
        (GOOGLE, "google_api_key"),
        (JWT, "jwt"),
        (PRIVATE_KEY, "private_key"),
    ],
)
def test_each_token_shape_is_replaced_by_its_marker_and_counted(secret: str, kind: str):
    counts: Counter[str] = Counter()
    text = f"before {secret} after\n"
    assert Redactor().redact_text(text, counts) == f"before [REDACTED:{kind}] after\n"
    assert counts == {kind: 1}


def test_an_aws_secret_key_next_to_its_id_or_after_its_name_is_replaced():
    counts: Counter[str] = Counter()
    redactor = Redactor()
    assert redactor.redact_text(f"id={AWS_ID},secret={AWS_SECRET}", counts) == (
        "id=[REDACTED:aws_access_key_id],secret=[REDACTED:aws_secret_access_key]"
    )
    assert redactor.redact_text(f'AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', counts) == (
        'AWS_SECRET_ACCESS_KEY="[REDACTED:aws_secret_access_key]"'
    )
    assert counts == {"aws_access_key_id": 1, "aws_secret_access_key": 2}


def test_ordinary_output_is_left_byte_for_byte():
    text = (
        "task-sk-is-not-a-key-at-all-really ok\n"  # `sk-` inside a word
        "ghp_short AKIA123 eyJ.not.a.jwt xoxb- AIza -----BEGIN PUBLIC KEY-----\n"
        "compiling 1234 modules \u00e9t\u00e9 \U0001f600 in 3.2 s; tests passed\r\n"
    )
    counts: Counter[str] = Counter()
    assert Redactor({"TOKEN": ["short"]}).redact_text(text, counts) == text
    assert not counts


def test_an_env_value_marked_secret_is_replaced_by_its_name_wherever_it_comes_from():
    profile_env = {"MY_SERVICE_TOKEN": "plain-looking-value-42", "CODEX_HOME": "/home/u/.codex"}
    found = known_secrets(
        [(profile_env, ("MY_SERVICE_TOKEN", "DAEMON_SIDE"))],
        environ={"DAEMON_SIDE": "daemon-held-value-7", "OPENAI_API_KEY": OPENAI, "HOME": "/root"},
        nats_passwords=("nats-password-xyz", None),
        signing_keys=(bytes(range(32)),),
    )
    assert found == {
        "MY_SERVICE_TOKEN": {"plain-looking-value-42"},
        "DAEMON_SIDE": {"daemon-held-value-7"},
        "OPENAI_API_KEY": {OPENAI},
        "nats_password": {"nats-password-xyz"},
        "signing_key": {bytes(range(32)).hex()},
    }
    redactor = Redactor(found)
    counts: Counter[str] = Counter()
    text = f"a plain-looking-value-42 b {OPENAI} c {bytes(range(32)).hex()} d /home/u/.codex"
    assert redactor.redact_text(text, counts) == (
        "a [REDACTED:MY_SERVICE_TOKEN] b [REDACTED:OPENAI_API_KEY] c [REDACTED:signing_key] d /home/u/.codex"
    )
    assert counts == {"MY_SERVICE_TOKEN": 1, "OPENAI_API_KEY": 1, "signing_key": 1}


def stream_through(redactor: Redactor, chunks: list[bytes]) -> tuple[bytes, Counter[str]]:
    stream = RedactingStream(redactor)
    out = b"".join(stream.feed(chunk) for chunk in chunks) + stream.close()
    return out, stream.counts


def test_a_secret_split_across_chunks_is_still_replaced_whatever_the_cut():
    text = f"one {OPENAI} two\nthree {GITHUB}".encode()
    want = b"one [REDACTED:openai_key] two\nthree [REDACTED:github_token]"
    for cut in range(1, len(text)):
        out, counts = stream_through(Redactor(), [text[:cut], text[cut:]])
        assert out == want, cut
        assert counts == {"openai_key": 1, "github_token": 1}
    out, _ = stream_through(Redactor(), [bytes([byte]) for byte in text])  # one byte at a time
    assert out == want


def test_a_private_key_block_over_many_chunks_and_lines_is_dropped_whole():
    text = f"key follows\n{PRIVATE_KEY}\nafter the key\n".encode()
    for size in (1, 7, 64, 4096):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        out, counts = stream_through(Redactor(), chunks)
        assert out == b"key follows\n[REDACTED:private_key]\nafter the key\n", size
        assert counts == {"private_key": 1}


def test_a_private_key_whose_end_never_comes_drops_no_more_than_its_bound():
    body = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n" * 3000  # 111 KB of body, no END line
    out, counts = stream_through(Redactor(), [b"-----BEGIN RSA PRIVATE KEY-----\n", body, b"done\n"])
    assert out.startswith(b"[REDACTED:private_key]")
    assert b"QUJD" not in out[:100] and out.endswith(b"done\n")
    assert counts == {"private_key": 1}


def test_a_long_line_without_newline_is_let_through_without_cutting_a_secret():
    text = b"x " * 40_000 + OPENAI.encode() + b" y" * 40_000
    chunks = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    stream = RedactingStream(Redactor())
    released = b"".join(stream.feed(chunk) for chunk in chunks)
    assert len(released) > len(text) // 2  # held back only up to its bound
    out = released + stream.close()
    assert out == text.replace(OPENAI.encode(), b"[REDACTED:openai_key]")


def test_what_reaches_the_parser_is_the_redacted_text():
    stream, lines = RedactingStream(Redactor()), LineBuffer()
    got: list[str] = []
    for chunk in (b'{"msg": "token ' + GITHUB[:10].encode(), GITHUB[10:].encode() + b'"}\n'):
        got += lines.feed(stream.feed(chunk))
    assert got == ['{"msg": "token [REDACTED:github_token]"}']


def test_values_are_redacted_in_their_json_form_and_come_back_typed():
    redactor = Redactor({"NATS": ['pa"ss\\word-42']})
    counts: Counter[str] = Counter()
    seen = CheckRan(task="t1", command="make", exit_code=0, duration_s=1.0, output=f'pa"ss\\word-42 {PRIVATE_KEY}')
    redacted = redactor.redact_value(seen, counts)
    assert redacted == CheckRan(
        task="t1", command="make", exit_code=0, duration_s=1.0, output="[REDACTED:NATS] [REDACTED:private_key]"
    )
    assert counts == {"NATS": 1, "private_key": 1}
    reported = AgentReported(task="t1", events=(AgentMessageReceived(text=f"here: {JWT}"),))
    assert redactor.redact_value(reported) == AgentReported(
        task="t1", events=(AgentMessageReceived(text="here: [REDACTED:jwt]"),)
    )
    clean = CheckRan(task="t1", command="make", exit_code=0, duration_s=1.0, output="fine")
    assert redactor.redact_value(clean) is clean
    assert msgspec.json.encode(redacted).count(b"REDACTED") == 2
