"""How numerusctl shows replies to a person: aligned plain-text tables of jobs and tasks, plans, what was done.

Pure functions from the protocol's reply types to text; the commands decide where it goes. Machines get
`--json` instead, so nothing here is a format to parse. Events have their own module, `render_events.py`,
which the commands that show no event never import.

Text an agent wrote (messages, reasons, goals, terminal output) reaches the operator's terminal, so everything
numerusctl prints as text goes through `visible`: control characters but newline and tab are shown escaped
(`\x1b[2J`), so an agent cannot clear the screen, set the window title or hide lines behind a carriage return.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING

from numerusd.protocol.commands import (
    AcceptReply,
    ApproveReply,
    CleanedJob,
    CleanReply,
    DiffReply,
    DiscardReply,
    JobView,
    KillReply,
    PauseReply,
    PlanReply,
    RejectReply,
    ResumeReply,
    RetryReply,
    SkipReply,
    StartReply,
    TaskView,
    WorkersReply,
)

if TYPE_CHECKING:
    from numerusctl.ping import Pong

#: Longest one-line summary of an event before it is cut.
SUMMARY_WIDTH = 100
#: Longest goal and repository path shown in the jobs table.
GOAL_WIDTH = 60
REPO_WIDTH = 30
#: How much of a plan hash or a commit is shown: enough to tell them apart, as git does.
HASH_WIDTH = 8
SHA_WIDTH = 7


#: C0 controls but tab and newline, DEL and the C1 controls, each shown as `\xNN`; and the bidirectional
#: overrides and isolates, shown as `\uNNNN`: in a diff under review they would reorder what is read (Trojan Source).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c not in (0x09, 0x0A)} | {
    c: f"\\u{c:04x}" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def visible(text: str) -> str:
    """`text` with its control characters escaped (`\x1b`), tabs and newlines kept, `\r\n` read as `\n`."""
    return text.replace("\r\n", "\n").translate(_CONTROLS)


class VisibleStream:
    """`visible` for a stream of terminal output in chunks that end anywhere (inside a character, or between
    the `\r` and `\n` of a line end)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._carriage = False

    def feed(self, data: bytes, final: bool = False) -> str:
        """The escaped text of `data`; a trailing `\r` waits for the next chunk unless `final`."""
        text = self._decoder.decode(data, final)
        if self._carriage:
            text = "\r" + text
        self._carriage = text.endswith("\r") and not final
        return visible(text[:-1] if self._carriage else text)


#: The colours task names take on a terminal, in turn (ANSI: red, green, yellow, blue, magenta, cyan).
_TASK_COLOURS = ("31", "32", "33", "34", "35", "36")


#: A task's unfinished line longer than this is shown as it is (an agent that redraws with `\r` and never ends a
#: line is still followed live), rather than held, and copied again with every chunk, until its end.
PARTIAL_LINE_MAX = 4096


class TaskLines:
    """Terminal output of several tasks, arriving in chunks of each that end anywhere, as lines each after its
    task's name (`t2 | line`), escaped as `visible` does; `colour` colours each task's name its own way."""

    def __init__(self, colour: bool = False) -> None:
        self._colour = colour
        self._streams: dict[str, VisibleStream] = {}
        self._partial: dict[str, str] = {}
        self._prefixes: dict[str, str] = {}

    def feed(self, task: str, data: bytes) -> str:
        """The complete lines that `data`, a chunk of `task`'s output, ends; the rest waits for its line end."""
        stream = self._streams.get(task)
        if stream is None:
            stream = self._streams[task] = VisibleStream()
        *lines, rest = (self._partial.pop(task, "") + stream.feed(data)).split("\n")
        if len(rest) > PARTIAL_LINE_MAX:
            lines.append(rest)
        elif rest:
            self._partial[task] = rest
        return "".join(f"{self._prefix(task)}{line}\n" for line in lines)

    def close(self) -> str:
        """What is left of every task's output: its last line, without a line end of its own."""
        for task, stream in self._streams.items():
            self._partial[task] = self._partial.get(task, "") + stream.feed(b"", final=True)
        left = "".join(f"{self._prefix(task)}{rest}\n" for task, rest in self._partial.items() if rest)
        self._partial.clear()
        return left

    def _prefix(self, task: str) -> str:
        prefix = self._prefixes.get(task)
        if prefix is None:
            name = visible(task)
            colour = _TASK_COLOURS[len(self._prefixes) % len(_TASK_COLOURS)]
            prefix = self._prefixes[task] = f"\x1b[{colour}m{name}\x1b[0m | " if self._colour else f"{name} | "
        return prefix


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell; the last column is left ragged so long text does not pad lines."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    lines = []
    for row in [headers, *rows]:
        cells = [str(cell).ljust(width) for cell, width in zip(row[:-1], widths, strict=False)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return "\n".join(lines)


def cut(text: str, width: int) -> str:
    """One line of at most `width` characters: whitespace runs (newlines too) collapsed, an ellipsis if cut."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def age(now: datetime, then: datetime) -> str:
    """`42s`, `5m`, `3h`, `2d`: how long ago, to one unit."""
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def count(n: int) -> str:
    """`950`, `12.3k`, `4.1M`: a token count at a glance."""
    if n < 1000:
        return str(n)
    if n < 1_000_000:
        return f"{n / 1000:.1f}k"
    return f"{n / 1_000_000:.1f}M"


def local_time(moment: datetime) -> str:
    """An event time in the reader's time zone, to the second."""
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _tokens(task: TaskView) -> int:
    return task.input_tokens + task.output_tokens


def jobs_table(jobs: Sequence[JobView], now: datetime, total: int = 0, cleanable: int = 0, queued: int = 0) -> str:
    """The `status` overview: one line per job, newest first as the daemon sent them (a queued job with its
    position), how many it left out of `total`, how many jobs wait queued, and how many ended jobs keep worktrees
    `clean` would remove."""
    if not jobs:
        return "no jobs"
    rows = [
        [
            job.id,
            _status_word(job),
            job.agent,
            f"{job.tasks_done}/{job.tasks_total}",
            count(job.tokens),
            age(now, job.created),
            visible(short_path(job.repo, REPO_WIDTH)),
            cut(job.goal, GOAL_WIDTH),
        ]
        for job in jobs
    ]
    text = table(["JOB", "STATUS", "AGENT", "TASKS", "TOKENS", "AGE", "REPO", "GOAL"], rows)
    if total > len(jobs):
        text += f"\n\nthe newest {len(jobs)} of {total} jobs; 'numerusctl status --all' lists every one"
    if queued:
        text += f"\n\n{plural(queued, 'job')} queued for an agent slot ('numerusctl start JOB' moves one to the front)"
    if cleanable:
        text += (
            f"\n\n{plural(cleanable, 'ended job')} {'keeps' if cleanable == 1 else 'keep'} the worktrees of tasks that "
            "did not merge; 'numerusctl clean --ended' removes them"
        )
    return text


def short_path(path: str, width: int) -> str:
    """`path` with the home directory as `~`, and cut from its start (`…/work/repo`) to `width` characters: its
    end is what tells repositories apart."""
    home = os.path.expanduser("~")
    if home not in ("", "/") and (path == home or path.startswith(home + "/")):
        path = "~" + path[len(home) :]
    return path if len(path) <= width else "…" + path[-(width - 1) :]


def job_detail(job: JobView, now: datetime) -> str:
    """`status JOB`: the job's fields, then its tasks (for a planned job, how each stands in the pipeline)."""
    fields = [
        ("job", job.id),
        ("status", _status_line(job)),
        ("goal", job.goal),
        ("repo", job.repo),
        ("agent", job.agent),
    ]
    if job.approval is not None:
        fields.append(("waits", approval_line(job.id, job.approval, job.approval_reason)))
    if job.awaiting_tasks:
        first = job.awaiting_tasks[0]
        fields.append(
            ("waits", f"task {', '.join(job.awaiting_tasks)}: 'numerusctl approve {job.id} {first}' or 'reject'")
        )
    if job.planned:
        fields += _plan_fields(job)
    if job.max_tokens is not None or job.task_max_tokens is not None or job.cost is not None:
        fields.append(("budget", _budget_line(job)))
    fields += [
        ("created", f"{local_time(job.created)} ({age(now, job.created)} ago)"),
        ("updated", f"{local_time(job.updated)} ({age(now, job.updated)} ago)"),
        ("events", str(job.events)),
    ]
    if job.cleaned:
        removed = "worktrees, task branches and logs" if job.logs_removed else "worktrees and task branches"
        fields.append(("cleaned", f"{removed} removed ('numerusctl clean')"))
    if job.accepted is not None:
        taken = job.accepted
        where = _accepted(taken.branch, taken.sha, taken.how) + (f", pushed to {taken.pushed}" if taken.pushed else "")
        fields.append(("accepted", where + (f", by {taken.by}" if taken.by else "")))
    if job.discarded:
        fields.append(("branches", "removed with its worktrees ('numerusctl discard')"))
    if job.secrets_redacted:
        fields.append(("secrets", f"{job.secrets_redacted} redacted ('numerusctl events {job.id}' says which)"))
    if job.leftovers:
        kept = f"worktrees and branches of {', '.join(job.leftovers)} ('numerusctl clean {job.id}' removes them)"
        fields.append(("kept", kept))
    if job.unsandboxed:
        roles = ", ".join(job.unsandboxed)
        fields.append(("warning", f'no sandbox for the {roles}: its agent profile says sandbox = "none"'))
    head = "\n".join(f"{name:<8} {value}" for name, value in fields)
    if not job.tasks:
        return head + "\n\nno tasks yet"
    if job.planned:
        return head + "\n\n" + _planned_tasks(job.tasks)
    rows = [
        [
            t.id,
            t.status + (f" ({cut(t.reason, 40)})" if t.reason else ""),
            t.agent,
            str(t.attempt),
            "-" if t.pid is None else str(t.pid),
            "-" if t.exit_code is None else str(t.exit_code),
            count(_tokens(t)),
            cut(t.title, GOAL_WIDTH),
        ]
        for t in job.tasks
    ]
    return head + "\n\n" + table(["TASK", "STATUS", "AGENT", "ATTEMPT", "PID", "EXIT", "TOKENS", "TITLE"], rows)


def _status_word(job: JobView) -> str:
    """A job's status in a table: `queued 2/5` with its position in the queue."""
    if job.queue_position is not None:
        return f"{job.status} {job.queue_position}/{job.queue_length}"
    return job.status


def _status_line(job: JobView) -> str:
    """`queued (3rd of 5)`, `paused (by alice (operator))`, or the status and why; with its priority when set."""
    if job.queue_position is not None:
        line = f"{job.status} ({ordinal(job.queue_position)} of {job.queue_length})"
    elif job.paused_by is not None:
        line = f"{job.status} (by {job.paused_by}; 'numerusctl start {job.id}' lets it go on)"
    else:
        line = job.status + (f" ({job.reason})" if job.reason else "") + (f"; {job.next}" if job.next else "")
    return line + (f", priority {job.priority}" if job.priority else "")


def ordinal(n: int) -> str:
    """`1st`, `2nd`, `3rd`, `4th`, `11th`, `22nd`."""
    suffix = "th" if n % 100 in (11, 12, 13) else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def approval_line(job: str, gate: str, reason: str | None) -> str:
    """What a job awaiting approval waits for, and the commands that answer."""
    what = {"plan": "its plan", "merge": "the merge of its work", "budget": "more tokens"}.get(gate, gate)
    answer = f"'numerusctl approve {job}{' --add-tokens N' if gate == 'budget' else ''}' or 'numerusctl reject {job}'"
    return f"approval of {what}" + (f" ({reason})" if reason else "") + f": {answer}"


def _budget_line(job: JobView) -> str:
    """`12.3k of 50.0k tokens, 8.0k a task; $0.42`: the job's token caps and its cost, as far as known."""
    parts = []
    if job.max_tokens is not None:
        parts.append(f"{count(job.tokens)} of {count(job.max_tokens)} tokens")
    if job.task_max_tokens is not None:
        parts.append(f"{count(job.task_max_tokens)} a task")
    line = ", ".join(parts) or "no token cap"
    return line + (f"; cost {money(job.cost)}" if job.cost is not None else "")


def money(cost: float) -> str:
    """`$0.0042`, `$1.23`: a cost in the price table's unit."""
    return f"${cost:.4f}" if cost < 1 else f"${cost:,.2f}"


def _plan_fields(job: JobView) -> list[tuple[str, str]]:
    """The lines `status JOB` adds for a planned job: its plan, its integration branch, its limits."""
    if job.plan_hash is None:
        plan = "none yet (the planner is at work)" if job.status == "planning" else "none"
    else:
        plan = f"v{job.plan_version}, hash {job.plan_hash[:HASH_WIDTH]} ('numerusctl plan {job.id}' draws it)"
    branch = "not yet created" if job.integration is None else job.integration
    if job.base_sha:
        branch += f" (from {job.base_sha[:SHA_WIDTH]})"
    own = job.input_tokens + job.output_tokens
    tokens = count(job.tokens) + f" ({count(own)} planning)"
    return [("plan", plan), ("branch", branch), ("parallel", str(job.parallel)), ("tokens", tokens)]


def _planned_tasks(tasks: Sequence[TaskView]) -> str:
    """A planned job's tasks: status, attempt and dependencies, then a line on each that failed or retries."""
    rows = [
        [
            t.id,
            _task_status(t),
            str(t.attempt),
            ", ".join(t.deps) or "-",
            t.agent,
            count(_tokens(t)),
            cut(t.title, GOAL_WIDTH),
        ]
        for t in tasks
    ]
    headers = ["TASK", "STATUS", "ATTEMPT", "AFTER", "AGENT", "TOKENS", "TITLE"]
    if any(t.worker or t.pool for t in tasks):  # a job with a pool: where each attempt runs
        headers.insert(2, "WHERE")
        for row, t in zip(rows, tasks, strict=True):
            row.insert(2, _where(t))
    text = table(headers, rows)
    notes = [f"{t.id}: {note}" for t in tasks if (note := _task_note(t))]
    return text + ("\n\n" + "\n".join(notes) if notes else "")


def _where(task: TaskView) -> str:
    """Where a task's attempt runs: `w1@host` (a worker), `pool gpu?` (offered, no worker took it yet), or `-`."""
    if task.worker:
        return visible(task.worker + (f"@{task.host}" if task.host else ""))
    return f"pool {task.pool}?" if task.pool else "-"


def workers_text(reply: WorkersReply) -> str:
    """`numerusctl workers`: one line per worker heard from, then the attempts waiting for one, per pool."""
    if not reply.workers:
        text = "no worker has been heard from (start one: numerusd worker --pool NAME, docs/operations.md)"
    else:
        rows = [
            [
                visible(w.name),
                visible(cut(w.host, 30)) or "-",
                ", ".join(map(visible, w.pools)) or "-",
                f"{len(w.running)}/{w.capacity}",
                "lost" if w.lost else "draining" if w.draining else "up",
                f"{w.heard_s:g} s ago",
                ", ".join(w.running) or "-",
            ]
            for w in reply.workers
        ]
        text = table(["WORKER", "HOST", "POOLS", "BUSY", "STATE", "HEARD", "RUNNING"], rows)
    waiting = [f"{plural(n, 'attempt')} wait for a worker of pool {visible(pool)}" for pool, n in reply.waiting.items()]
    return text + ("\n\n" + "\n".join(waiting) if waiting else "")


def _task_status(task: TaskView) -> str:
    if task.status == "waiting" and task.holders:
        return f"waiting for {', '.join(task.holders)}"
    return task.status


def _task_note(task: TaskView) -> str | None:
    """Why a task is retrying, failed, never ran or cannot merge yet, in one line; None for a task doing fine."""
    if task.status in ("retrying", "failed") and task.feedback:
        more = len(task.feedback) - 1
        return f"{task.status}: {first_line(task.feedback[0])}" + (f" (+{more} more)" if more else "")
    if task.status in ("failed", "skipped", "interrupted") and task.reason:
        return f"{task.status}: {first_line(task.reason)}"
    if task.status == "merging" and task.reason:
        return f"merge waits: {first_line(task.reason)}"
    return None


def first_line(text: str, width: int = SUMMARY_WIDTH) -> str:
    """The first non-empty line of a message (a check's reason is its command, then the output), cut to `width`.

    A line ending with ':' announces what followed it, so the colon goes with what was left out.
    """
    line = next((line for line in text.splitlines() if line.strip()), "")
    return cut(line.rstrip().removesuffix(":"), width)


def plan_text(reply: PlanReply) -> str:
    """`plan JOB`: which plan, the daemon's drawing of it, then where each task stands."""
    head = f"plan v{reply.version} of job {reply.job} (hash {reply.hash[:HASH_WIDTH]})"
    if reply.approval is not None:
        head += f"\n{reply.status}: {approval_line(reply.job, reply.approval, None)}"
    statuses = table(["TASK", "STATUS"], [[task, status] for task, status in reply.statuses.items()])
    drawing = f"{head}\n{reply.rendered.rstrip()}"
    return f"{drawing}\n\n{statuses}" if reply.statuses else drawing


def approve_text(reply: ApproveReply) -> str:
    """What `approve` recorded."""
    if reply.task is not None:
        return f"job {reply.job}: task {reply.task} approved for one more attempt"
    added = f", its cap raised by {count(reply.added_tokens)} tokens" if reply.added_tokens else ""
    return f"job {reply.job}: {reply.gate} approved{added}; the job goes on"


def reject_text(reply: RejectReply) -> str:
    """What `reject` recorded."""
    if reply.task is not None:
        return f"job {reply.job}: task {reply.task} rejected; it fails, and the tasks depending on it are skipped"
    return f"job {reply.job}: {reply.gate} rejected; the job fails"


def kill_text(reply: KillReply, task: str | None = None) -> str:
    """What `kill` did (of one task, when `task` is given)."""
    what = f"job {reply.job}" if task is None else f"task {task} of job {reply.job}"
    if not reply.tasks:
        return f"{what}: kill recorded; no agent was running"
    return f"{what}: stopping {', '.join(reply.tasks)}"


def resume_text(reply: ResumeReply) -> str:
    """What `resume` did."""
    return f"job {reply.job}: resumed, {reply.status}"


def retry_text(reply: RetryReply) -> str:
    """What `retry` did: the tasks that run again."""
    return f"job {reply.job}: retrying {', '.join(reply.tasks)}; {reply.status}"


def skip_text(reply: SkipReply) -> str:
    """What `skip` did, with the dependents it let run again."""
    again = f"; {', '.join(reply.tasks)} run again" if reply.tasks else ""
    return f"job {reply.job}: {reply.task} skipped{again}; {reply.status}"


def pause_text(reply: PauseReply) -> str:
    """What `pause` did."""
    return (
        f"job {reply.job}: paused by {reply.by}; agents running finish their step, no new one starts "
        f"('numerusctl start {reply.job}' lets it go on)"
    )


def start_text(reply: StartReply) -> str:
    """What `start` did."""
    if reply.promoted:
        return f"job {reply.job}: moved to the front of the queue by {reply.by}; it starts at the next free agent slot"
    return f"job {reply.job}: goes on (started by {reply.by})"


def _accepted(branch: str, sha: str, how: str) -> str:
    """`main fast-forwarded to 1a2b3c4`, `on branch numerus/J.accepted at 1a2b3c4`."""
    if how == "fast-forward":
        return f"{branch} fast-forwarded to {sha[:SHA_WIDTH]}"
    return f"on branch {branch} at {sha[:SHA_WIDTH]}"


def accept_text(reply: AcceptReply) -> str:
    """What `accept` did, and, when the result is on a branch of its own, why and what the user can do next."""
    moved = f" (from {reply.previous[:SHA_WIDTH]})" if reply.previous and reply.previous != reply.sha else ""
    if reply.previous == reply.sha:
        moved = " (already there)"
    lines = [f"job {reply.job}: result {_accepted(reply.branch, reply.sha, reply.how)}{moved} in {reply.repo}"]
    if reply.checkout:
        lines.append(f"the checkout at {reply.checkout} was updated with it")
    if reply.how == "branch" and reply.reason:
        lines.append(f"not on your branch: {reply.reason}; merge it yourself when ready: git merge {reply.branch}")
    if reply.pushed:
        lines.append(f"pushed {reply.branch} to {reply.pushed}")
    return "\n".join(lines)


def discard_text(reply: DiscardReply) -> str:
    """What `discard` removed."""
    return f"job {reply.job}: discarded; {removed(len(reply.worktrees), len(reply.branches), False, reply.freed_bytes)}"


#: Colours of a diff's lines on a terminal, as git paints them by default.
_BOLD, _RED, _GREEN, _CYAN, _RESET = "\x1b[1m", "\x1b[31m", "\x1b[32m", "\x1b[36m", "\x1b[m"


def diff_text(reply: DiffReply, *, color: bool, stat: bool = False, raw: bool = False) -> str:
    """A diff (or with `stat` its summary) as git shows it, coloured as git does with `color`, then, when it was
    cut, a line saying so and how to see it whole. The text is the repository's content, written by agents: its
    control characters are shown escaped before any colour is added, unless `raw` (`diff --raw`: a patch kept in a
    file or piped to `git apply` keeps its bytes, `\r` and all)."""
    text = (reply.text if raw else visible(reply.text)).removesuffix("\n")
    if color:
        lines = text.split("\n")
        text = "\n".join(_painted_stat(lines) if stat else _painted(lines))
    if reply.shown < reply.size:
        mark = (
            f"[numerus: diff cut after {_size(reply.shown)} of {_size(reply.size)} (what fits in a reply); "
            f"see it whole in the repository: {reply.see_all}]"
        )
        text += ("\n" if text else "") + visible(mark)
    return text


def _painted(lines: list[str]) -> list[str]:
    """Each line of a unified diff (or a `--stat`) with git's default colours: headers bold, hunk headers cyan,
    removed lines red, added lines green."""
    painted, header = [], False
    for line in lines:
        if line.startswith("diff --git "):
            header = True
        elif line.startswith("@@"):
            header = False
        if header:
            colour = _BOLD
        elif line.startswith("@@"):
            colour = _CYAN
        elif line.startswith("+"):
            colour = _GREEN
        elif line.startswith("-"):
            colour = _RED
        else:
            colour = ""
        painted.append(f"{colour}{line}{_RESET}" if colour and line else line)
    return painted


def _painted_stat(lines: list[str]) -> list[str]:
    """Each line of a `--stat` with its bar's `+` green and `-` red, as git paints them."""
    painted = []
    for line in lines:
        name, bar, graph = line.rpartition(" | ")
        count, space, signs = graph.partition(" ")
        if bar and signs.strip("+-") == "":  # git draws the added (+) then the removed (-)
            minuses = signs.lstrip("+")
            pluses = signs[: len(signs) - len(minuses)]
            signs = (f"{_GREEN}{pluses}{_RESET}" if pluses else "") + (f"{_RED}{minuses}{_RESET}" if minuses else "")
        painted.append(f"{name}{bar}{count}{space}{signs}")
    return painted


def ping_text(pong: Pong) -> str:
    """`numerusd 0.1.0 answered in 0.8 ms (service numerus, id 9nG…)`: numerusctl ping's line."""
    return (
        f"numerusd {visible(pong.version)} answered in {pong.round_trip_ms:.1f} ms "
        f"(service {visible(pong.name)}, id {visible(pong.id)})"
    )


def clean_text(reply: CleanReply) -> str:
    """What `clean` removed, a line per job."""
    if not reply.jobs:
        return "no ended job left anything to remove"
    return "\n".join(_cleaned_line(job) for job in reply.jobs)


def _cleaned_line(job: CleanedJob) -> str:
    line = f"job {job.job}: {removed(len(job.worktrees), len(job.branches), job.logs, job.freed_bytes)}"
    return line + (f"; kept its result, branch {job.kept}" if job.kept else "")


def removed(worktrees: int, branches: int, logs: bool, freed_bytes: int) -> str:
    """`removed 1 worktree, 2 branches, the logs (3.0 MiB)`, or `nothing left to remove`."""
    parts = [plural(n, noun) for n, noun in ((worktrees, "worktree"), (branches, "branch")) if n]
    parts += ["the logs"] if logs else []
    return f"removed {', '.join(parts)} ({_size(freed_bytes)})" if parts else "nothing left to remove"


def _size(size: int) -> str:
    """`1,234 bytes`, `5.1 MiB`: a size as people read it."""
    if size < 1024:
        return f"{size:,} bytes"
    value, units = size / 1024, ["KiB", "MiB", "GiB", "TiB"]
    while value >= 1024 and len(units) > 1:
        value, units = value / 1024, units[1:]
    return f"{value:,.1f} {units[0]}"


def plural(n: int, noun: str) -> str:
    """`1 branch`, `2 branches`, `0 tasks`."""
    return f"{n} {noun}{'' if n == 1 else 'es' if noun.endswith(('ch', 'sh', 's', 'x')) else 's'}"
