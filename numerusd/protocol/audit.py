"""The auditor: verifies a stream of events against the keys, alone, without trusting the daemon.

Pure: it takes `(stream_seq, subject, wire_bytes)` records in stream order and a `{kid: secret}` key map, and
returns an `AuditReport` listing every problem it can prove, each naming the event (seq, id, job, type). Both
`numerusctl audit verify` and any other tool can use it; nothing here does I/O or reads a clock.

What it checks, per event: the envelope decodes and its payload fits its type (`malformed`), the key id is known
(`unknown_key`), the HMAC holds (`bad_signature`), the subject is the one the event's job, task and type give
(`subject_mismatch`), the writer's epoch is not lower than one seen earlier in the stream (`stale_epoch`: written
by a daemon that had lost its lease); then across events, per job, that `prev` links every event to the one before it
(`chain_break`, with a cause: `deleted`, `inserted`, `reordered`, `duplicate`, `invalid_predecessor`,
`cross_job`), and, when told what to expect, that the job's tail is all there (`truncated`).
See docs/audit.md for what each means and what cannot be detected.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from numerusd.protocol.envelope import EpochFence, InvalidEvent, check_signature, decode_wire, digest
from numerusd.protocol.events import EVENT_TYPES
from numerusd.protocol.subjects import job_event, job_of

#: Job events after which a job does nothing more (unless it is resumed, which appends after them).
TERMINAL_JOB_EVENTS = frozenset({"JobCompleted", "JobFailed", "JobKilled", "JobInterrupted"})
#: Records of what users did with an ended job after its terminal event (`numerusctl clean`, `accept`,
#: `discard`): they do not reopen it, so a job whose chain ends with terminal event then these is still `finished`.
AFTER_END_EVENTS = frozenset({"JobCleaned", "JobAccepted", "JobDiscarded"})

#: Problem kinds, and the causes a `chain_break` can carry.
KINDS = ("malformed", "unknown_key", "bad_signature", "subject_mismatch", "stale_epoch", "chain_break", "truncated")
CAUSES = ("deleted", "inserted", "reordered", "duplicate", "invalid_predecessor", "cross_job")

_data_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}
_loose_decoder = msgspec.json.Decoder()


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """One thing wrong with the stream, naming the event it was found at (as far as it can be read)."""

    kind: str
    message: str
    cause: str | None = None
    seq: int | None = None
    id: str | None = None
    job: str | None = None
    type: str | None = None

    def line(self) -> str:
        """One line for a terminal: where, what, why."""
        where = " ".join(
            f"{name}={value}"
            for name, value in (("seq", self.seq), ("id", self.id), ("job", self.job), ("type", self.type))
            if value is not None
        )
        what = f"{self.kind} ({self.cause})" if self.cause else self.kind
        return f"{where or '-'}: {what}: {self.message}"


class JobAudit(msgspec.Struct, frozen=True, kw_only=True):
    """What the auditor saw of one job: its verified events and where its chain ends.

    `tail` is `finished` when the chain ends with a terminal job event, `truncated` when a tail was expected
    and is missing (see `verify`), and `open` otherwise: a running job, or one whose last events were deleted,
    which the stream alone cannot tell apart.
    """

    job: str
    events: int
    first_seq: int
    last_seq: int
    head: str
    head_seq: int
    head_type: str
    tail: str


class AuditReport(msgspec.Struct, frozen=True, kw_only=True):
    """The outcome: how many events were read, the problems found, and a summary per job."""

    events: int
    verified: int
    problems: list[Problem]
    jobs: list[JobAudit]
    unknown_types: int = 0

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


class _Node:
    """One verified event's place in its job's chain."""

    __slots__ = ("before", "digest", "id", "job", "order", "prev", "seq", "type")

    def __init__(
        self, order: int, seq: int, id: str, job: str, type: str, prev: str, digest: str, before: _Seen | None
    ) -> None:
        self.order = order
        self.seq = seq
        self.id = id
        self.job = job
        self.type = type
        self.prev = prev
        self.digest = digest
        self.before = before  # the job's previous event in stream order, verified or not


class _Seen:
    """The last event of a job seen in stream order, and whether it verified."""

    __slots__ = ("id", "seq", "valid")

    def __init__(self, seq: int, id: str, valid: bool) -> None:
        self.seq = seq
        self.id = id
        self.valid = valid


def _short(digest_hex: str) -> str:
    return digest_hex[:12] if digest_hex else "(none)"


class Auditor:
    """Feed it records in stream order, then ask for the report; holds a few fields per event, not the bytes."""

    def __init__(
        self,
        keys: Mapping[str, bytes],
        *,
        expected_heads: Mapping[str, str] | None = None,
        assume_finished: bool = False,
    ) -> None:
        self._keys = dict(keys)
        self._expected_heads = dict(expected_heads or {})
        self._assume_finished = assume_finished
        self._problems: list[Problem] = []
        self._nodes: list[_Node] = []
        self._by_digest: dict[str, _Node] = {}
        self._ids: dict[str, int] = {}
        self._last_of_job: dict[str, _Seen] = {}
        self._events = 0
        self._unknown_types = 0
        self._fence = EpochFence()

    def feed(self, seq: int, subject: str, wire: bytes) -> None:
        """Check one event and remember its place in its job's chain."""
        self._events += 1
        try:
            env = decode_wire(wire)
        except InvalidEvent as e:
            self._malformed(seq, subject, wire, str(e))
            return
        except UnicodeDecodeError as e:  # msgspec raises it, unwrapped, for invalid UTF-8 inside a string
            self._malformed(seq, subject, wire, f"not an event envelope: {e}")
            return
        job = env.job
        before = self._last_of_job.get(job)
        self._last_of_job[job] = _Seen(seq, env.id, valid=False)
        try:
            check_signature(wire, self._keys, env.kid)
            self._fence.admit(env)
        except InvalidEvent as e:
            self._problem(seq, env, e.reason, str(e))
            return
        cls = EVENT_TYPES.get(env.type)
        if cls is None:
            self._unknown_types += 1  # signed by a newer daemon: its chain and subject still count
        else:
            if (env.task is not None) != cls.TASK_EVENT:
                need = "needs a task id" if cls.TASK_EVENT else "takes no task id"
                self._problem(seq, env, "malformed", f"{env.type} {need}")
                return
            try:
                _data_decoders[env.type].decode(env.data)
            except (msgspec.DecodeError, UnicodeDecodeError) as e:
                self._problem(seq, env, "malformed", f"payload: {e}")
                return
        # An event type newer than this auditor still has a known subject: it is built from the name alone.
        expected = job_event(job, env.type, env.task)
        if subject != expected:
            self._problem(seq, env, "subject_mismatch", f"published on {subject}, its content says {expected}")
        first = self._ids.get(env.id)
        if first is not None:
            self._problem(seq, env, "chain_break", f"the same event id was already stored at seq {first}", "duplicate")
            return
        self._ids[env.id] = seq
        self._last_of_job[job].valid = True
        node = _Node(len(self._nodes), seq, env.id, job, env.type, env.prev, digest(wire), before)
        self._nodes.append(node)
        # Only a byte-identical copy could share a digest, and it has the same id, so digests are unique here.
        self._by_digest[node.digest] = node

    def _problem(self, seq: int, env: Any, kind: str, message: str, cause: str | None = None) -> None:
        self._problems.append(
            Problem(kind=kind, message=message, cause=cause, seq=seq, id=env.id, job=env.job, type=env.type)
        )

    def _malformed(self, seq: int, subject: str, wire: bytes, why: str) -> None:
        # Name the event as well as its bytes allow: a forged event is often JSON with an id, just unsigned.
        fields: dict[str, object] = {}
        try:
            loose = _loose_decoder.decode(wire)
            if isinstance(loose, dict):
                fields = loose
        except (msgspec.DecodeError, UnicodeDecodeError):
            pass

        def text(key: str) -> str | None:
            value = fields.get(key)
            return value if isinstance(value, str) else None

        self._problems.append(
            Problem(
                kind="malformed",
                message=why,
                seq=seq,
                id=text("id"),
                job=text("job") or job_of(subject),
                type=text("type"),
            )
        )

    def report(self) -> AuditReport:
        """Resolve the chains (a link may point forward in the stream) and say what holds and what does not."""
        problems = list(self._problems)
        children: dict[tuple[str, str], list[_Node]] = {}
        for node in self._nodes:
            name = {"seq": node.seq, "id": node.id, "job": node.job, "type": node.type}
            if not node.prev:
                children.setdefault((node.job, ""), []).append(node)
                continue
            parent = self._by_digest.get(node.prev)
            if parent is None:
                problems.append(self._dangling(node))
            elif parent.job != node.job:
                problems.append(
                    Problem(
                        kind="chain_break",
                        cause="cross_job",
                        message=f"prev is seq {parent.seq} ({parent.id}) of another job, {parent.job}",
                        **name,
                    )
                )
            else:
                children.setdefault((node.job, node.prev), []).append(node)
                if parent.order > node.order:
                    problems.append(
                        Problem(
                            kind="chain_break",
                            cause="reordered",
                            message=f"its predecessor seq {parent.seq} ({parent.id}) comes later in the stream",
                            **name,
                        )
                    )
        problems.extend(self._forks(children))
        jobs: dict[str, list[_Node]] = {}
        for node in self._nodes:
            jobs.setdefault(node.job, []).append(node)
        tail_problems, truncated = self._tails(jobs)
        problems.extend(tail_problems)
        problems.sort(key=lambda p: (p.seq is None, p.seq or 0))
        return AuditReport(
            events=self._events,
            verified=len(self._nodes),
            problems=problems,
            jobs=[self._summary(nodes, truncated) for nodes in jobs.values()],
            unknown_types=self._unknown_types,
        )

    def _dangling(self, node: _Node) -> Problem:
        name = {"seq": node.seq, "id": node.id, "job": node.job, "type": node.type}
        before = node.before
        if before is not None and not before.valid:
            return Problem(
                kind="chain_break",
                cause="invalid_predecessor",
                message=(
                    f"prev {_short(node.prev)} matches no verified event; the job's previous event, "
                    f"seq {before.seq} ({before.id}), failed verification and is probably the one it follows"
                ),
                **name,
            )
        after = f"the job's previous event is seq {before.seq} ({before.id})" if before else "it is the job's first"
        return Problem(
            kind="chain_break",
            cause="deleted",
            message=f"prev {_short(node.prev)} matches no event in the stream and {after}: an event is missing",
            **name,
        )

    def _forks(self, children: dict[tuple[str, str], list[_Node]]) -> list[Problem]:
        """Two events claiming the same predecessor: the one whose chain goes on further is taken as genuine."""
        problems: list[Problem] = []
        sizes: dict[str, int] = {}
        for (job, _prev), kids in children.items():
            if len(kids) < 2:
                continue
            # Ties go to the earliest in the stream: an inserted event is usually the later copy.
            ranked = sorted(kids, key=lambda n: (-self._subtree(n, job, children, sizes), n.order))
            genuine = ranked[0]
            for node in ranked[1:]:
                what = "the job's first event" if not node.prev else f"event {_short(node.prev)}"
                problems.append(
                    Problem(
                        kind="chain_break",
                        cause="inserted",
                        message=(f"forks the chain: seq {genuine.seq} ({genuine.id}) also claims to follow {what}"),
                        seq=node.seq,
                        id=node.id,
                        job=node.job,
                        type=node.type,
                    )
                )
        return problems

    @staticmethod
    def _subtree(root: _Node, job: str, children: dict[tuple[str, str], list[_Node]], sizes: dict[str, int]) -> int:
        """How many events follow `root` in its job's chain, itself included (iterative: chains are long)."""
        stack = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node.digest in sizes:
                continue
            kids = children.get((job, node.digest), [])
            if expanded:
                sizes[node.digest] = 1 + sum(sizes[k.digest] for k in kids)
            else:
                stack.append((node, True))
                stack.extend((k, False) for k in kids if k.digest not in sizes)
        return sizes[root.digest]

    def _head(self, nodes: list[_Node]) -> _Node:
        # The head is the last event in the stream that nothing follows; after a fork or a gap there may be
        # several candidates, but those cases are already reported.
        followed = {n.prev for n in nodes}
        for node in reversed(nodes):
            if node.digest not in followed:
                return node
        return nodes[-1]

    def _ending(self, head: _Node) -> _Node:
        """The event that says whether a job ended: its head, or the last event before the housekeeping
        (AFTER_END_EVENTS) recorded at its end of the chain."""
        node = head
        while node.type in AFTER_END_EVENTS and (before := self._by_digest.get(node.prev)) is not None:
            node = before
        return node

    def _tails(self, jobs: dict[str, list[_Node]]) -> tuple[list[Problem], set[str]]:
        """Tails that should be there and are not; returns the problems and the jobs they concern."""
        problems: list[Problem] = []
        truncated: set[str] = set()
        for job, expected in self._expected_heads.items():
            nodes = jobs.get(job)
            if not nodes:
                problems.append(
                    Problem(
                        kind="truncated",
                        message=f"no verified event of this job, expected its head {_short(expected)}",
                        job=job,
                    )
                )
                truncated.add(job)
                continue
            if not any(n.digest == expected for n in nodes):
                head = self._head(nodes)
                problems.append(
                    Problem(
                        kind="truncated",
                        message=(
                            f"expected head {_short(expected)} is not in the stream; the chain ends at "
                            f"seq {head.seq} ({head.id}, {head.type})"
                        ),
                        job=job,
                    )
                )
                truncated.add(job)
        if self._assume_finished:
            for job, nodes in jobs.items():
                head = self._head(nodes)
                if self._ending(head).type not in TERMINAL_JOB_EVENTS and job not in truncated:
                    problems.append(
                        Problem(
                            kind="truncated",
                            message=(
                                f"the chain ends at seq {head.seq} ({head.id}, {head.type}), not at a terminal "
                                "job event (or one followed only by JobCleaned, JobAccepted or JobDiscarded), "
                                "although the job was said to be finished"
                            ),
                            job=job,
                        )
                    )
                    truncated.add(job)
        return problems, truncated

    def _summary(self, nodes: list[_Node], truncated: set[str]) -> JobAudit:
        head = self._head(nodes)
        job = head.job
        if job in truncated:
            tail = "truncated"
        elif self._ending(head).type in TERMINAL_JOB_EVENTS:
            tail = "finished"
        else:
            tail = "open"
        return JobAudit(
            job=job,
            events=len(nodes),
            first_seq=nodes[0].seq,
            last_seq=nodes[-1].seq,
            head=head.digest,
            head_seq=head.seq,
            head_type=head.type,
            tail=tail,
        )


def verify(
    records: Iterable[tuple[int, str, bytes]],
    keys: Mapping[str, bytes],
    *,
    expected_heads: Mapping[str, str] | None = None,
    assume_finished: bool = False,
) -> AuditReport:
    """Audit `(stream_seq, subject, wire)` records given in stream order.

    `keys` maps key ids to secrets. `expected_heads` maps a job to the digest its chain must reach (recorded by
    the auditor earlier, e.g. from `JobAudit.head`): without it, deleting a job's last events cannot be told
    from a job still running. `assume_finished` says every job is over, so a chain that does not end with a
    terminal job event is reported as truncated.
    """
    auditor = Auditor(keys, expected_heads=expected_heads, assume_finished=assume_finished)
    for seq, subject, wire in records:
        auditor.feed(seq, subject, wire)
    return auditor.report()
