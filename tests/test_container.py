"""deploy/Containerfile, checked without a container runtime: what the image runs exists and works here.

Its HEALTHCHECK is `numerusctl ping` as a viewer, and that very command line passes against a real daemon and fails
once the daemon is gone, within the check's own timeout; every file it copies is in the build context (not left
out by .dockerignore); its entrypoint hands numerusd's own commands to numerusd and `demo` to scripts/demo.sh, and
that demo runs to the end. Building and running the image itself is in docs/operations.md, "The container image".
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import click
import pytest

from numerusd.cli import main as numerusd_main
from numerusd.protocol.exit_codes import CtlExit
from tests.daemon_harness import BIN, Daemon

ROOT = Path(__file__).parent.parent
CONTAINERFILE = ROOT / "deploy" / "Containerfile"
CODEX_CONTAINERFILE = ROOT / "deploy" / "Containerfile.codex"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
IGNORE = ROOT / ".dockerignore"


def instructions(path: Path = CONTAINERFILE) -> list[tuple[str, str]]:
    """A Containerfile's instructions, (KEYWORD, arguments), continuation lines joined, comments left out."""
    text = re.sub(r"(?m)^\s*#.*\n", "", path.read_text()).replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            found.append((keyword.upper(), " ".join(arguments.split())))
    return found


def last(keyword: str) -> str:
    """The arguments of the last `keyword` instruction (the final stage's, for those a stage sets)."""
    return [arguments for found, arguments in instructions() if found == keyword][-1]


def environment() -> dict[str, str]:
    """The final stage's ENV (KEY=value pairs)."""
    stages = " ".join(args for keyword, args in instructions() if keyword == "ENV").split()
    return dict(pair.split("=", 1) for pair in stages)


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options (`--timeout` -> `10s`) and its command (exec form)."""
    options, _, command = last("HEALTHCHECK").partition(" CMD ")
    return dict(option.lstrip("-").split("=", 1) for option in options.split()), json.loads(command)


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return float(match.group(1))


def test_the_healthcheck_is_numerusctl_ping_as_a_viewer_within_its_timeout():
    options, command = healthcheck()
    assert command == ["numerusctl", "--role", "viewer", "--timeout", "3", "ping"]
    assert command[0] in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    # numerusctl waits up to --timeout to connect and as long again for the answer: it says why it failed before
    # the runtime kills the check, so the one line lands in the container's health log.
    assert 2 * float(command[command.index("--timeout") + 1]) < seconds(options["timeout"])
    assert seconds(options["start-period"]) >= 30  # numerusd replays the history before it answers


def test_the_healthchecks_command_line_passes_against_a_running_daemon_and_fails_once_it_stops(tmp_path: Path):
    """Run as in the image: no option but its own, the state directory from the image's ENV (here, the test's)."""
    _, command = healthcheck()
    assert environment()["NUMERUS_STATE_DIR"] == "/var/lib/numerus"
    env = {**os.environ, "NUMERUS_STATE_DIR": str(tmp_path / "state")}
    argv = [str(BIN / command[0]), *command[1:]]
    with Daemon(tmp_path / "state").start():
        healthy = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, healthy.stderr
        assert healthy.stdout.startswith("numerusd ") and " answered in " in healthy.stdout
    unhealthy = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert unhealthy.returncode == CtlExit.UNREACHABLE
    assert len(unhealthy.stderr.splitlines()) == 1 and unhealthy.stderr.startswith("numerusctl: ")


def test_every_file_the_image_copies_is_in_the_build_context():
    copies = [args.split() for keyword, args in instructions() if keyword == "COPY" and "--from=" not in args]
    sources = [source for *sources, _ in copies for source in sources]
    assert {"pyproject.toml", "numerusd", "numerusctl", "scripts/demo.sh", "deploy/entrypoint.sh"} <= set(sources)
    kept = {line[1:] for line in IGNORE.read_text().splitlines() if line.startswith("!")}
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source in kept, f"{source} is left out of the build context by {IGNORE.name}"
    assert IGNORE.read_text().splitlines()[1] == "*"  # everything else is left out (.venv, .git, state)


def test_the_image_runs_as_a_user_with_its_state_in_a_volume_and_exposes_nothing():
    user = last("USER")
    assert user not in ("root", "0")
    (useradd,) = [args for keyword, args in instructions() if keyword == "RUN" and "useradd" in args]
    assert f"groupadd --system --gid 10001 {user} " in useradd
    assert f"useradd --system --uid 10001 --gid {user} " in useradd and useradd.endswith(f"/var/lib/{user}")
    assert last("VOLUME").split() == [environment()["NUMERUS_STATE_DIR"]]
    assert "EXPOSE" not in dict(instructions())  # the embedded nats-server listens on the container's loopback


def test_the_entrypoint_runs_numerusd_its_commands_the_demo_or_a_command():
    assert json.loads(last("ENTRYPOINT")) == ["/usr/bin/tini", "--", "/usr/local/bin/numerus-entrypoint"]
    assert "deploy/entrypoint.sh /usr/local/bin/numerus-entrypoint" in [a for k, a in instructions() if k == "COPY"]
    assert os.access(ENTRYPOINT, os.X_OK)
    script = ENTRYPOINT.read_text()
    # numerusd's own commands go to numerusd (`podman run IMAGE rebuild`), whatever commands it has.
    (routed,) = re.findall(r"^\s*(serve \|[^)]*)\)", script, re.M)
    assert isinstance(numerusd_main, click.Group)
    assert set(routed.replace("|", " ").split()) - {"-*"} == set(numerusd_main.commands)
    # The demo is the copy of scripts/demo.sh, run with the environment the build stage made.
    demo = re.search(r"demo\) shift; exec env BIN=(\S+) bash (\S+)", script)
    assert demo is not None
    assert f"scripts/demo.sh {demo.group(2)}" in [a for k, a in instructions() if k == "COPY"]
    assert f"python3 -m venv {Path(demo.group(1)).parent}" in " ".join(a for k, a in instructions() if k == "RUN")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    for argv, says in ((["--version"], "numerusd, version"), (["numerusctl", "--version"], "numerusctl ")):
        ran = subprocess.run(["sh", str(ENTRYPOINT), *argv], env=env, capture_output=True, text=True, timeout=30)
        assert ran.returncode == 0 and ran.stdout.startswith(says), ran.stdout + ran.stderr


def test_the_codex_image_installs_a_pinned_codex_at_build_time_and_runs_as_numerus():
    found = instructions(CODEX_CONTAINERFILE)
    args = dict(arguments.partition("=")[::2] for keyword, arguments in found if keyword == "ARG")
    assert [arguments for keyword, arguments in found if keyword == "FROM"] == ["${NUMERUS_IMAGE}"]
    # A version docs/agents.md says the adapter was checked against, never `latest`: the same image every build.
    assert re.fullmatch(r"\d+\.\d+\.\d+", args["CODEX_VERSION"])
    assert f"codex-cli {args['CODEX_VERSION']}" in (ROOT / "docs" / "agents.md").read_text()
    (install,) = [arguments for keyword, arguments in found if keyword == "RUN"]
    assert '"@openai/codex@${CODEX_VERSION}"' in install and install.endswith("codex --version")
    assert found[-1] == ("USER", last("USER"))  # back to the image's own user: numerusd never runs as root
    assert "ENTRYPOINT" not in dict(found) and "HEALTHCHECK" not in dict(found)  # both inherited


@pytest.mark.slow
def test_the_demo_the_image_runs_runs_to_the_end(tmp_path: Path):
    """`podman run --rm IMAGE demo` runs scripts/demo.sh: a real planned job, approved, accepted into main."""
    env = {**os.environ, "BIN": str(BIN), "TMPDIR": str(tmp_path)}
    ran = subprocess.run(
        ["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert "every signature and chain link holds" in ran.stdout
    assert ran.stdout.rstrip().endswith("-- the Numerus demo team"), shlex.quote(ran.stdout[-500:])
