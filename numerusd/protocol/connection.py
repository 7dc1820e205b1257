"""`connection.json`: how numerusctl, or any other tool, reaches a running numerusd.

numerusd writes it in its state directory when it starts (`numerusd.config.write_connection_file`: mode 0600,
since it holds a password, and replaced atomically); numerusctl reads it unless it is given `--nats-url`.
One Struct, one encoder, one decoder, so the two sides cannot disagree on its shape::

    {"url": "nats://127.0.0.1:41221", "user": "operator", "password": "…", "pid": 12345,
     "roles": {"operator": {"user": "operator", "password": "…"}, "viewer": {"user": "viewer", "password": "…"}}}

`url` is one server's, or with a cluster the nodes' URLs, comma separated (`server_urls` splits them), as numerusd
was given them in `nats_url`: a client reaches any node that is up, whichever the daemon is connected to.

`roles` holds the login of each client role of the embedded server (`numerusd/bus_roles.py`): never the
daemon's own. `user`/`password` are the default role's (operator), for tools that know no roles; with an
external server they are what the daemon was given, and `roles` is empty.

`worker.json` (`WORKER_FILE_NAME`), beside it, has the same shape: what `numerusd worker --connection` reads. The
daemon writes it (0600, replaced atomically) when it runs the embedded server: `user` is `worker`, with the password
of that server's worker user (`numerusd/bus_roles.py`), and `roles` is empty. With an external server it writes
none: the operator provisions the workers' user there (`deploy/nats-server.conf`).

It evolves by msgspec's rules: a new member gets a default, and a reader ignores members it does not know.
"""

from __future__ import annotations

import msgspec

#: Its name in the state directory.
FILE_NAME = "connection.json"
#: The workers' connection file in the state directory (the embedded server only).
WORKER_FILE_NAME = "worker.json"

#: The roles a client logs in as (numerusctl's `--role`), the default first; what each may do:
#: `numerusd/bus_roles.py`.
CLIENT_ROLES = ("operator", "viewer")


def inbox_prefix(role: str) -> str:
    """Where a client of `role` gets its replies and its consumers' deliveries (`_INBOX_<role>`): its own, so that
    one role never reads what another was answered, nor the daemon's JetStream acknowledgements."""
    return f"_INBOX_{role}"


#: The header in which numerusctl names the OS user who asked; the daemon records it with the bus role it asked as.
USER_HEADER = "Numerus-User"
#: The header of a request's W3C trace context (numerusctl: `$TRACEPARENT`); the daemon keeps a W3C-shaped one only.
TRACE_HEADER = "traceparent"


def asker(user: str | None, reply_subject: str | None) -> str:
    """Who asked, as recorded in events (`alice (operator)`): the OS user the client names (`USER_HEADER`, taken
    on its word, cut to one short token) and the bus role its reply inbox proves (a role may read only its own,
    see `inbox_prefix`); `?` for what is not known."""
    name = "".join(c for c in (user or "")[:64] if c.isalnum() or c in "._-@") or "?"
    role = "?"
    for candidate in CLIENT_ROLES:
        if (reply_subject or "").startswith(inbox_prefix(candidate) + "."):
            role = candidate
    return f"{name} ({role})"


def server_urls(url: str) -> list[str]:
    """The servers a `url` names: one, or the nodes of a cluster given comma separated (`nats://a:4222,nats://b:4222`),
    in their order, as nats-py's `servers` takes them."""
    return [part.strip() for part in url.split(",") if part.strip()]


class RoleLogin(msgspec.Struct, frozen=True, kw_only=True):
    """The user and password of one client role."""

    user: str
    password: str

    def __repr__(self) -> str:
        return f"RoleLogin(user={self.user!r}, password=<set>)"


class ConnectionInfo(msgspec.Struct, frozen=True, kw_only=True):
    """Where the daemon's NATS server is, as whom to log in, and the daemon's pid (to tell a stale file)."""

    url: str
    user: str | None = None
    password: str | None = None
    pid: int | None = None
    #: The login of each client role (`operator`, `viewer`), by role.
    roles: dict[str, RoleLogin] = {}

    def __repr__(self) -> str:
        # The password must never reach a log line or a traceback; show only whether there is one.
        password = "<set>" if self.password else None
        return (
            f"ConnectionInfo(url={self.url!r}, user={self.user!r}, password={password}, pid={self.pid!r}, "
            f"roles={sorted(self.roles)!r})"
        )


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ConnectionInfo)


def encode_connection(info: ConnectionInfo) -> bytes:
    """The file's bytes: one JSON object, every member present (null when unset)."""
    return _encoder.encode(info)


def decode_connection(data: bytes) -> ConnectionInfo:
    """The file's contents; `msgspec.DecodeError` (a `ValidationError` naming the path) when it is not one."""
    return _decoder.decode(data)
