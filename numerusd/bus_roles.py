"""Who may do what on the bus: the NATS permissions of numerusctl's roles, `operator` and `viewer`.

The daemon logs in as its own user with every right (it creates the streams and is the only writer of
`numerus.job.>`, `numerus.log.>` and `numerus.dlq.>`). A client never gets those rights: whoever holds a
client's password (an agent that read it somewhere, a script) can ask the daemon to do what the role allows and
read the streams, and nothing else. In particular no client may delete, purge or update a stream, delete a
message, publish an event, a log chunk or a dead letter, or write the lease of the streams (`$KV.NUMERUS_LEASE.>`,
numerusd/lease.py): those JetStream API subjects and stream subjects are in no allow list, and NATS refuses what
is not allowed.

The lists hold exactly the subjects numerusctl uses (found with the server's trace log) and the service's
discovery requests:

* `numerus.cmd.<verb>`: each request the role may send (the viewer only those that read);
* `$SRV.PING|INFO|STATS[.numerus[.<id>]]`: `nats micro ls`/`info`/`stats` of the `numerus` service, and
  `numerusctl ping` (a container's health check, which needs no more than a viewer's login);
* `$JS.API.CONSUMER.CREATE.<stream>` and `$JS.API.CONSUMER.INFO.<stream>.*`: the ordered consumers that follow
  and audit (`numerusctl/feed.py`), on NUMERUS_EVENTS and NUMERUS_LOGS only (not the dead letters);
* `numerus.input.>` (the operator only): what `numerusctl attach` types into a running agent's terminal; a viewer
  watches an agent and never types into it;
* `$JS.FC.<stream>.>`: the answers to the flow-control messages of those consumers on a long read;
* subscribing `_INBOX_<role>.>` only: its replies and its consumers' deliveries (numerusctl takes that inbox
  prefix). A client cannot subscribe to `numerus.cmd.>`, so it cannot pose as the daemon's service, nor to
  another role's inbox or the daemon's (`_INBOX.>`), so it reads no reply meant for someone else.

`deploy/nats-server.conf` lists the same permissions for a shared server (a test keeps the two equal).
"""

from __future__ import annotations

from numerusd.protocol import subjects
from numerusd.protocol.commands import REPLIES
from numerusd.protocol.connection import CLIENT_ROLES, inbox_prefix

#: The client roles, the default (numerusctl's `--role`) first.
ROLES = CLIENT_ROLES

#: The requests that only read; a viewer may send these and no other.
READ_VERBS = ("status", "plan", "logs", "events", "diff", "workers")

#: The streams a client may read with its own consumers.
READABLE_STREAMS = (subjects.EVENTS, subjects.LOGS)

#: `nats micro ls`, `info` and `stats` of the `numerus` service.
_DISCOVERY = tuple(
    subject
    for verb in ("PING", "INFO", "STATS")
    for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{subjects.SERVICE}", f"$SRV.{verb}.{subjects.SERVICE}.*")
)

_READS = tuple(
    subject
    for stream in READABLE_STREAMS
    for subject in (f"$JS.API.CONSUMER.CREATE.{stream}", f"$JS.API.CONSUMER.INFO.{stream}.*", f"$JS.FC.{stream}.>")
)


def verbs(role: str) -> tuple[str, ...]:
    """The requests `role` may send: every verb for the operator, the reading ones for the viewer."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    return tuple(REPLIES) if role == "operator" else READ_VERBS


def permissions(role: str) -> dict[str, dict[str, list[str]]]:
    """The NATS `permissions` block of a client role (allow lists: anything not listed is refused)."""
    publish = [subjects.command(verb) for verb in verbs(role)] + list(_DISCOVERY) + list(_READS)
    if role == "operator":
        publish.append(subjects.INPUTS)
    return {"publish": {"allow": publish}, "subscribe": {"allow": [f"{inbox_prefix(role)}.>"]}}
