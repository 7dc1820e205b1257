"""numerus-scripted-agent: a fake `codex exec` that plays a scenario instead of asking a model.

It takes the command line of `codex exec` (the options the codex adapter passes, with codex's rules about
which ones may follow `resume`, and codex's exit status 2 for a usage error) and prints the same `--json`
events, so tests and demos run the daemon's real code path with no network and no cost. What it does comes
from a scenario file (JSON), found through the environment variable `NUMERUS_SCENARIO`: a path, or the name
of a scenario shipped in `numerusd/demo/` (`team`, `hello`). Without one it plays a default scenario: say a message,
write `SCRIPTED.md`, finish. The scenario format is documented in docs/agents.md.

One scenario can serve every role the daemon calls an agent in: the prompts the daemon builds start with a line
`Numerus role: <role> · job <job> · task <task or -> · attempt <n>`, and the scenario's `cases` pick the steps
to play by role, task, attempt or a regular expression over the prompt.

Started once per agent run, so it imports only what it needs, and nothing of the daemon.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any, NoReturn

PROG = "numerus-scripted-agent"
USAGE = "Usage: codex exec [OPTIONS] [PROMPT]\n       codex exec [OPTIONS] resume <SESSION_ID> [PROMPT]"
SANDBOX_MODES = ("read-only", "workspace-write", "danger-full-access")

_ONE_TASK_PLAN = {
    "summary": "One task: the scripted agent writes SCRIPTED.md.",
    "tasks": [
        {
            "id": "t1",
            "title": "Write SCRIPTED.md",
            "instructions": "Write SCRIPTED.md holding this prompt.",
            "role": "executor",
            "deps": [],
            "intents": [{"path": "SCRIPTED.md", "mode": "create"}],
        }
    ],
}

#: Played without a scenario: every role of a planned job answers (a one-task plan, its claim, a pass), and an
#: executor, or a prompt of no role, writes SCRIPTED.md.
DEFAULT_SCENARIO: dict[str, Any] = {
    "cases": [
        {"match": {"role": "planner"}, "steps": [{"answer": _ONE_TASK_PLAN}]},
        {"match": {"role": "queen"}, "steps": [{"answer": _ONE_TASK_PLAN}]},
        {
            "match": {"role": "claimer"},
            "steps": [
                {"answer": {"paths": [{"path": "SCRIPTED.md", "kind": "file", "mode": "create"}], "commands": []}}
            ],
        },
        {
            "match": {"role": "reviewer"},
            "steps": [{"answer": {"verdict": "pass", "reasons": ["SCRIPTED.md is there"]}}],
        },
    ],
    "steps": [
        {"say": "Scripted agent: writing SCRIPTED.md."},
        {"write": "SCRIPTED.md", "content": "Written by numerus-scripted-agent for the prompt:\n\n{prompt}\n"},
        {"say": "Done: SCRIPTED.md holds the prompt."},
        {"usage": {"input_tokens": 1200, "cached_input_tokens": 200, "output_tokens": 80}},
    ],
}

#: Step kinds and the other keys each may carry.
STEP_KEYS: dict[str, set[str]] = {
    "say": set(),
    "answer": set(),
    "think": set(),
    "write": {"content"},
    "delete": set(),
    "run": set(),
    "sleep": set(),
    "print": set(),
    "read": set(),
    "stderr": set(),
    "bad_json": set(),
    "error": set(),
    "event": set(),
    "usage": set(),
    "fail": set(),
    "exit": set(),
}

#: The first line of every prompt the daemon builds, e.g. `Numerus role: executor · job 01JX… · task t2 · attempt 2`.
ROLE_LINE = re.compile(
    r"Numerus role: (?P<role>\S+) \u00b7 job (?P<job>\S+) \u00b7 task (?P<task>\S+) \u00b7 attempt (?P<attempt>[0-9]+)"
)

#: What a case's `match` may compare: the role line's fields, and `prompt`, a regular expression.
MATCH_KEYS = ("role", "task", "attempt", "prompt")

#: The placeholders filled in step texts; `{prompt}` always, the others when the prompt has a role line.
PLACEHOLDER = re.compile(r"\{(prompt|role|task|attempt|job)\}")

# --- the command line, with codex's rules --------------------------------------------------------------------

# option -> (destination, takes a value, allowed after `resume`). The last is clap's `global = true`:
# `-C`, `--sandbox`, `--output-schema` and `--color` belong to `exec` only, and codex refuses them after
# `resume`, so the fake refuses them too and an adapter putting them there fails in tests, not in production.
OPTIONS: dict[str, tuple[str, bool, bool]] = {
    "--json": ("json", False, True),
    "--experimental-json": ("json", False, True),
    "-C": ("cd", True, False),
    "--cd": ("cd", True, False),
    "-s": ("sandbox", True, False),
    "--sandbox": ("sandbox", True, False),
    "--skip-git-repo-check": ("skip_git_repo_check", False, True),
    "--ephemeral": ("ephemeral", False, True),
    "-m": ("model", True, True),
    "--model": ("model", True, True),
    "-c": ("config", True, True),
    "--config": ("config", True, True),
    "--output-schema": ("output_schema", True, False),
    "-o": ("output_last_message", True, True),
    "--output-last-message": ("output_last_message", True, True),
    "--color": ("color", True, False),
}


class UsageError(Exception):
    """A command line codex would refuse with exit status 2."""


def parse_args(args: list[str]) -> dict[str, Any]:
    """`exec [OPTIONS] [resume <SESSION_ID>] [PROMPT]`, as codex's clap parser reads it."""
    if not args or args[0] != "exec":
        raise UsageError(f"{PROG} plays only `codex exec`; got {' '.join(args[:1]) or 'no subcommand'}")
    opts: dict[str, Any] = {"config": [], "resume": None, "prompt": None}
    positionals: list[str] = []
    in_resume = False
    only_positionals = False
    i = 1
    while i < len(args):
        arg = args[i]
        i += 1
        if only_positionals or arg == "-" or not arg.startswith("-"):
            if not only_positionals and arg == "resume" and not in_resume and not positionals:
                in_resume = True
                continue
            positionals.append(arg)
            continue
        if arg == "--":
            only_positionals = True
            continue
        if arg in ("-h", "--help"):
            print(USAGE)
            raise SystemExit(0)
        name, value = arg, None
        if arg.startswith("--") and "=" in arg:
            name, value = arg.split("=", 1)
        elif not arg.startswith("--") and len(arg) > 2:
            name, value = arg[:2], arg[2:].removeprefix("=")
        if name not in OPTIONS:
            raise UsageError(f"unexpected argument '{arg}' found")
        dest, takes_value, global_ = OPTIONS[name]
        if in_resume and not global_:
            raise UsageError(f"unexpected argument '{name}' found (it belongs before `resume`)")
        if takes_value:
            if value is None:
                if i >= len(args):
                    raise UsageError(f"a value is required for '{name}' but none was supplied")
                value = args[i]
                i += 1
            if dest == "config":
                if "=" not in value:
                    raise UsageError(f"invalid override '{value}' for '{name}': expected key=value")
                opts["config"].append(value)
            else:
                opts[dest] = value
        elif value is not None:
            raise UsageError(f"unexpected value '{value}' for '{name}' found; no more were expected")
        else:
            opts[dest] = True
    if opts.get("sandbox") is not None and opts["sandbox"] not in SANDBOX_MODES:
        raise UsageError(
            f"invalid value '{opts['sandbox']}' for '--sandbox <SANDBOX_MODE>'\n"
            f"  [possible values: {', '.join(SANDBOX_MODES)}]"
        )
    if in_resume:
        if not positionals:
            raise UsageError(f"`resume` needs a SESSION_ID ({PROG} keeps no sessions to pick --last from)")
        opts["resume"] = positionals.pop(0)
    if len(positionals) > 1:
        raise UsageError(f"unexpected argument '{positionals[1]}' found")
    if positionals:
        opts["prompt"] = positionals[0]
    return opts


# --- the scenario ---------------------------------------------------------------------------------------------


class ScenarioError(Exception):
    """The scenario file is missing or malformed."""


def load_scenario(env: Mapping[str, str]) -> dict[str, Any]:
    """The scenario NUMERUS_SCENARIO names (a path, or the name of a shipped one), else the default."""
    where = env.get("NUMERUS_SCENARIO")
    if not where:
        return DEFAULT_SCENARIO
    path = where
    if not os.path.exists(path) and os.sep not in where and not where.endswith(".json"):
        # A bare name: a scenario shipped with the package, e.g. `team`, which `make demo` plays.
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "demo", where + ".json")
    try:
        with open(path, encoding="utf-8") as f:
            scenario = json.load(f)
    except OSError as e:
        raise ScenarioError(f"cannot read scenario {where}: {e.strerror}") from e
    except ValueError as e:
        raise ScenarioError(f"scenario {where} is not valid JSON: {e}") from e
    try:
        check_scenario(scenario)
    except ScenarioError as e:
        raise ScenarioError(f"{where}: {e}") from None
    return scenario


def check_scenario(scenario: object) -> None:
    """Every problem of the scenario up front, so a bad one fails before it has done anything.

    A problem is named by the path of the item that has it, as `steps[3]` or `cases[1].match.attempt`.
    """
    if not isinstance(scenario, dict):
        raise ScenarioError("a scenario is a JSON object with a list of `steps`, a list of `cases`, or both")
    unknown = set(scenario) - {"description", "thread_id", "steps", "cases"}
    if unknown:
        raise ScenarioError(f"unknown scenario keys: {', '.join(sorted(unknown))}")
    if not isinstance(scenario.get("thread_id", ""), str):
        raise ScenarioError("`thread_id` must be a string")
    if "steps" not in scenario and "cases" not in scenario:
        raise ScenarioError("a scenario needs a list of `steps`, a list of `cases`, or both")
    if "steps" in scenario:
        check_steps(scenario["steps"], "steps")
    cases = scenario.get("cases", [])
    if not isinstance(cases, list):
        raise ScenarioError("`cases` must be a list")
    for n, case in enumerate(cases):
        check_case(case, f"cases[{n}]")


def check_case(case: object, where: str) -> None:
    """A case: `match`, an object with any of MATCH_KEYS, and the `steps` to play when it matches."""
    if not isinstance(case, dict):
        raise ScenarioError(f"{where}: a case is an object with `match` and `steps`")
    unknown = sorted(set(case) - {"description", "match", "steps"})
    if unknown:
        raise ScenarioError(f"{where}.{unknown[0]}: unknown case key (a case has `match`, `steps`, `description`)")
    match = case.get("match")
    if not isinstance(match, dict):
        raise ScenarioError(f"{where}.match: `match` is an object with any of {', '.join(MATCH_KEYS)}")
    for key, value in match.items():
        here = f"{where}.match.{key}"
        if key not in MATCH_KEYS:
            raise ScenarioError(f"{here}: unknown match key (a match has any of {', '.join(MATCH_KEYS)})")
        if key == "attempt":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ScenarioError(f"{here}: `attempt` takes a whole number, as the role line counts attempts")
        elif not isinstance(value, str):
            raise ScenarioError(f"{here}: `{key}` takes a string")
        elif key == "prompt":
            try:
                re.compile(value)
            except re.error as e:
                raise ScenarioError(f"{here}: bad regular expression: {e}") from None
    if "steps" not in case:
        raise ScenarioError(f"{where}: a case needs the `steps` to play")
    check_steps(case["steps"], f"{where}.steps")


def check_steps(steps: object, where: str) -> None:
    """A list of steps, each with exactly one kind and the value that kind takes."""
    if not isinstance(steps, list):
        raise ScenarioError(f"{where}: `steps` must be a list")
    for n, step in enumerate(steps):
        here = f"{where}[{n}] ({json.dumps(step)[:60]})"
        kinds = [key for key in step if key in STEP_KEYS] if isinstance(step, dict) else []
        if len(kinds) != 1:
            raise ScenarioError(f"{here}: a step is an object with exactly one of {', '.join(STEP_KEYS)}")
        kind = kinds[0]
        extra = set(step) - {kind} - STEP_KEYS[kind]
        if extra:
            raise ScenarioError(f"{here}: unexpected keys {', '.join(sorted(extra))} for `{kind}`")
        value = step[kind]
        if kind in ("think", "write", "delete", "run", "print", "read", "stderr", "error", "fail") and not isinstance(
            value, str
        ):
            raise ScenarioError(f"{here}: `{kind}` takes a string")
        if kind == "write" and not isinstance(step.get("content", ""), str):
            raise ScenarioError(f"{here}: `content` must be a string")
        if kind == "sleep" and (not isinstance(value, int | float) or value < 0):
            raise ScenarioError(f"{here}: `sleep` takes a number of seconds")
        if kind == "exit" and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 255):
            raise ScenarioError(f"{here}: `exit` takes an exit status 0-255")
        if kind == "event" and not isinstance(value, dict):
            raise ScenarioError(f"{here}: `event` takes a JSON object")
        if kind == "bad_json" and not isinstance(value, bool | str):
            raise ScenarioError(f"{here}: `bad_json` takes true or the broken text to print")
        if kind == "usage":
            counters = ("input_tokens", "cached_input_tokens", "output_tokens")
            if (
                not isinstance(value, dict)
                or set(value) - set(counters)
                or not all(isinstance(value.get(c, 0), int) and value.get(c, 0) >= 0 for c in counters)
            ):
                raise ScenarioError(f"{here}: `usage` takes {{{', '.join(counters)}}} as counts")


# --- choosing the steps for this prompt -------------------------------------------------------------------------


def read_role_line(prompt: str) -> dict[str, str] | None:
    """role, job, task and attempt from the prompt's first line; None when it is not a role line."""
    first_line = prompt.split("\n", 1)[0].removesuffix("\r")
    found = ROLE_LINE.fullmatch(first_line)
    return found.groupdict() if found else None


def case_matches(match: dict[str, Any], prompt: str, role_line: dict[str, str] | None) -> bool:
    """Every key of the match agrees with the prompt; a prompt without a role line matches only `prompt`."""
    for key, wanted in match.items():
        if key == "prompt":
            agrees = re.search(wanted, prompt) is not None
        else:
            agrees = role_line is not None and (int(role_line[key]) if key == "attempt" else role_line[key]) == wanted
        if not agrees:
            return False
    return True


def steps_for(scenario: dict[str, Any], prompt: str, role_line: dict[str, str] | None, name: str) -> list[Any]:
    """The steps of the first case that matches, else the top-level steps, else one failing the turn."""
    for case in scenario.get("cases", []):
        if case_matches(case["match"], prompt, role_line):
            return case["steps"]
    if "steps" in scenario:
        return scenario["steps"]
    if role_line is None:
        first_line = prompt.split("\n", 1)[0]
        what = f"this prompt, whose first line is not a `Numerus role: …` line ({first_line[:80]!r})"
    else:
        what = "role {role}, task {task}, attempt {attempt} (job {job})".format(**role_line)
    # Reported as codex reports a failed turn, so the daemon records it as the agent's error and the run fails.
    return [{"fail": f"{PROG}: scenario {name} has no case for {what}, and no top-level `steps` to play instead"}]


# --- playing it -------------------------------------------------------------------------------------------------


class Player:
    """Plays a scenario's steps in a working root, printing codex's JSONL events (or plain text)."""

    def __init__(
        self, *, root: str, prompt: str, role_line: dict[str, str] | None, thread_id: str, json_output: bool
    ) -> None:
        self.root = root
        self.prompt = prompt
        self.role_line = role_line
        self.thread_id = thread_id
        self.json_output = json_output
        self.turn_open = False
        self.turn_failed = False
        self.usage = {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0}
        self.last_message: str | None = None
        self.next_item = 0

    def emit(self, event: dict[str, Any], human: str | None = None) -> None:
        if self.json_output:
            write_out(json.dumps(event, ensure_ascii=False, separators=(",", ":")) + "\n")
        elif human is not None:
            write_out(human + "\n")

    def item(self, phase: str, details: dict[str, Any], item_id: str | None = None) -> str:
        if item_id is None:
            item_id = f"item_{self.next_item}"
            self.next_item += 1
        self.emit({"type": f"item.{phase}", "item": {"id": item_id, **details}})
        return item_id

    def start(self) -> None:
        self.emit({"type": "thread.started", "thread_id": self.thread_id})

    def open_turn(self) -> None:
        if not self.turn_open:
            self.emit({"type": "turn.started"})
            self.turn_open = True
            self.turn_failed = False

    def close_turn(self) -> None:
        if self.turn_open:
            self.emit({"type": "turn.completed", "usage": dict(self.usage)})
            self.turn_open = False

    def play(self, step: dict[str, Any]) -> int | None:
        """Play one step; an exit status if the step ends the run."""
        kind = next(key for key in step if key in STEP_KEYS)
        value = step[kind]
        if kind == "exit":
            return int(value)
        self.open_turn()
        if kind == "say":
            self.say(self.fill(value if isinstance(value, str) else json.dumps(value)))
        elif kind == "answer":
            # Placeholders are filled in the value's strings before it is encoded, so a prompt holding quotes
            # cannot break the JSON. A string is the text itself, so a test can answer broken JSON.
            answer = self.fill_strings(value)
            if not isinstance(answer, str):
                answer = json.dumps(answer, ensure_ascii=False, separators=(",", ":"))
            self.say(answer)
        elif kind == "think":
            self.item("completed", {"type": "reasoning", "text": self.fill(value)})
        elif kind in ("write", "delete"):
            self.change_file(kind, self.fill(value, in_path=True), self.fill(step.get("content", "")))
        elif kind == "run":
            self.run(self.fill(value, in_shell=True))
        elif kind == "sleep":
            time.sleep(float(value))
        elif kind == "print":
            write_out(value if value.endswith("\n") else value + "\n")
        elif kind == "read":
            # A prompt line, then one line from its terminal (what `numerusctl attach` types), said back. The
            # prompt ends its line: the daemon holds a partial line back until it ends (redaction needs whole lines).
            write_out(value if value.endswith("\n") else value + "\n")
            line = sys.stdin.readline()
            self.say("read: " + line.rstrip("\r\n"))
        elif kind == "stderr":
            os.write(2, (value if value.endswith("\n") else value + "\n").encode())
        elif kind == "bad_json":
            broken = value if isinstance(value, str) else '{"type":"item.completed","item":{"id":"item_x","ty'
            write_out(broken + "\n")
        elif kind == "error":
            self.emit({"type": "error", "message": value}, human=f"ERROR: {value}")
        elif kind == "event":
            write_out(json.dumps(value, ensure_ascii=False, separators=(",", ":")) + "\n")
        elif kind == "usage":
            self.usage = {c: int(value.get(c, 0)) for c in self.usage}
            self.close_turn()
        elif kind == "fail":
            self.emit({"type": "turn.failed", "error": {"message": value}}, human=f"ERROR: {value}")
            self.turn_open = False
            self.turn_failed = True
        return None

    def say(self, text: str) -> None:
        """An agent message, which is also what the `-o` file will hold if nothing is said after it."""
        self.last_message = text
        self.emit({"type": "item.completed", "item": self.agent_message(text)}, human=text)

    def agent_message(self, text: str) -> dict[str, Any]:
        item_id = f"item_{self.next_item}"
        self.next_item += 1
        return {"id": item_id, "type": "agent_message", "text": text}

    def fill(self, text: str, *, in_shell: bool = False, in_path: bool = False) -> str:
        """The text with its placeholders filled in, in one pass (a filled-in prompt is not searched again).

        `{prompt}` is the prompt as it is, even in a shell command, as it always was; in a file's path it stays as
        written. `{role}`, `{job}`, `{task}` and `{attempt}` come from the role line and stay as written when the
        prompt has none; in a shell command they are quoted if they hold anything but safe characters (the
        daemon's ids never do).
        """

        def value(placeholder: re.Match[str]) -> str:
            name = placeholder.group(1)
            if name == "prompt":
                return placeholder.group(0) if in_path else self.prompt
            if self.role_line is None:
                return placeholder.group(0)
            if in_shell:
                import shlex  # only scenarios that run commands pay for it

                return shlex.quote(self.role_line[name])
            return self.role_line[name]

        return PLACEHOLDER.sub(value, text)

    def fill_strings(self, value: Any) -> Any:
        """A JSON value with the placeholders filled in each string in it (keys stay as written)."""
        if isinstance(value, str):
            return self.fill(value)
        if isinstance(value, list):
            return [self.fill_strings(v) for v in value]
        if isinstance(value, dict):
            return {k: self.fill_strings(v) for k, v in value.items()}
        return value

    def change_file(self, kind: str, relative: str, content: str) -> None:
        path = os.path.join(self.root, relative)
        if kind == "write":
            change = "update" if os.path.exists(path) else "add"
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(content)
        else:
            change = "delete"
            os.remove(path)
        self.item(
            "completed",
            {"type": "file_change", "changes": [{"path": path, "kind": change}], "status": "completed"},
        )

    def run(self, command: str) -> None:
        import subprocess  # only scenarios that run commands pay for it

        details = {"type": "command_execution", "command": command, "aggregated_output": "", "exit_code": None}
        item_id = self.item("started", {**details, "status": "in_progress"})
        done = subprocess.run(
            ["/bin/sh", "-c", command],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            check=False,
        )
        exit_code = done.returncode
        self.item(
            "completed",
            {
                **details,
                "aggregated_output": done.stdout.decode("utf-8", "replace"),
                "exit_code": exit_code,
                "status": "completed" if exit_code == 0 else "failed",
            },
            item_id,
        )


def write_out(text: str) -> None:
    """Write to stdout unbuffered: a reader in a PTY sees each event the moment it happens."""
    data = text.encode("utf-8")
    while data:
        data = data[os.write(1, data) :]


def inside_git_repository(path: str) -> bool:
    """Like codex's check: a `.git` in the directory or any parent, short of the directories named in
    GIT_CEILING_DIRECTORIES, where git's own search stops too (the tests name theirs: a stray /tmp/.git on a
    shared machine made every test directory a repository)."""
    ceilings = {os.path.realpath(p) for p in os.environ.get("GIT_CEILING_DIRECTORIES", "").split(os.pathsep) if p}
    path = os.path.realpath(path)
    while True:
        if os.path.exists(os.path.join(path, ".git")):
            return True
        parent = os.path.dirname(path)
        if parent == path or parent in ceilings:
            return False
        path = parent


def fail(message: str, status: int) -> NoReturn:
    os.write(2, (message.rstrip("\n") + "\n").encode())
    raise SystemExit(status)


def new_thread_id() -> str:
    """A random UUID, as codex's thread ids are (without importing uuid)."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) % 4]}{h[17:20]}-{h[20:32]}"


def main(argv: list[str] | None = None) -> int:
    """Play the scenario as `codex exec` would run the prompt; the process's exit status."""
    try:
        opts = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        fail(f"error: {e}\n\n{USAGE}\n\nFor more information, try '--help'.", 2)
    try:
        scenario = load_scenario(os.environ)
    except ScenarioError as e:
        fail(f"{PROG}: bad scenario: {e}", 2)

    root = os.path.abspath(opts.get("cd") or ".")
    if not os.path.isdir(root):
        fail(f"Error: cannot use {root} as the working root: no such directory", 1)
    if not opts.get("skip_git_repo_check") and not inside_git_repository(root):
        fail("Not inside a trusted directory and --skip-git-repo-check was not specified.", 1)
    if opts.get("output_schema") is not None:
        try:
            with open(opts["output_schema"], encoding="utf-8") as f:
                json.load(f)
        except (OSError, ValueError) as e:
            fail(f"Error: cannot load --output-schema {opts['output_schema']}: {e}", 1)

    prompt = opts["prompt"]
    if prompt is None or prompt == "-":
        if prompt is None and os.isatty(0):
            fail("No prompt provided. Either specify one as an argument or pipe the prompt into stdin.", 1)
        prompt = sys.stdin.read()

    role_line = read_role_line(prompt)
    steps = steps_for(scenario, prompt, role_line, os.environ.get("NUMERUS_SCENARIO") or "(default)")
    thread_id = opts["resume"] or scenario.get("thread_id") or new_thread_id()
    player = Player(
        root=root, prompt=prompt, role_line=role_line, thread_id=thread_id, json_output=bool(opts.get("json"))
    )
    player.start()
    for step in steps:
        status = player.play(step)
        if status is not None:
            # Like a crash: the turn stays open and no last message is written.
            return status
    player.close_turn()
    last_message_file = opts.get("output_last_message")
    if last_message_file is not None and not player.turn_failed:
        with open(last_message_file, "w", encoding="utf-8") as f:
            f.write(player.last_message or "")
    return 1 if player.turn_failed else 0


if __name__ == "__main__":
    sys.exit(main())
