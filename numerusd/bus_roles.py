"""Who may do what on the bus: the NATS permissions of numerusctl's roles, `operator` and `viewer`, and of workers.

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

The `worker` role is not numerusctl's: it is the login of `numerusd worker` (numerusd/worker.py, the wire protocol
in numerusd/protocol/work.py), and it may do exactly what a worker does (found with the server's trace log of
nats-py's calls, as for the clients):

* `numerus.worker.*.take|report|heartbeat`: its requests to the daemon, answered on its inbox. Every worker of a
  server shares this user, so one worker could send requests in another's name: what fences an attempt is its
  lease, a random token only the worker that was offered the attempt holds (protocol/work.py);
* `$JS.API.CONSUMER.MSG.NEXT.NUMERUS_WORK.*` and `$JS.ACK.NUMERUS_WORK.>`: pull the offers of the pools' durable
  consumers and acknowledge them. The daemon makes those consumers (`pool-<pool>`; a NATS wildcard matches whole
  tokens only, so `pool-*` cannot be written: `*` is any consumer of the stream, and the daemon makes no other);
  the worker binds to them (`pull_subscribe_bind`), which asks for no consumer INFO;
* the object store bucket `NUMERUS_BUNDLES` (stream `OBJ_NUMERUS_BUNDLES`): `$O.NUMERUS_BUNDLES.>` (put: the
  chunks, then the object's description), `$JS.API.STREAM.INFO.OBJ_NUMERUS_BUNDLES` (open the bucket),
  `$JS.API.STREAM.MSG.GET.OBJ_NUMERUS_BUNDLES` (an object's description), `$JS.API.STREAM.NAMES`,
  `$JS.API.CONSUMER.CREATE.OBJ_NUMERUS_BUNDLES` and `$JS.FC.OBJ_NUMERUS_BUNDLES.>` (get: the ordered consumer that
  reads an object's chunks, and the answers to its flow control). Not `$JS.API.STREAM.PURGE`, which only a put
  over an existing name needs (to drop the old chunks): a worker writes its attempt's `result_object`, a name of
  its own, once. Any worker may still write any object of the bucket (an object's subjects carry no pool or
  lease), even empty it with a `Nats-Rollup: all` header, which no permission refuses: what it fetches is checked
  by git's object ids (the offer names `base_sha`), what it sends back is verified by the daemon as a local
  agent's work is, so a hostile worker can make tasks fail or run again, not change what is merged;
* subscribing `_INBOX_worker.>` only (the worker's inbox prefix): its replies, its offers, its objects' chunks.

So a worker cannot publish an event, a log chunk, a dead letter, a snapshot, a command, an offer
(`numerus.work.>`: only the daemon offers work) or the lease of the streams; cannot create, delete, purge or
update a stream or a consumer but the object store's readers, nor delete a message; cannot read the event, log,
dead-letter or snapshot streams; and cannot subscribe to `numerus.>` (to pose as the daemon) or another's inbox.

`deploy/nats-server.conf` lists the same permissions for a shared server (a test keeps the two equal).
"""

from __future__ import annotations

from numerusd.protocol import subjects, work
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


#: The login of `numerusd worker`: not a client role of numerusctl (it sends no command).
WORKER_ROLE = "worker"

_BUNDLES_STREAM = f"OBJ_{work.BUNDLES_BUCKET}"  # the stream nats-py's object store keeps the bucket in


def worker_permissions() -> dict[str, dict[str, list[str]]]:
    """The NATS `permissions` block of the worker role (allow lists: anything not listed is refused)."""
    publish = [work.worker_subject("*", kind) for kind in ("take", "report", "heartbeat")]
    publish += [f"$JS.API.CONSUMER.MSG.NEXT.{work.WORK_STREAM}.*", f"$JS.ACK.{work.WORK_STREAM}.>"]
    publish += [
        f"$O.{work.BUNDLES_BUCKET}.>",
        f"$JS.API.STREAM.INFO.{_BUNDLES_STREAM}",
        f"$JS.API.STREAM.MSG.GET.{_BUNDLES_STREAM}",
        "$JS.API.STREAM.NAMES",
        f"$JS.API.CONSUMER.CREATE.{_BUNDLES_STREAM}",
        f"$JS.FC.{_BUNDLES_STREAM}.>",
    ]
    return {"publish": {"allow": publish}, "subscribe": {"allow": [f"{inbox_prefix(WORKER_ROLE)}.>"]}}
