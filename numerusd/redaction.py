"""Redaction: secrets in what agents print (and in any text about to be sealed) replaced by `[REDACTED:<kind>]`.

What an agent prints is stored where nothing can take it back: the run log, `NUMERUS_LOGS` and the event stream
(which forbid purge). So secrets are replaced *before* anything is stored, and what was replaced is counted
(a `SecretRedacted` event records the counts by kind, never a secret).

Two sorts of secret are known:

- values the daemon knows (`known_secrets`): environment variables that a profile marks secret (`secret_env`) or
  that are well-known secret names (`DEFAULT_SECRET_ENV`) and reach an agent, the daemon's NATS password(s) and
  its signing keys. Each is replaced by its name: `[REDACTED:OPENAI_API_KEY]`, `[REDACTED:signing_key]`.
- well-known token shapes (`SHAPES`): OpenAI and Anthropic API keys, GitHub tokens, AWS access key ids (and a
  secret key written next to one or after its variable's name), Slack and Google tokens, JWTs, private key blocks.

Why a regular expression and not a detector library: detect-secrets 1.5 (Yelp), the maintained one on the
package index, scans 0.1 MB/s of build-log-like output with its default plugins (`scan_line`), and its entropy
and keyword detectors flag ordinary lines (15 findings per line of that log): 500 times below the 50 MB/s the
daemon must keep up with (docs/operations.md, "Redaction"), and it would garble what it passes.
The shapes here are the high-confidence part of its and gitleaks' rules, in one compiled expression, tried
only where one of the literals a secret starts with occurs: those are found in one pass by `ahocorasick-rs`
(the Rust aho-corasick crate, SIMD-accelerated), 1.6 GB/s here against 0.1 GB/s for one `bytes.find` per
literal, and most output holds none of them (see `matches`, and docs/operations.md for the figures).

`RedactingStream` applies a `Redactor` to output that arrives in chunks cut anywhere: it redacts whole lines,
holds back a partial line (up to `HOLD` bytes, then redacts all but its last `TAIL` bytes), and drops a private
key block that spans lines from its `BEGIN` line to its `END` line. Everything is linear in the bytes.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import msgspec
from ahocorasick_rs import BytesAhoCorasick, MatchKind

#: A msgspec value (an observation, a command) that `redact_value` gives back with its text redacted.
_Value = TypeVar("_Value")

#: Environment variables whose values are secret wherever they are set (the agent's environment or the daemon's).
DEFAULT_SECRET_ENV: tuple[str, ...] = (
    "OPENAI_API_KEY",
    "CODEX_API_KEY",
    "ANTHROPIC_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "MISTRAL_API_KEY",
    "GROQ_API_KEY",
    "HF_TOKEN",
    "GITHUB_TOKEN",
    "GH_TOKEN",
    "GITLAB_TOKEN",
    "NPM_TOKEN",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "SLACK_BOT_TOKEN",
    "NUMERUS_NATS_PASSWORD",
)

#: A known value shorter than this is not redacted: replacing every "admin" or "1234" would garble the output.
MIN_SECRET_LENGTH = 8

#: A token begins at a word boundary (`task-sk-…` is not an OpenAI key), or after a `\n` escape in JSON text.
_TOKEN_START = rb"(?:(?<![A-Za-z0-9_\-])|(?<=\\[nrt]))"
#: Well-known token shapes by kind; each starts with a literal that `_PREFIXES` lists for the prefilter.
SHAPES: dict[str, bytes] = {
    "private_key": rb"-----BEGIN[A-Z0-9 ]{0,40} PRIVATE KEY-----",
    "anthropic_key": _TOKEN_START + rb"sk-ant-[A-Za-z0-9_\-]{20,}",
    "openai_key": _TOKEN_START + rb"sk-[A-Za-z0-9_\-]{20,}",
    "github_token": _TOKEN_START + rb"(?:gh[pousr]_[A-Za-z0-9]{30,255}|github_pat_[A-Za-z0-9_]{22,255})",
    # An access key id, and the secret key when it follows on the same line (`AKIA… wJalr…`, `id=…,secret=…`).
    "aws_access_key_id": _TOKEN_START
    + rb"(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Z])(?:(?P<aws_sep>[\s,;:=\"']{1,8}(?:[A-Za-z_]{1,30}[\s:=\"']{1,4})?)"
    + rb"(?P<aws_secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=]))?",
    "aws_secret_access_key": rb"(?P<aws_label>(?:aws_secret_access_key|AWS_SECRET_ACCESS_KEY)[\"']?\s{0,4}[=:]\s{0,4}"
    + rb"[\"']?)[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])",
    "slack_token": _TOKEN_START + rb"xox[baprs]-[A-Za-z0-9\-]{10,}",
    "google_api_key": _TOKEN_START + rb"AIza[0-9A-Za-z_\-]{35}",
    "jwt": _TOKEN_START + rb"eyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}",
}
#: The literals the shapes start with: a text in which none of them (nor a known value) occurs holds no secret.
_PREFIXES: tuple[bytes, ...] = (
    b"-----BEGIN",
    b"sk-",
    b"ghp_",
    b"gho_",
    b"ghu_",
    b"ghs_",
    b"ghr_",
    b"github_pat_",
    b"AKIA",
    b"ASIA",
    b"aws_secret_access_key",
    b"AWS_SECRET_ACCESS_KEY",
    b"xox",
    b"AIza",
    b"eyJ",
)
_END_OF_KEY = re.compile(rb"-----END[A-Z0-9 ]{0,40} PRIVATE KEY-----")
#: What lies between a private key's BEGIN and END lines: base64, its PEM headers (`Proc-Type: 4,ENCRYPTED`),
#: line ends, and the `\n` escapes of a JSON string (never a quote, so a JSON text stays JSON once redacted).
_KEY_BODY = re.compile(rb"(?:[A-Za-z0-9+/=\s:,.]|-(?!----END)|\\{1,4}[nrt])*")
#: The longest private key block looked for (an RSA 16384-bit key is about 12 KiB in PEM).
KEY_BLOCK_MAX = 64 * 1024


def marker(kind: str) -> bytes:
    """What a secret of `kind` is replaced with."""
    return b"[REDACTED:" + kind.encode() + b"]"


class Redactor:
    """Replaces known secret values and well-known token shapes in text; one per daemon, shared by every stream.

    `known` maps a secret's name (its kind in the marker) to its values. A value is also looked for as it reads
    inside a JSON string, so events (which are JSON) are redacted with the same expression.
    """

    def __init__(self, known: Mapping[str, Iterable[str | bytes]] | None = None) -> None:
        self._kind_of: dict[bytes, str] = {}
        for kind, values in (known or {}).items():
            for value in values:
                raw = value.encode() if isinstance(value, str) else value
                if len(raw) < MIN_SECRET_LENGTH:
                    continue
                escaped = msgspec.json.encode(raw.decode("utf-8", "replace"))[1:-1]
                for form in (raw, escaped):
                    self._kind_of.setdefault(form, kind)
        # Longest first, so a value that contains another is replaced whole.
        values = sorted(self._kind_of, key=len, reverse=True)
        branches = [b"(?P<known>" + b"|".join(re.escape(v) for v in values) + b")"] if values else []
        branches += [b"(?P<" + kind.encode() + b">" + pattern + b")" for kind, pattern in SHAPES.items()]
        self._pattern = re.compile(b"|".join(branches))
        # Known values first: at a tie the first literal wins, and the leftmost occurrence always does, so a
        # password that holds `sk-` is still found where it starts.
        literals = dict.fromkeys([*(v[:MIN_SECRET_LENGTH] for v in values), *_PREFIXES])
        self._literals = BytesAhoCorasick(list(literals), matchkind=MatchKind.LeftmostFirst)

    @property
    def knows(self) -> int:
        """How many secret values (in all their forms) it looks for."""
        return len(self._kind_of)

    def matches(self, data: bytes, begin: int = 0) -> Iterator[re.Match[bytes]]:
        """The secrets in `data` from `begin` on, in order (a caller that skips past one ignores those it covers).

        Every secret starts with one of the literals (`_PREFIXES`, the first bytes of each known value): their
        occurrences, found in one pass, are the only places the expression is tried (anchored there). Python's
        `re` scans for an alternation of patterns 10 to 100 times slower, and most output holds no literal at all.
        The occurrences do not overlap: a literal that starts inside another's occurrence is not looked at
        (no shape can: each starts at a word boundary, and no literal holds one).
        """
        end = 0
        for _, at, _ in self._literals.find_matches_as_indexes(memoryview(data)[begin:]):
            start = begin + at
            if start < end:
                continue
            match = self._pattern.match(data, start)
            if match is not None:
                end = match.end()
                yield match

    def redact(self, data: bytes, counts: Counter[str] | None = None) -> bytes:
        """`data` with every secret replaced by its marker; each replacement is counted in `counts` by kind.

        A private key block whose END is not in `data` is replaced up to the end of its body.
        """
        out, _ = self._redact(data, counts if counts is not None else Counter(), streaming=False)
        return out

    def redact_text(self, text: str, counts: Counter[str] | None = None) -> str:
        """`redact` for a str."""
        data = text.encode("utf-8", "surrogatepass")
        redacted = self.redact(data, counts)
        return text if redacted is data else redacted.decode("utf-8", "surrogatepass")

    def redact_value(self, value: _Value, counts: Counter[str] | None = None) -> _Value:
        """`value` (a msgspec Struct: an observation, a command) with the secrets in its strings redacted, however
        deep; `value` itself when it holds none (told by one look at its JSON form, the usual case)."""
        if next(self.matches(msgspec.json.encode(value)), None) is None:
            return value
        return self._walk(value, counts if counts is not None else Counter())

    def _walk(self, value: Any, counts: Counter[str]) -> Any:
        """`value` with its strings redacted, rebuilt only where one changed (a tuple of tagged events keeps its
        types, which a JSON round trip through an untagged base class would not)."""
        if isinstance(value, str):
            return self.redact_text(value, counts)
        if isinstance(value, msgspec.Struct):
            changed = {}
            for name in value.__struct_fields__:
                old = getattr(value, name)
                if (new := self._walk(old, counts)) is not old:
                    changed[name] = new
            return msgspec.structs.replace(value, **changed) if changed else value
        if isinstance(value, (tuple, list)):
            items = [self._walk(item, counts) for item in value]
            return value if all(a is b for a, b in zip(items, value, strict=True)) else type(value)(items)
        if isinstance(value, dict):
            pairs = [(self._walk(k, counts), self._walk(v, counts)) for k, v in value.items()]
            unchanged = all(k is k0 and v is v0 for (k, v), (k0, v0) in zip(pairs, value.items(), strict=True))
            return value if unchanged else dict(pairs)
        return value

    def _redact(self, data: bytes, counts: Counter[str], *, streaming: bool) -> tuple[bytes, bool]:
        """The redacted data, and whether it ends inside a private key block (its END still to come)."""
        pieces: list[bytes] = []
        pos = 0
        for match in self.matches(data):
            if match.start() < pos:
                continue  # inside a private key block already replaced
            kind = match.lastgroup or "secret"
            if kind == "known":
                kind = self._kind_of[match.group()]
            pieces.append(data[pos : match.start()])
            end = match.end()
            if kind == "private_key":
                # The block up to its END line, or (no END next) as far as its body goes; a body that runs on
                # to the end of the text has its END still to come (in a stream: in the lines that follow).
                body = _KEY_BODY.match(data, end, end + KEY_BLOCK_MAX)
                end = body.end() if body is not None else end
                block_end = _END_OF_KEY.match(data, end)
                if block_end is not None:
                    end = block_end.end()
                elif end == len(data):
                    pieces.append(marker(kind))
                    counts[kind] += 1
                    return b"".join(pieces), streaming
                pieces.append(marker(kind))
            elif kind == "aws_access_key_id":
                pieces.append(marker(kind))
                if match.group("aws_secret") is not None:
                    pieces += [match.group("aws_sep") or b"", marker("aws_secret_access_key")]
                    counts["aws_secret_access_key"] += 1
            elif kind == "aws_secret_access_key":
                pieces += [match.group("aws_label"), marker(kind)]
            else:
                pieces.append(marker(kind))
            counts[kind] += 1
            pos = end
        if not pieces:
            return data, False
        pieces.append(data[pos:])
        return b"".join(pieces), False


class RedactingStream:
    """A `Redactor` applied to output arriving in chunks that end anywhere (a PTY's), for one agent run.

    `feed` returns what can be stored now: the complete lines so far, redacted. A partial line waits for its end,
    up to `HOLD` bytes; past that, all of it but the last `TAIL` bytes is redacted and let through (a token is
    shorter than `TAIL`, so none is cut in two). After a private key's BEGIN line, every line up to its END line
    is dropped (up to `KEY_BLOCK_MAX` bytes). `counts` says what was replaced, by kind.
    """

    HOLD = 64 * 1024
    TAIL = 4096

    def __init__(self, redactor: Redactor) -> None:
        self.redactor = redactor
        self.counts: Counter[str] = Counter()
        self._held = bytearray()
        self._in_key = False
        self._key_dropped = 0

    def feed(self, chunk: bytes) -> bytes:
        """The redacted output that `chunk` completes (possibly empty)."""
        newline = chunk.rfind(b"\n")
        if newline < 0:
            self._held += chunk
            if len(self._held) <= self.HOLD:
                return b""
            return self._release(len(self._held) - self.TAIL)
        if self._held:
            self._held += chunk[: newline + 1]
            ready = bytes(self._held)
            self._held.clear()
        else:  # the usual case: no partial line waits, so the chunk's lines are taken without a copy
            ready = chunk if newline == len(chunk) - 1 else chunk[: newline + 1]
        self._held += chunk[newline + 1 :]
        return self._redacted(ready)

    def close(self) -> bytes:
        """What is left at the end of the output, redacted."""
        return self._take(len(self._held))

    def _release(self, cut: int) -> bytes:
        """Redact the held bytes and let through those up to `cut` (or the end of a secret that crosses it)."""
        data = bytes(self._held)
        # A secret that begins before the cut is let through whole, so it is redacted whole.
        for match in self.redactor.matches(data, max(0, cut - self.TAIL)):
            if match.start() >= cut:
                break
            cut = max(cut, match.end())
        del self._held[:]
        self._held += data[cut:]
        return self._redacted(data[:cut])

    def _take(self, size: int) -> bytes:
        data = bytes(self._held[:size])
        del self._held[:size]
        return self._redacted(data)

    def _redacted(self, data: bytes) -> bytes:
        if self._in_key:
            end = _END_OF_KEY.search(data)
            if end is None:
                self._key_dropped += len(data)
                if self._key_dropped > KEY_BLOCK_MAX:
                    self._in_key = False  # no END came: what followed the BEGIN is gone, what comes next is kept
                return b""
            self._in_key = False
            data = data[end.end() :]
        out, self._in_key = self.redactor._redact(data, self.counts, streaming=True)
        self._key_dropped = 0
        return out


def known_secrets(
    profiles_env: Iterable[tuple[Mapping[str, str], Iterable[str]]],
    *,
    environ: Mapping[str, str] | None = None,
    nats_passwords: Iterable[str | None] = (),
    signing_keys: Iterable[bytes] = (),
) -> dict[str, set[str]]:
    """Every secret value the daemon knows, by name: the one place they are gathered (one line per source).

    `profiles_env` gives each agent profile's `env` and the names it marks secret (`secret_env`); a secret name
    is looked up in the profile's `env`, then in the daemon's own environment (what agents inherit).
    """
    environ = os.environ if environ is None else environ
    found: dict[str, set[str]] = {}

    def add(name: str, value: str | None) -> None:
        if value:
            found.setdefault(name, set()).add(value)

    for name in DEFAULT_SECRET_ENV:
        add(name, environ.get(name))
    for env, secret_names in profiles_env:
        for name in {*secret_names, *DEFAULT_SECRET_ENV}:
            add(name, env.get(name) or environ.get(name))
    for password in nats_passwords:
        add("nats_password", password)
    for key in signing_keys:
        add("signing_key", key.hex())
    return found
