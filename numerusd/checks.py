"""Running one check command of the quality gate (a job's configured tests and linters) in a task's worktree.

A check is `/bin/sh -c COMMAND` in the worktree, in the executor's sandbox (it runs the code the agent wrote),
started the daemon's one way (`numerusd.processes`), with the daemon's environment without its secrets, as agents
get it. Its standard output and error are one text, in the order written. It leads its own process group, and the
group goes with it: when the shell exits, when the check runs out of time, and when the gate is cancelled (a job
killed), so nothing a check started outlives it.

The daemon holds only the end of a check's output (`KEEP_BYTES`); all of it, up to `LOG_BYTES`, goes to a file
in the task's run directory, `<runs>/<job>/<task>/check-<attempt>-<n>.log` (`CheckLog`), redacted as agent
output is. It starts with the command, `$ pytest -q` (on one line), and ends with a line saying how the check
ended: `[numerus: exit code 1 after 0.42 s]`, or `[numerus: stopped after 30 s]` for one that ran out of time.
A check cut at `LOG_BYTES` says so before that line. `numerusctl logs JOB TASK --check` shows those files for the
checks that failed (`failed_check_logs`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from numerusd import processes
from numerusd.errors import one_line
from numerusd.redaction import RedactingStream, Redactor
from numerusd.sandbox import Sandbox

#: The most of a check's output the daemon holds: its end (what the gate records is shorter still), however much a
#: test the agent wrote prints.
KEEP_BYTES = 64 * 1024
#: The most of a check's output its log file keeps (the start of it): a test printing without end must not fill
#: the daemon's disk.
LOG_BYTES = 16 * 1024 * 1024

_NAME = re.compile(r"^check-([0-9]+)-([0-9]+)\.log$")
_END = re.compile(rb"\n\[numerus: (?:exit code (-?[0-9]+) after [^\]\n]*|stopped after [^\]\n]*)\]\n\Z")


class CheckLog:
    """Where one attempt's checks write their whole output: the task's run directory and the attempt; each check
    takes the next number (`check-<attempt>-<n>.log`), so a gate run again after a restart overwrites nothing."""

    def __init__(self, run_dir: Path, attempt: int, redactor: Redactor | None = None) -> None:
        self.run_dir = run_dir
        self.attempt = attempt
        self.redactor = redactor or Redactor()

    def open(self, command: str) -> _LogWriter:
        """A new file for the next check of the attempt, which runs `command`."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        names = (_NAME.match(path.name) for path in self.run_dir.iterdir())
        taken = [int(name.group(2)) for name in names if name is not None and int(name.group(1)) == self.attempt]
        path = self.run_dir / f"check-{self.attempt}-{max(taken, default=0) + 1}.log"
        return _LogWriter(path, command, self.redactor)


class _LogWriter:
    """One check's log file, written as the output arrives: redacted, the first LOG_BYTES kept."""

    def __init__(self, path: Path, command: str, redactor: Redactor) -> None:
        self.path = path
        self._file: IO[bytes] = open(path, "wb")  # noqa: SIM115 - closed by end()
        self._file.write(redactor.redact(f"$ {one_line(command)}\n".encode()))
        self._redacted = RedactingStream(redactor)
        self._written = 0
        self._printed = 0

    def write(self, data: bytes) -> None:
        """Called with each piece of output as it is read."""
        self._printed += len(data)
        self._keep(self._redacted.feed(data))

    def _keep(self, data: bytes) -> None:
        room = LOG_BYTES - self._written
        if room > 0 and data:
            self._file.write(data[:room])
            self._written += min(room, len(data))

    def end(self, how: str) -> None:
        """Close the file with the line that says how the check ended."""
        try:
            self._keep(self._redacted.close())
            if self._printed > LOG_BYTES and self._written >= LOG_BYTES:
                self._file.write(f"\n[numerus: output cut at {LOG_BYTES} bytes of {self._printed}]".encode())
            self._file.write(f"\n[numerus: {how}]\n".encode())
        finally:
            self._file.close()


async def run_check(
    cwd: Path, command: str, *, timeout: float, sandbox: Sandbox | None = None, log: CheckLog | None = None
) -> tuple[int | None, str, float]:
    """Run `command` in `cwd`: its exit code (None when it ran out of `timeout` seconds), output (its last
    `KEEP_BYTES`) and duration (s); with `log`, all of its output goes to the attempt's next check log file.

    A check runs code an agent wrote (its tests, its build), so it runs in `sandbox` as the agent did (None: as
    it is). The output of a check that ran out of time is a sentence saying so. OS errors (no such directory) are
    raised.
    """
    started = time.monotonic()
    shell = ["/bin/sh", "-c", command]
    writer = log.open(command) if log is not None else None
    how = "stopped by numerusd"  # cancelled (a job killed), unless it ends below
    try:
        completed = await processes.run(
            [*sandbox.prefix(), *shell] if sandbox is not None else shell,
            cwd=cwd,
            env=processes.inherited_environment(),
            timeout=timeout,
            merge_stderr=True,
            new_session=True,
            keep_last=KEEP_BYTES,
            copy_to=writer.write if writer is not None else None,
        )
        how = f"exit code {completed.returncode} after {time.monotonic() - started:.2f} s"
    except TimeoutError:
        how = f"stopped after {timeout:g} s"
        return None, f"stopped after {timeout:g} s", time.monotonic() - started
    finally:
        if writer is not None:
            writer.end(how)
    return completed.returncode, completed.stdout.decode("utf-8", "replace"), time.monotonic() - started


@dataclass(frozen=True)
class FailedCheck:
    """A check log whose check failed: its file, the command (as its first line gives it), the attempt, the
    check's number in it, and its exit code (None: it ran out of time)."""

    path: Path
    command: str
    attempt: int
    number: int
    exit_code: int | None


def failed_check_logs(run_dir: Path) -> list[FailedCheck]:
    """The logs in a task's run directory of the checks that failed (those that passed, or never ended because the
    daemon stopped, are left out), oldest attempt first."""
    found = []
    for path in run_dir.iterdir() if run_dir.is_dir() else ():
        name = _NAME.match(path.name)
        if name is None or not path.is_file() or path.is_symlink():
            continue
        with open(path, "rb") as file:
            command = file.readline(64 * 1024).decode("utf-8", "replace").removeprefix("$ ").rstrip("\n")
            size = file.seek(0, 2)
            file.seek(max(0, size - 200))
            end = _END.search(file.read())
        if end is None or end.group(1) == b"0":
            continue
        exit_code = int(end.group(1)) if end.group(1) is not None else None
        found.append(FailedCheck(path, command, int(name.group(1)), int(name.group(2)), exit_code))
    return sorted(found, key=lambda check: (check.attempt, check.number))
