"""The agents' sandbox: the bwrap command line it builds, and what a real sandboxed process can and cannot do."""

from __future__ import annotations

import asyncio
import socket
import sys
import uuid
from pathlib import Path

import pytest

from numerusd.agents.base import AgentProfile
from numerusd.agents.registry import adapter_for
from numerusd.errors import ConfigError
from numerusd.sandbox import Sandbox, check_sandboxes, for_agent, git_metadata, preflight
from numerusd.terminal import spawn
from tests.conftest import eventually
from tests.daemon_harness import git, git_repo

TIMEOUT = 20.0


async def run_in(sandbox: Sandbox | None, script: str, cwd: Path) -> tuple[int | None, str]:
    """Run `sh -c script` as an agent is run (a PTY, `setsid --ctty`, the sandbox); its exit code and output."""
    terminal = await spawn(["sh", "-c", script], cwd=cwd, sandbox=sandbox)
    out = b""

    async def pump() -> None:
        nonlocal out
        while chunk := await terminal.read():
            out += chunk

    await asyncio.wait_for(pump(), TIMEOUT)
    exit_code, _ = await asyncio.wait_for(terminal.wait(), TIMEOUT)
    terminal.close()
    return exit_code, out.decode(errors="replace")


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """A state directory holding a key, two task worktrees of a user's repository, and the repository."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "keys.json").write_text('{"secret": "k"}')
    repo = git_repo(tmp_path / "repo")
    worktrees = state / "worktrees" / "job"
    for task in ("t1", "t2"):
        git(repo, "worktree", "add", "-q", "-b", f"b-{task}", str(worktrees / task))
    (worktrees / "t2" / "OTHER.md").write_text("another task's work\n")
    return {"state": state, "repo": repo, "t1": worktrees / "t1", "t2": worktrees / "t2"}


def executor_sandbox(layout: dict[str, Path], **fields: object) -> Sandbox:
    profile = AgentProfile(kind="scripted", **fields)  # type: ignore[arg-type]
    jail = for_agent(
        profile, adapter_for(profile), workdir=layout["t1"], writable=True, hidden=(layout["state"], layout["repo"])
    )
    assert jail is not None
    return jail


# --- the command line ----------------------------------------------------------------------------------------


def test_the_command_line_hides_then_binds_back_deeper_paths_and_keeps_git_metadata_read_only(tmp_path: Path):
    state, work = tmp_path / "state", tmp_path / "state" / "w" / "t1"
    (work / ".git").mkdir(parents=True)
    jail = Sandbox(writable=(work,), read_only=(work / ".git",), hidden=(state,), chdir=work)
    env, *argv = jail.prefix("bwrap")
    # bwrap ignores the SIGTERM that stops an agent gracefully (else it would die of it and take the agent with it
    # at once); the agent gets the default back.
    assert Path(env).name == "env" and argv[0] == "--ignore-signal=TERM"
    argv = argv[1:]
    assert argv[:10] == ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    assert {"--unshare-pid", "--die-with-parent"} <= set(argv)
    assert "--new-session" not in argv  # the PTY must stay the agent's controlling terminal
    assert "--unshare-net" not in argv
    tail = argv[argv.index("--tmpfs", 10) :]
    assert tail == [
        "--tmpfs", str(state),
        "--bind", str(work), str(work),
        "--ro-bind", str(work / ".git"), str(work / ".git"),
        "--chdir", str(work),
        "--", env, "--default-signal=TERM",
    ]  # fmt: skip
    assert "--unshare-net" in Sandbox(network=False).prefix("bwrap")
    # A path that does not exist is left out rather than failing the spawn.
    assert str(tmp_path / "nope") not in Sandbox(writable=(tmp_path / "nope",)).prefix("bwrap")


def test_a_worktrees_git_metadata_is_its_dot_git_file_its_gitdir_and_the_common_dir(layout: dict[str, Path]):
    common = (layout["repo"] / ".git").resolve()
    assert git_metadata(layout["t1"]) == (layout["t1"] / ".git", common / "worktrees" / "t1", common)
    assert git_metadata(layout["repo"]) == (common,)
    assert git_metadata(layout["state"]) == ()


def test_profiles_choose_the_sandbox_network_and_extra_binds(layout: dict[str, Path], tmp_path: Path):
    extra = tmp_path / "cache"
    extra.mkdir()
    profile = AgentProfile(kind="scripted", sandbox="none")
    assert for_agent(profile, adapter_for(profile), workdir=layout["t1"], writable=True, hidden=()) is None
    jail = executor_sandbox(layout, network=False, binds=(str(extra), str(tmp_path / "missing")))
    assert not jail.network
    assert extra in jail.writable and tmp_path / "missing" not in jail.writable
    reader_profile = AgentProfile(kind="scripted")
    reader = for_agent(
        reader_profile,
        adapter_for(reader_profile),
        workdir=layout["t1"],
        writable=False,
        hidden=(layout["state"],),
        answer_dir=tmp_path / "answer",
        schemas_dir=tmp_path / "schemas",
    )
    assert reader is not None
    assert layout["t1"] in reader.read_only and layout["t1"] not in reader.writable
    assert tmp_path / "answer" in reader.writable and tmp_path / "schemas" in reader.read_only


def test_codex_binds_its_home_and_makes_it_when_missing(tmp_path: Path):
    home = tmp_path / "codex-home"
    profile = AgentProfile(kind="codex", env={"CODEX_HOME": str(home)})
    assert adapter_for(profile).binds() == (home,)
    assert home.is_dir() and home.stat().st_mode & 0o777 == 0o700
    assert adapter_for(profile).binds() == (home,)  # and finds it there the next time
    nowhere = AgentProfile(kind="codex", env={"CODEX_HOME": str(tmp_path / "no" / "such" / "home")})
    assert adapter_for(nowhere).binds() == ()  # a home whose parent is missing is not invented


def test_the_preflight_refuses_in_one_line_naming_the_setting():
    assert preflight() is None
    with pytest.raises(ConfigError) as refused:
        check_sandboxes(["scripted", "codex"], bwrap="/bin/false")
    assert refused.value.message.count("\n") == 0
    assert 'agents.codex.sandbox = "none"' in refused.value.message
    check_sandboxes([], bwrap="/bin/false")  # no profile sandboxed: nothing to check


# --- a real bwrap ------------------------------------------------------------------------------------------


async def test_the_state_directory_the_users_repository_and_other_worktrees_are_not_visible(
    layout: dict[str, Path],
):
    jail = executor_sandbox(layout)
    state, repo = layout["state"], layout["repo"]
    script = f"cat {state}/keys.json {layout['t2']}/OTHER.md; ls -A {repo} {state}"
    _, out = await run_in(jail, script, layout["t1"])
    # Empty directories where they lie (agents' paths need no translation), their files nowhere.
    assert out.count("No such file or directory") == 2, out
    assert "secret" not in out and "README" not in out and "keys.json:" in out
    # The repository shows only its .git, read-only: the common directory of the worktree's git metadata.
    assert out.split()[-4:] == [f"{repo}:", ".git", f"{state}:", "worktrees"], out
    # Its own worktree it sees, and its git works read-only there.
    code, out = await run_in(jail, "pwd; cat README.md; git log --oneline | wc -l", layout["t1"])
    assert (code, out.split()) == (0, [str(layout["t1"]), "#", "test", "repo", "1"]), out


async def test_nothing_lands_outside_the_work_directory(layout: dict[str, Path], tmp_path: Path):
    jail = executor_sandbox(layout)
    host_tmp = Path("/tmp") / f"numerus-sandbox-{uuid.uuid4().hex}"
    home_file = Path.home() / f".numerus-sandbox-{uuid.uuid4().hex}"
    attempts = [
        f"echo x > {layout['repo']}/PLANTED.md",
        f"echo x > {host_tmp}",
        f"echo x > {layout['state']}/keys.json",
        # Read-only: the system, the home directory, the work directory's git metadata.
        f"echo x > {home_file}",
        "echo x > /etc/numerus-planted",
        "echo x > .git",
        'echo x > "$(git rev-parse --git-path hooks)/post-merge"',
        'echo x >> "$(git rev-parse --git-common-dir)/config"',
        "echo mine > MINE.md",
    ]
    code, out = await run_in(jail, "; ".join(attempts), layout["t1"])
    assert code == 0, out  # the last one worked
    assert out.count("Read-only file system") == 5, out
    assert not (layout["repo"] / "PLANTED.md").exists() and not host_tmp.exists() and not home_file.exists()
    assert not Path("/etc/numerus-planted").exists()
    assert (layout["state"] / "keys.json").read_text() == '{"secret": "k"}'
    assert (layout["t1"] / ".git").read_text().startswith("gitdir: ")
    assert not list((layout["repo"] / ".git").glob("**/post-merge"))
    assert "x" not in (layout["repo"] / ".git" / "config").read_text().splitlines()
    assert (layout["t1"] / "MINE.md").read_text() == "mine\n"


async def test_tmp_is_private(layout: dict[str, Path]):
    jail = executor_sandbox(layout)
    mine = Path("/tmp") / f"numerus-host-{uuid.uuid4().hex}"
    mine.write_text("host\n")
    try:
        code, out = await run_in(
            jail, f"ls -A /tmp; test -e {mine} || echo hidden; echo in > /tmp/inside", layout["t1"]
        )
    finally:
        mine.unlink()
    # Only the directories down to the paths bound back (the test's state and worktrees) are there.
    assert code == 0 and out.split() == ["pytest-of-root", "hidden"], out
    assert not Path("/tmp/inside").exists()


async def test_the_pty_stays_the_controlling_terminal(layout: dict[str, Path]):
    code, out = await run_in(executor_sandbox(layout), "echo ctty > /dev/tty", layout["t1"])
    assert (code, out.strip()) == (0, "ctty")


async def test_network_off_leaves_no_way_out(layout: dict[str, Path]):
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    python = f"import socket; socket.create_connection(('127.0.0.1', {port}), 2); print('CONNECTED')"
    connect = f'{sys.executable} -c "{python}"'
    try:
        code_on, out_on = await run_in(executor_sandbox(layout), connect, layout["t1"])
        code_off, out_off = await run_in(executor_sandbox(layout, network=False), connect, layout["t1"])
    finally:
        server.close()
    assert (code_on, out_on.strip()) == (0, "CONNECTED")
    assert code_off != 0 and "CONNECTED" not in out_off and "Error" in out_off


def host_processes_with(token: str) -> list[int]:
    """Pids on the host whose command line holds `token`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if token in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_what_the_agent_leaves_running_ends_with_it(layout: dict[str, Path]):
    # `setsid` leaves the agent's process group, so only the PID namespace ends it.
    token = f"1000.{uuid.uuid4().int % 10**6}"
    code, out = await run_in(executor_sandbox(layout), f"setsid sleep {token} & sleep 0.2; echo started", layout["t1"])
    assert (code, out.strip()) == (0, "started")
    await eventually(lambda: not host_processes_with(f"sleep\x00{token}"), timeout=10, interval=0.05)


async def test_without_the_sandbox_the_same_escape_works(tmp_path: Path):
    """The control for the tests above: the host's /tmp is reachable unsandboxed, so they do test bwrap."""
    target = Path("/tmp") / f"numerus-sandbox-{uuid.uuid4().hex}"
    code, out = await run_in(None, f"echo x > {target}", tmp_path)
    try:
        assert code == 0 and target.exists(), out
    finally:
        target.unlink(missing_ok=True)


def test_the_bwrap_binary_can_be_named(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("NUMERUS_BWRAP", "/bin/false")
    assert Sandbox().prefix()[2] == "/bin/false"
    assert preflight() == "/bin/false exited 1"


async def test_a_bind_reached_through_a_symlink_is_seen_where_the_agent_looks(layout: dict[str, Path], tmp_path: Path):
    (tmp_path / "real" / "home").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    given = tmp_path / "link" / "home"  # under /tmp, where the private /tmp hides the symlink itself
    jail = executor_sandbox(layout, binds=(str(given),))
    code, out = await run_in(jail, f"echo kept > {given}/session", layout["t1"])
    assert code == 0, out
    assert (tmp_path / "real" / "home" / "session").read_text() == "kept\n"


async def test_a_stopped_agent_gets_sigterm_and_its_grace_and_its_signal_is_reported(layout: dict[str, Path]):
    jail = executor_sandbox(layout)
    script = "trap 'echo cleaning up; exit 3' TERM; echo ready; while :; do sleep 0.05; done"
    terminal = await spawn(["sh", "-c", script], cwd=layout["t1"], sandbox=jail)
    assert (await asyncio.wait_for(terminal.read(), TIMEOUT)).startswith(b"ready")
    ended = await asyncio.wait_for(terminal.terminate(grace=5.0), TIMEOUT)
    rest = b""
    while chunk := await asyncio.wait_for(terminal.read(), TIMEOUT):
        rest += chunk
    terminal.close()
    # It ran its handler, inside the grace (sh may first say its `sleep` was Terminated).
    assert ended == (3, None) and rest.strip().endswith(b"cleaning up"), rest
    # Once it runs (a SIGTERM during bwrap's set-up is ignored, and the SIGKILL after the grace ends it).
    terminal = await spawn(["sh", "-c", "echo ready; exec sleep 30"], cwd=layout["t1"], sandbox=jail)
    assert (await asyncio.wait_for(terminal.read(), TIMEOUT)).startswith(b"ready")
    assert await asyncio.wait_for(terminal.terminate(grace=5.0), TIMEOUT) == (None, 15)
    terminal.close()
