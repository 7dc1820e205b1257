"""A scripted model for the real `codex exec`: a local server speaking the part of the OpenAI Responses API codex uses.

Codex (codex-rs, `wire_api = "responses"`) sends every model turn as `POST <base_url>/responses` with
`"stream": true` and reads server-sent events: `response.created`, `response.output_item.added`,
`response.output_text.delta`, `response.output_item.done` (an assistant `message`, or a `function_call` of one of
the tools the request offers) and `response.completed` with the usage. After running a tool call, codex asks again
with the whole conversation plus the tool's output, until a response holds no tool call.

This server answers from a scenario instead of a model, keyed on the role line every Numerus prompt starts with
(`Numerus role: executor · job … · task t2 · attempt 1`, numerusd/prompts.py), as the scripted agent is. The
request a response answers is counted by the tool outputs the conversation holds since the prompt, so the server
keeps no state per conversation:

    {"cases": [
      {"match": {"role": "executor", "task": "t1"}, "responses": [
        {"run": "git status --short"},
        {"patch": "*** Begin Patch\\n*** Add File: HELLO.md\\n+# Hello\\n*** End Patch"},
        {"say": "Added HELLO.md.", "usage": {"input_tokens": 900, "cached_input_tokens": 0, "output_tokens": 40}}
      ]},
      {"match": {"role": "reviewer"}, "responses": [{"answer": {"verdict": "pass", "reasons": []}}]}
    ]}

A response is one of `run` (a shell command, through the shell tool the request offers), `patch` (an apply_patch
patch: the `apply_patch` tool when offered, else the `apply_patch <<'EOF'` shell form codex intercepts), `say`
(a final message) or `answer` (a final message holding a JSON value, compact). Which tools a request offers depends
on the model codex asks for: a model codex has no metadata for gets the classic `exec_command` function; codex
0.169's default model gets "code mode", one freeform `exec` tool (in an `additional_tools` input item) whose input
is JavaScript calling `tools.exec_command({cmd})` and `tools.apply_patch(patch)`; both are spoken.

`delay` (seconds) holds an answer back, `usage` sets its token counts. In `say` and `answer` strings, `{role}`,
`{job}`, `{task}` and `{attempt}` are filled from the role line. `match` takes `role`, `task` and `attempt`; the
first case that agrees is played.

The server refuses an `--output-schema` that OpenAI's strict structured outputs would refuse (an object whose
`required` does not list every property, or without `"additionalProperties": false`) with the API's error, and
records every request it saw in `exchanges`, and what it could not answer in `misses`.

Run it alone with `python -m tests.fake_model SCENARIO.json`; it prints the `-c` options that point codex at it.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

#: The first line of a Numerus prompt (numerusd.prompts.header).
ROLE_LINE = re.compile(r"^Numerus role: (\S+) · job (\S+) · task (\S+) · attempt (\d+)$")
#: What the model provider is called in codex's configuration.
PROVIDER = "numerus_fake"
#: The kinds of response a scenario may give, one per response.
KINDS = ("run", "patch", "say", "answer")
#: Items codex appends to the conversation after running a tool call.
TOOL_OUTPUTS = {"function_call_output", "custom_tool_call_output", "local_shell_call_output"}


def codex_args(base_url: str) -> list[str]:
    """The `codex exec` options that make codex use this server as its model provider, with no API key."""
    provider = f"model_providers.{PROVIDER}"
    return [
        "-c",
        f'model_provider="{PROVIDER}"',
        "-c",
        f'{provider}.name="Numerus fake model"',
        "-c",
        f'{provider}.base_url="{base_url}"',
        "-c",
        f'{provider}.wire_api="responses"',
        # A refused request fails at once instead of after codex's retries with back-off.
        "-c",
        f"{provider}.request_max_retries=0",
        "-c",
        f"{provider}.stream_max_retries=0",
    ]


@dataclass(frozen=True)
class RoleLine:
    """Which call of a job a prompt is."""

    role: str
    job: str
    task: str
    attempt: int

    def __str__(self) -> str:
        return f"{self.role} {self.task} attempt {self.attempt}"


@dataclass(frozen=True)
class Exchange:
    """One request the server answered: whose, which response of its case, what it answered."""

    who: RoleLine | None
    index: int
    answered: str
    schema: str | None
    status: int = 200
    #: How the tool call before this request ended, as codex told the model ("exit code 0"), if there was one.
    previous: str | None = None

    def __str__(self) -> str:
        who = str(self.who) if self.who else "(no role line)"
        schema = f" [schema {self.schema}]" if self.schema else ""
        status = f" HTTP {self.status}" if self.status != 200 else ""
        previous = f" (the call before: {self.previous})" if self.previous else ""
        return f"{who} #{self.index + 1}{schema}{status}{previous}: {self.answered}"


class ScenarioError(ValueError):
    """A scenario that cannot be played: an unknown key, a response with no kind or two."""


def check_scenario(scenario: dict[str, Any]) -> dict[str, Any]:
    """The scenario, once it is known to be playable; ScenarioError naming the bad item otherwise."""
    if set(scenario) - {"description", "cases"} or not isinstance(scenario.get("cases"), list):
        raise ScenarioError("a scenario is {'description': ..., 'cases': [...]}")
    for i, case in enumerate(scenario["cases"]):
        if set(case) - {"description", "match", "responses"} or not isinstance(case.get("responses"), list):
            raise ScenarioError(f"cases[{i}]: a case is {{'match': {{...}}, 'responses': [...]}}")
        if set(case.get("match", {})) - {"role", "task", "attempt"}:
            raise ScenarioError(f"cases[{i}].match: only role, task and attempt")
        for j, response in enumerate(case["responses"]):
            kinds = [key for key in response if key in KINDS]
            if len(kinds) != 1 or set(response) - {*KINDS, "delay", "usage"}:
                raise ScenarioError(f"cases[{i}].responses[{j}]: one of {', '.join(KINDS)}, and delay, usage")
    return scenario


def role_line(prompt: str) -> RoleLine | None:
    """The role line of a prompt, if its first line is one."""
    found = ROLE_LINE.match(prompt.split("\n", 1)[0])
    if found is None:
        return None
    role, job, task, attempt = found.groups()
    return RoleLine(role, job, task, int(attempt))


def strict_schema_errors(schema: Any, path: str = "") -> Iterator[str]:
    """Why OpenAI's strict structured outputs would refuse a JSON schema, in its own words."""
    if isinstance(schema, dict):
        properties = schema.get("properties")
        if schema.get("type") == "object" or isinstance(properties, dict):
            context = f"context=({', '.join(repr(p) for p in path.split('/') if p)})"
            if schema.get("additionalProperties") is not False:
                yield f"In {context}, 'additionalProperties' is required to be supplied and to be false."
            missing = [name for name in properties or {} if name not in schema.get("required", [])]
            if missing:
                yield (
                    f"In {context}, 'required' is required to be supplied and to be an array including every key "
                    f"in properties. Missing '{missing[0]}'."
                )
        for key, value in schema.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                for name, sub in value.items():
                    yield from strict_schema_errors(sub, f"{path}/{key}/{name}")
            elif key != "enum":
                yield from strict_schema_errors(value, f"{path}/{key}")
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            yield from strict_schema_errors(sub, f"{path}/{i}")


def _text_of(item: dict[str, Any]) -> str:
    content = item.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content or () if isinstance(part, dict))


class FakeModel:
    """The server: `start()` binds 127.0.0.1 on a free port and serves in a thread until `stop()`."""

    def __init__(self, scenario: dict[str, Any], *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.scenario = check_scenario(scenario)
        self.exchanges: list[Exchange] = []
        self.misses: list[str] = []
        #: How many requests asked for each model, and which kind of shell tool they offered.
        self.models: collections.Counter[tuple[str, str]] = collections.Counter()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        model = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # every request is in `exchanges`; stderr stays for what goes wrong

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._json(200, {"object": "list", "data": [], "models": []})
                else:
                    self._json(404, {"error": {"message": f"no such endpoint: GET {self.path}"}})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                if not self.path.rstrip("/").endswith("/responses"):
                    self._json(404, {"error": {"message": f"no such endpoint: POST {self.path}"}})
                    return
                try:
                    request = json.loads(body)
                except ValueError:
                    self._json(400, {"error": {"message": "the body is not JSON", "type": "invalid_request_error"}})
                    return
                status, payload = model.respond(request)
                if status != 200:
                    self._json(status, payload)
                    return
                stream = b"".join(
                    f"event: {event['type']}\ndata: {json.dumps(event)}\n\n".encode() for event in payload["events"]
                )
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("content-length", str(len(stream)))
                self.end_headers()
                self.wfile.write(stream)

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-model", daemon=True)

    @property
    def base_url(self) -> str:
        """What codex's `model_providers.<id>.base_url` should be."""
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeModel:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    # --- answering ------------------------------------------------------------------------------------------

    def respond(self, request: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(200, {"events": [...]}) to stream, or an error status and the API's error body."""
        items = [item for item in request.get("input", ()) if isinstance(item, dict)]
        prompt_at, who = self._find_prompt(items)
        outputs = [item for item in items[prompt_at + 1 :] if item.get("type") in TOOL_OUTPUTS]
        index = len(outputs)
        previous = _tool_result(outputs[-1]) if outputs else None
        text_format = (request.get("text") or {}).get("format") or {}
        schema_name = text_format.get("name") if text_format.get("type") == "json_schema" else None
        if schema_name and text_format.get("strict"):
            problems = list(strict_schema_errors(text_format.get("schema")))
            if problems:
                message = f"Invalid schema for response_format '{schema_name}': {problems[0]}"
                self._record(Exchange(who, index, message, schema_name, 400))
                error = {"message": message, "type": "invalid_request_error", "param": "text.format.schema"}
                return 400, {"error": {**error, "code": "invalid_json_schema"}}
        response = self._scripted(who, index)
        if response is None:
            what = f"{who} (job {who.job})" if who else "a prompt without a role line"
            miss = f"no response #{index + 1} for {what}"
            self.misses.append(miss)
            response = {"say": f"fake model: {miss}"}
        if response.get("delay"):
            time.sleep(float(response["delay"]))
        tools = _tool_names(request)
        with self._lock:
            self.models[(str(request.get("model")), _tool_style(tools))] += 1
        output, answered = self._output_item(response, who, tools)
        self._record(Exchange(who, index, answered, schema_name, previous=previous))
        return 200, {"events": self._events(output, response, len(json.dumps(items)))}

    def _find_prompt(self, items: list[dict[str, Any]]) -> tuple[int, RoleLine | None]:
        """Where the prompt is in the conversation (the last user message with a role line) and its role line."""
        users = [i for i, item in enumerate(items) if item.get("role") == "user"]
        for i in reversed(users):
            who = role_line(_text_of(items[i]))
            if who is not None:
                return i, who
        return (users[-1] if users else -1), None

    def _scripted(self, who: RoleLine | None, index: int) -> dict[str, Any] | None:
        for case in self.scenario["cases"]:
            match = case.get("match", {})
            if who is None:
                if match:
                    continue
            elif any(
                (key == "attempt" and int(value) != who.attempt) or (key != "attempt" and value != getattr(who, key))
                for key, value in match.items()
            ):
                continue
            responses = case["responses"]
            return responses[index] if index < len(responses) else None
        return None

    def _output_item(
        self, response: dict[str, Any], who: RoleLine | None, tools: set[str | None]
    ) -> tuple[dict[str, Any], str]:
        """The output item for one scripted response, and a line saying what it is."""
        n = next(self._ids)
        if "run" in response:
            return _shell_call(n, response["run"], tools), f"run {response['run']!r}"
        if "patch" in response:
            patch = response["patch"].rstrip("\n") + "\n"
            first = next((line for line in patch.splitlines() if line.startswith("*** ") and "Begin" not in line), "")
            if CODE_MODE in tools:
                # A patch that does not apply throws, and the script's output says so instead.
                script = f"const r = await tools.apply_patch({json.dumps(patch)});\n{_EXIT_0}"
                return _custom_call(n, "exec", script), f"apply_patch {first}"
            if "apply_patch" in tools:
                return _custom_call(n, "apply_patch", patch), f"apply_patch {first}"
            command = f"apply_patch <<'EOF'\n{patch}EOF\n"
            return _shell_call(n, command, tools), f"apply_patch (via the shell) {first}"
        if "answer" in response:
            text = json.dumps(_fill(response["answer"], who), separators=(",", ":"))
        else:
            text = str(_fill(response["say"], who))
        message = {"type": "message", "role": "assistant", "id": f"msg_{n}", "status": "completed"}
        shown = text if len(text) <= 100 else text[:97] + "..."
        return {**message, "content": [{"type": "output_text", "text": text, "annotations": []}]}, f"says {shown}"

    def _events(self, output: dict[str, Any], response: dict[str, Any], request_size: int) -> list[dict[str, Any]]:
        """The server-sent events of one response: created, the item (streamed if a message), completed."""
        response_id = f"resp_{next(self._ids)}"
        usage = response.get("usage") or {}
        text = "".join(part["text"] for part in output.get("content", ()))
        input_tokens = int(usage.get("input_tokens", request_size // 4))
        output_tokens = int(usage.get("output_tokens", max(1, len(text or json.dumps(output)) // 4)))
        cached = int(usage.get("cached_input_tokens", 0))
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": {"id": response_id, "status": "in_progress", "output": []}}
        ]
        if output["type"] == "message":
            events += [
                {"type": "response.output_item.added", "output_index": 0, "item": {**output, "content": []}},
                {"type": "response.output_text.delta", "item_id": output["id"], "output_index": 0, "delta": text},
            ]
        events += [
            {"type": "response.output_item.done", "output_index": 0, "item": output},
            {
                "type": "response.completed",
                "response": {
                    "id": response_id,
                    "status": "completed",
                    "usage": {
                        "input_tokens": input_tokens,
                        "input_tokens_details": {"cached_tokens": cached},
                        "output_tokens": output_tokens,
                        "output_tokens_details": {"reasoning_tokens": 0},
                        "total_tokens": input_tokens + output_tokens,
                    },
                },
            },
        ]
        return events

    def _record(self, exchange: Exchange) -> None:
        with self._lock:
            self.exchanges.append(exchange)


#: Code mode (codex's default model): one custom tool, `exec`, runs JavaScript that calls the nested tools.
CODE_MODE = "functions.exec"
_EXIT_0 = 'text("Exit code: 0\\n" + JSON.stringify(r));\n'
_SHELL_SCRIPT = 'const r = await tools.exec_command({{cmd: {}}});\ntext("Process exited with code " + r.exit_code);\n'


def _shell_call(n: int, command: str, tools: set[str | None]) -> dict[str, Any]:
    """A call of whichever shell tool the request offers (codex has renamed it over the versions)."""
    if CODE_MODE in tools:
        return _custom_call(n, "exec", _SHELL_SCRIPT.format(json.dumps(command)))
    if "exec_command" in tools:
        name, arguments = "exec_command", {"cmd": command}
    elif "shell_command" in tools:
        name, arguments = "shell_command", {"command": command}
    else:
        name, arguments = "shell", {"command": ["bash", "-lc", command]}
    call = {"type": "function_call", "name": name, "arguments": json.dumps(arguments)}
    return {**call, "id": f"fc_{n}", "call_id": f"call_{n}", "status": "completed"}


def _tool_style(tools: set[str | None]) -> str:
    """Which way of running a shell command a request offers."""
    if CODE_MODE in tools:
        return "code mode"
    return next((name for name in ("exec_command", "shell_command", "shell") if name in tools), "no shell tool")


def _custom_call(n: int, name: str, text: str) -> dict[str, Any]:
    """A call of a freeform tool: its input is the text itself."""
    return {"type": "custom_tool_call", "name": name, "input": text, "id": f"ctc_{n}", "call_id": f"call_{n}"}


def _tool_names(request: dict[str, Any]) -> set[str | None]:
    """The tools a request offers: top-level `tools`, and code mode's `exec` (as `functions.exec`)."""
    names = {tool.get("name") for tool in request.get("tools", ()) if isinstance(tool, dict)}
    for item in request.get("input", ()):
        if isinstance(item, dict) and item.get("type") == "additional_tools":
            for namespace in item.get("tools", ()):
                names |= {f"{namespace.get('name')}.{tool.get('name')}" for tool in namespace.get("tools", ())}
    return names


def _tool_result(item: dict[str, Any]) -> str:
    """What a tool call's output says of how it ended: its exit code, else its first line."""
    output = item.get("output")
    if isinstance(output, dict):  # some versions wrap it: {"content": ..., "success": ...}
        output = output.get("content", "")
    text = output if isinstance(output, str) else _text_of({"content": output})
    found = re.search(r"(?:Process exited with code|Exit code:)\s*(-?\d+)", text)
    if found:
        return f"exit code {found.group(1)}"
    first = text.strip().split("\n", 1)[0]
    return first[:80] or "no output"


def _fill(value: Any, who: RoleLine | None) -> Any:
    """`{role}`, `{job}`, `{task}` and `{attempt}` filled in every string of a JSON value (not its keys)."""
    if who is None:
        return value
    if isinstance(value, str):
        for key in ("role", "job", "task", "attempt"):
            value = value.replace(f"{{{key}}}", str(getattr(who, key)))
        return value
    if isinstance(value, list):
        return [_fill(item, who) for item in value]
    if isinstance(value, dict):
        return {key: _fill(item, who) for key, item in value.items()}
    return value


def main(argv: list[str] | None = None) -> int:
    """Serve a scenario file until interrupted; print the codex options that use it."""
    parser = argparse.ArgumentParser(prog="python -m tests.fake_model", description=__doc__.splitlines()[0])
    parser.add_argument("scenario", type=Path, help="a JSON scenario file")
    parser.add_argument("--port", type=int, default=0, help="the port on 127.0.0.1 (default: a free one)")
    args = parser.parse_args(argv)
    try:
        model = FakeModel(json.loads(args.scenario.read_text()), port=args.port)
    except (OSError, ValueError) as e:
        print(f"fake model: {args.scenario}: {e}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    model.start()
    print(model.base_url)
    print("codex exec", shlex.join(codex_args(model.base_url)), "...", flush=True)
    stop.wait()
    model.stop()
    for exchange in model.exchanges:
        print(exchange)
    for miss in model.misses:
        print(f"MISSED: {miss}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
