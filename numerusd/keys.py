"""The HMAC keys events are signed with: a small JSON keyring file, created once, readable by its owner only.

    {"current": "k20250101-3fa2", "keys": {"k20250101-3fa2": "<64 hex digits>"}}

`current` names the key new events are signed with; every key stays in `keys` so events signed before a
rotation still verify (`rotated`: a new current key, the old ones kept; `numerusd keys rotate`). The daemon
creates the file on first start (`load_or_create`); an auditor reads a copy (`load`, e.g. `numerusctl audit
verify --key-file`). Secrets never appear in a repr, a log line or an error message.
"""

from __future__ import annotations

import json
import os
import secrets
from datetime import UTC, datetime
from pathlib import Path

from numerusd.errors import ConfigError

KEY_BYTES = 32


def new_kid(now: datetime | None = None) -> str:
    """A key id like `k20250101-3fa2`: the creation day, then four random hex digits."""
    day = (now or datetime.now(UTC)).strftime("%Y%m%d")
    return f"k{day}-{secrets.token_hex(2)}"


class Keyring:
    """The signing keys by key id, and which one signs new events. Holds secrets: never printed."""

    __slots__ = ("_current", "_keys", "path")

    def __init__(self, current: str, keys: dict[str, bytes], path: Path | None = None) -> None:
        if current not in keys:
            raise ConfigError(f"keyring {path or ''}: current key id {current!r} is not among its keys")
        self._current = current
        self._keys = dict(keys)
        self.path = path

    @property
    def current_kid(self) -> str:
        """The id of the key that signs new events."""
        return self._current

    @property
    def current_key(self) -> bytes:
        """The secret of the key that signs new events."""
        return self._keys[self._current]

    @property
    def keys(self) -> dict[str, bytes]:
        """Every key by id (a copy), as `open_event` and `check_signature` take them."""
        return dict(self._keys)

    def __repr__(self) -> str:
        return f"Keyring(current={self._current!r}, kids={sorted(self._keys)!r}, path={self.path!r})"

    __str__ = __repr__

    @classmethod
    def generate(cls, path: Path | None = None) -> Keyring:
        """A keyring with one fresh random key (not written anywhere)."""
        kid = new_kid()
        return cls(kid, {kid: secrets.token_bytes(KEY_BYTES)}, path)

    def rotated(self) -> Keyring:
        """This keyring with a fresh key that signs from now on; every older key stays, to verify older events."""
        kid = new_kid()
        while kid in self._keys:  # two rotations on one day may draw the same four hex digits
            kid = new_kid()
        return Keyring(kid, {**self._keys, kid: secrets.token_bytes(KEY_BYTES)}, self.path)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        """Read a keyring file; raise ConfigError naming the file and what is wrong with it.

        The file's permissions are not checked here: an auditor may legitimately hold a copy with other
        permissions, and refusing it would only push them to weaken the daemon's own copy. The daemon
        creates its file 0600 (see `load_or_create`).
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ConfigError(f"key file {path} does not exist", path=str(path)) from e
        except OSError as e:
            raise ConfigError(f"cannot read key file {path}: {e.strerror}", path=str(path)) from e
        try:
            doc = json.loads(text)
            current = doc["current"]
            raw = doc["keys"]
            if not isinstance(current, str) or not isinstance(raw, dict) or not raw:
                raise ValueError
            keys = {str(kid): bytes.fromhex(secret) for kid, secret in raw.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            # Deliberately not chained: a parse error's text could quote part of a secret.
            raise ConfigError(
                f'key file {path} is not a Numerus keyring (expected {{"current": kid, "keys": {{kid: hex}}}})',
                path=str(path),
            ) from None
        if any(len(key) < 16 for key in keys.values()):
            raise ConfigError(f"key file {path} holds a key shorter than 16 bytes", path=str(path))
        return cls(current, keys, path)

    @classmethod
    def load_or_create(cls, path: Path) -> Keyring:
        """Read the keyring at `path`, or create it there (mode 0600, never wider) with one new key."""
        path = Path(path)
        if path.exists():
            return cls.load(path)
        ring = cls.generate(path)
        ring.save(path)
        return ring

    def save(self, path: Path) -> None:
        """Write the keyring to `path` atomically; the file is created 0600 and never exists wider."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"current": self._current, "keys": {kid: key.hex() for kid, key in self._keys.items()}}
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        # Created with 0600 from the first byte, so there is no window in which others could read it.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as out:
                json.dump(doc, out)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
