"""The scripted agent as a program: codex's command line, each scenario step, its exit status and its files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from numerusd.agents.scripted import scripted_agent_launcher

AGENT = scripted_agent_launcher()


def play(
    tmp_path: Path,
    steps: list[dict[str, Any]] | None,
    *args: str,
    prompt: str | None = "the prompt",
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    skip_git_check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run `numerus-scripted-agent exec --json -C <tmp_path> --skip-git-repo-check <args> -- <prompt>`, in
    `tmp_path`, with no NUMERUS_SCENARIO but the one `steps` or `env` gives."""
    environment = {k: v for k, v in os.environ.items() if k != "NUMERUS_SCENARIO"}
    if steps is not None:
        scenario = tmp_path / "scenario.json"
        scenario.write_text(json.dumps({"steps": steps}))
        environment["NUMERUS_SCENARIO"] = str(scenario)
    environment.update(env or {})
    argv = [
        *AGENT,
        "exec",
        "--json",
        "-C",
        str(tmp_path),
        *(["--skip-git-repo-check"] if skip_git_check else []),
        *args,
    ]
    if prompt is not None:
        argv += ["--", prompt]
    return subprocess.run(
        argv, input=stdin, capture_output=True, text=True, env=environment, cwd=tmp_path, timeout=20, check=False
    )


def events(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The JSON objects among the output lines (noise and broken lines skipped)."""
    found = []
    for line in done.stdout.splitlines():
        try:
            found.append(json.loads(line))
        except ValueError:
            continue
    return [event for event in found if isinstance(event, dict)]


def items(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [e["item"] for e in events(done) if e["type"] == "item.completed"]


def test_the_default_scenario_writes_a_file_and_finishes(tmp_path: Path) -> None:
    done = play(tmp_path, None, prompt="describe the repo")
    assert done.returncode == 0, done.stderr
    assert [e["type"] for e in events(done)] == [
        "thread.started",
        "turn.started",
        "item.completed",
        "item.completed",
        "item.completed",
        "turn.completed",
    ]
    assert "describe the repo" in (tmp_path / "SCRIPTED.md").read_text()


def test_each_step_kind(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("old")
    done = play(
        tmp_path,
        [
            {"say": "hello {prompt}"},
            {"say": {"tasks": [{"id": "t1"}]}},
            {"think": "hmm"},
            {"write": "sub/dir/new.txt", "content": "new\n"},
            {"delete": "old.txt"},
            {"run": "echo out; echo err >&2; exit 4"},
            {"print": "raw text"},
            {"stderr": "to stderr"},
            {"bad_json": True},
            {"event": {"type": "future.event", "x": 1}},
            {"error": "stream hiccup"},
            {"sleep": 0.01},
        ],
        prompt="world",
    )
    assert done.returncode == 0, done.stderr
    got = items(done)
    assert got[0] == {"id": "item_0", "type": "agent_message", "text": "hello world"}
    assert json.loads(got[1]["text"]) == {"tasks": [{"id": "t1"}]}  # structured output, as a JSON string
    assert got[2]["type"] == "reasoning" and got[2]["text"] == "hmm"
    assert got[3]["changes"] == [{"path": str(tmp_path / "sub/dir/new.txt"), "kind": "add"}]
    assert got[4]["changes"] == [{"path": str(tmp_path / "old.txt"), "kind": "delete"}]
    assert (tmp_path / "sub/dir/new.txt").read_text() == "new\n" and not (tmp_path / "old.txt").exists()
    assert got[5] == {
        "id": "item_5",
        "type": "command_execution",
        "command": "echo out; echo err >&2; exit 4",
        "aggregated_output": "out\nerr\n",
        "exit_code": 4,
        "status": "failed",
    }
    lines = done.stdout.splitlines()
    assert "raw text" in lines and "to stderr" in done.stderr
    broken = [line for line in lines if line.startswith("{") and line.endswith('"ty')]
    assert len(broken) == 1
    assert {"type": "future.event", "x": 1} in events(done)
    assert {"type": "error", "message": "stream hiccup"} in events(done)
    assert events(done)[-1] == {
        "type": "turn.completed",
        "usage": {"input_tokens": 0, "cached_input_tokens": 0, "output_tokens": 0},
    }


def test_usage_steps_end_turns_with_running_totals(tmp_path: Path) -> None:
    done = play(
        tmp_path,
        [
            {"say": "one"},
            {"usage": {"input_tokens": 10, "output_tokens": 2}},
            {"say": "two"},
            {"usage": {"input_tokens": 25, "cached_input_tokens": 5, "output_tokens": 4}},
        ],
    )
    assert [(e["type"], e.get("usage")) for e in events(done) if e["type"].startswith("turn.")] == [
        ("turn.started", None),
        ("turn.completed", {"input_tokens": 10, "cached_input_tokens": 0, "output_tokens": 2}),
        ("turn.started", None),
        ("turn.completed", {"input_tokens": 25, "cached_input_tokens": 5, "output_tokens": 4}),
    ]


def test_the_last_message_file(tmp_path: Path) -> None:
    out = tmp_path / "out" / "last.txt"
    out.parent.mkdir()
    done = play(tmp_path, [{"say": "first"}, {"say": "final answer"}], "-o", str(out))
    assert done.returncode == 0 and out.read_text() == "final answer"
    done = play(tmp_path, [{"say": "x"}], f"--output-last-message={out}.2")
    assert done.returncode == 0 and Path(f"{out}.2").read_text() == "x"


def test_exit_status_of_a_failed_turn_and_of_an_exit_step(tmp_path: Path) -> None:
    out = tmp_path / "last.txt"
    failed = play(tmp_path, [{"say": "trying"}, {"fail": "no luck"}], "-o", str(out))
    assert failed.returncode == 1
    assert events(failed)[-1] == {"type": "turn.failed", "error": {"message": "no luck"}}
    assert not out.exists()
    crashed = play(tmp_path, [{"say": "bye"}, {"exit": 42}, {"say": "never"}], "-o", str(out))
    assert crashed.returncode == 42
    assert [i["text"] for i in items(crashed)] == ["bye"]
    assert events(crashed)[-1]["type"] == "item.completed"  # the turn was never completed
    assert not out.exists()


def test_resume_keeps_the_thread_id(tmp_path: Path) -> None:
    done = play(tmp_path, [{"say": "again"}], "-m", "gpt-5", "resume", "0199-abc", "--json", "-o", "o.txt")
    assert done.returncode == 0, done.stderr
    assert events(done)[0] == {"type": "thread.started", "thread_id": "0199-abc"}
    assert (tmp_path / "o.txt").read_text() == "again"  # relative to the working directory, as codex does


def test_a_fresh_thread_gets_a_new_uuid(tmp_path: Path) -> None:
    first, second = (events(play(tmp_path, []))[0]["thread_id"] for _ in range(2))
    assert first != second and len(first) == 36 and first.count("-") == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--bogus"], "error: unexpected argument '--bogus' found"),
        (["resume", "t1", "-C", "/tmp"], "error: unexpected argument '-C' found"),
        (["resume", "t1", "--sandbox", "read-only"], "error: unexpected argument '--sandbox' found"),
        (["resume", "t1", "--output-schema", "s.json"], "error: unexpected argument '--output-schema' found"),
        (["--sandbox", "yolo"], "error: invalid value 'yolo' for '--sandbox <SANDBOX_MODE>'"),
        (["-m"], "error: a value is required for '-m' but none was supplied"),
        (["-c", "no-equals-sign"], "error: invalid override 'no-equals-sign'"),
        (["resume"], "error: `resume` needs a SESSION_ID"),
        (["one", "two"], "error: unexpected argument 'two' found"),
        (["--json=yes"], "error: unexpected value 'yes' for '--json'"),
    ],
)
def test_bad_command_lines_are_usage_errors(tmp_path: Path, args: list[str], message: str) -> None:
    done = play(tmp_path, [], *args, prompt=None)
    assert done.returncode == 2
    assert done.stderr.startswith(message), done.stderr
    assert "Usage: codex exec [OPTIONS] [PROMPT]" in done.stderr
    assert done.stdout == ""


def test_only_codex_exec_is_played(tmp_path: Path) -> None:
    done = subprocess.run([*AGENT, "login"], capture_output=True, text=True, timeout=20, check=False)
    assert done.returncode == 2 and "plays only `codex exec`" in done.stderr


def test_the_options_the_codex_adapter_passes_are_accepted(tmp_path: Path) -> None:
    schema = tmp_path / "schema.json"
    schema.write_text("{}")
    done = play(
        tmp_path,
        [{"say": "ok"}],
        "-s",
        "read-only",
        "-m",
        "gpt-5-codex",
        "-c",
        'model_reasoning_effort="high"',
        "--output-schema",
        str(schema),
        "--ephemeral",
        "--color",
        "never",
    )
    assert done.returncode == 0, done.stderr
    assert items(done)[0]["text"] == "ok"


def test_codex_refuses_a_directory_outside_git_without_the_flag(tmp_path: Path) -> None:
    done = play(tmp_path, None, prompt="p", skip_git_check=False)
    assert done.returncode == 1
    assert "Not inside a trusted directory and --skip-git-repo-check was not specified." in done.stderr
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done = play(tmp_path, None, prompt="p", skip_git_check=False)
    assert done.returncode == 0, done.stderr
    # Like git, it looks no higher than GIT_CEILING_DIRECTORIES: a ceiling is searched, not what is above it.
    (tmp_path / "src").mkdir()
    ceiling = {"GIT_CEILING_DIRECTORIES": str(tmp_path)}
    assert play(tmp_path, None, prompt="p", skip_git_check=False, env=ceiling).returncode == 0
    assert play(tmp_path / "src", None, prompt="p", skip_git_check=False, env=ceiling).returncode == 1


def test_a_missing_working_root_or_schema_fails(tmp_path: Path) -> None:
    done = subprocess.run(
        [*AGENT, "exec", "-C", str(tmp_path / "missing"), "--skip-git-repo-check", "p"],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 1 and "no such directory" in done.stderr
    done = play(tmp_path, [], "--output-schema", str(tmp_path / "missing.json"))
    assert done.returncode == 1 and "cannot load --output-schema" in done.stderr


def test_the_prompt_from_stdin(tmp_path: Path) -> None:
    done = play(tmp_path, [{"say": "got: {prompt}"}], prompt="-", stdin="from a pipe")
    assert items(done)[0]["text"] == "got: from a pipe"
    done = play(tmp_path, [{"say": "got: {prompt}"}], prompt=None, stdin="no dash")
    assert items(done)[0]["text"] == "got: no dash"


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("not json", "is not valid JSON"),
        ("[]", "a scenario is a JSON object"),
        ('{"steps": [{"sya": "typo"}]}', "steps[0]"),
        ('{"steps": [{"say": "a", "sleep": 1}]}', "exactly one of"),
        ('{"steps": [{"write": "f", "contents": "x"}]}', "unexpected keys contents"),
        ('{"steps": [{"sleep": "long"}]}', "`sleep` takes a number"),
        ('{"steps": [{"exit": 300}]}', "`exit` takes an exit status"),
        ('{"steps": [{"usage": {"input_tokens": -1}}]}', "`usage` takes"),
        ('{"steps": [], "extra": 1}', "unknown scenario keys: extra"),
    ],
)
def test_a_bad_scenario_fails_before_doing_anything(tmp_path: Path, scenario: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(scenario)
    done = play(tmp_path, None, env={"NUMERUS_SCENARIO": str(path)})
    assert done.returncode == 2
    assert "bad scenario" in done.stderr and message in done.stderr, done.stderr
    assert done.stdout == ""


def test_a_missing_scenario_is_named(tmp_path: Path) -> None:
    done = play(tmp_path, None, env={"NUMERUS_SCENARIO": str(tmp_path / "nope.json")})
    assert done.returncode == 2 and "cannot read scenario" in done.stderr and "nope.json" in done.stderr


def test_the_demo_scenario_by_name(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done = play(tmp_path, None, prompt="Add a greeting file", env={"NUMERUS_SCENARIO": "hello"})
    assert done.returncode == 0, done.stderr
    assert "Add a greeting file" in (tmp_path / "HELLO.md").read_text()
    kinds = [item["type"] for item in items(done)]
    assert kinds == ["reasoning", "agent_message", "file_change", "command_execution", "agent_message"]
    assert events(done)[-1]["usage"]["input_tokens"] > 0


def test_runs_as_a_module_too(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "numerusd.agents.scripted_agent", "exec", "--json", "--skip-git-repo-check", "hi"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["type"] == "thread.started"


# --- one scenario for every role: cases, answers, placeholders ------------------------------------------------

PIPELINE = Path(__file__).parent / "scenarios" / "pipeline.json"
JOB = "01JX7Z8Q4M2N5P6R7S8T9V0W1X"


def role_prompt(role: str, task: str = "-", attempt: int = 1, body: str = "Do the work.") -> str:
    """A prompt as the daemon builds it: the role line, then the instructions."""
    return f"Numerus role: {role} · job {JOB} · task {task} · attempt {attempt}\n\n{body}"


def play_pipeline(tmp_path: Path, prompt: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Play tests/scenarios/pipeline.json for the prompt, with `-o`; the run and the `-o` file."""
    answer = tmp_path / "answer.json"
    done = play(tmp_path, None, "-o", str(answer), prompt=prompt, env={"NUMERUS_SCENARIO": str(PIPELINE)})
    return done, answer


def test_the_planner_answers_broken_json_then_a_plan(tmp_path: Path) -> None:
    schema = tmp_path / "plan.schema.json"
    schema.write_text("{}")
    done, answer = play_pipeline(tmp_path, role_prompt("planner", attempt=1))
    assert done.returncode == 0, done.stderr
    assert answer.read_text() == '{"summary": "Add a greeting", "tasks": [{"id": "t1"'  # the string, verbatim
    with pytest.raises(ValueError):
        json.loads(answer.read_text())

    done, answer = play_pipeline(tmp_path, role_prompt("planner", attempt=2))
    assert done.returncode == 0, done.stderr
    plan = json.loads(answer.read_text())
    assert [task["id"] for task in plan["tasks"]] == ["t1", "t2", "t3"]
    assert answer.read_text().startswith('{"summary":"Add a greeting and its test","tasks":[{')  # compact
    assert items(done)[-1] == {"id": "item_0", "type": "agent_message", "text": answer.read_text()}
    assert events(done)[-1]["usage"]["output_tokens"] == 120


@pytest.mark.parametrize(
    ("role", "task", "attempt", "expected"),
    [
        ("claimer", "t3", 1, {"paths": [{"path": "tests/test_hello.sh", "kind": "file", "mode": "create"}]}),
        ("claimer", "t1", 1, {"paths": [{"path": "t1.md", "kind": "file", "mode": "create"}], "commands": []}),
        ("reviewer", "t3", 1, {"verdict": "fail", "reasons": ["t3: the test does not run on attempt 1"]}),
        ("reviewer", "t3", 2, {"verdict": "pass", "reasons": []}),
        ("reviewer", "t1", 1, {"verdict": "pass", "reasons": []}),
    ],
)
def test_each_role_task_and_attempt_gets_its_answer(
    tmp_path: Path, role: str, task: str, attempt: int, expected: dict[str, Any]
) -> None:
    done, answer = play_pipeline(tmp_path, role_prompt(role, task, attempt))
    assert done.returncode == 0, done.stderr
    assert json.loads(answer.read_text()).items() >= expected.items()


def test_executors_play_their_task_case(tmp_path: Path) -> None:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    done, answer = play_pipeline(tmp_path, role_prompt("executor", "t1", 3))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t1.md").read_text() == "t1, attempt 3\n"
    assert answer.read_text() == "Wrote t1.md."
    assert "t1.md" in items(done)[1]["aggregated_output"]

    done, answer = play_pipeline(tmp_path, role_prompt("executor", "t2"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "t2.md").read_text() == f"notes for job {JOB}\n"
    assert (tmp_path / "HELLO.md").read_text() == "not mine to write\n"  # outside t2's claim, as the case says


def test_no_matching_case_fails_the_turn_and_names_what_had_none(tmp_path: Path) -> None:
    done, answer = play_pipeline(tmp_path, role_prompt("queen", attempt=4, body="Revise the plan."))
    assert done.returncode == 1
    assert events(done)[-1] == {
        "type": "turn.failed",
        "error": {
            "message": f"numerus-scripted-agent: scenario {PIPELINE} has no case for role queen, task -, attempt 4 "
            f"(job {JOB}), and no top-level `steps` to play instead"
        },
    }
    assert not answer.exists()

    done, answer = play_pipeline(tmp_path, "Just a prompt.\nNo role line.")
    assert done.returncode == 1
    message = events(done)[-1]["error"]["message"]
    assert "no case for this prompt, whose first line is not a `Numerus role: …` line ('Just a prompt.')" in message


def test_a_prompt_case_searches_the_whole_prompt(tmp_path: Path) -> None:
    done, _ = play_pipeline(tmp_path, role_prompt("queen", body="The tasks are in a\nDeadlock over src/."))
    assert done.returncode == 1
    assert events(done)[-1]["error"]["message"] == "the queen gives up on a deadlock"


def test_the_top_level_steps_play_when_no_case_matches(tmp_path: Path) -> None:
    scenario = tmp_path / "scenario.json"
    scenario.write_text(
        json.dumps(
            {
                "cases": [
                    {"match": {"role": "reviewer", "prompt": "^Numerus"}, "steps": [{"say": "the case"}]},
                    {"match": {"prompt": "no role line"}, "steps": [{"say": "role {role}, task {task}"}]},
                ],
                "steps": [{"say": "the top-level steps for {role}"}],
            }
        )
    )
    env = {"NUMERUS_SCENARIO": str(scenario)}
    said = {
        prompt: [item["text"] for item in items(play(tmp_path, None, prompt=prompt, env=env))]
        for prompt in (role_prompt("reviewer"), role_prompt("planner"), "a prompt with no role line")
    }
    assert said == {
        role_prompt("reviewer"): ["the case"],
        role_prompt("planner"): ["the top-level steps for planner"],
        "a prompt with no role line": ["role {role}, task {task}"],  # nothing to fill them with: left as written
    }


def test_placeholders_in_each_step_that_takes_them(tmp_path: Path) -> None:
    prompt = role_prompt("executor", "t7", 2, body='Say "hi";\nthen stop.')
    done = play(
        tmp_path,
        [
            {"say": "{role} {task} {attempt} {job}"},
            {"think": "{role} on {task}"},
            {"write": "{task}/out-{attempt}-{prompt}.txt", "content": "{role}/{task}/{attempt}/{job}\n"},
            {"run": "printf '%s|' {role} {task} {attempt} {job}"},
            {"answer": {"echo": "{prompt}", "{task}": ["attempt {attempt}", 2, None]}},
            {"answer": "{task} as text"},
        ],
        prompt=prompt,
    )
    assert done.returncode == 0, done.stderr
    got = items(done)
    assert got[0]["text"] == f"executor t7 2 {JOB}"
    assert got[1]["text"] == "executor on t7"
    # In a path, the role line's values are filled in but not the prompt.
    assert (tmp_path / "t7" / "out-2-{prompt}.txt").read_text() == f"executor/t7/2/{JOB}\n"
    assert got[3]["aggregated_output"] == f"executor|t7|2|{JOB}|"
    # Filled in before encoding: a prompt with quotes and newlines still gives valid JSON; keys stay as written.
    assert json.loads(got[4]["text"]) == {"echo": prompt, "{task}": ["attempt 2", 2, None]}
    assert got[5]["text"] == "t7 as text"


def test_role_line_values_are_quoted_in_commands(tmp_path: Path) -> None:
    done = play(tmp_path, [{"run": "echo {task}"}], prompt=role_prompt("executor", "t1;touch${IFS}pwned"))
    assert done.returncode == 0, done.stderr
    assert items(done)[0]["aggregated_output"] == "t1;touch${IFS}pwned\n"
    assert not (tmp_path / "pwned").exists()


def test_an_answer_is_compact_json_and_keeps_unicode(tmp_path: Path) -> None:
    out = tmp_path / "answer.json"
    done = play(tmp_path, [{"answer": {"reasons": ["café", "a, b"], "n": 1.5, "ok": True}}], "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert out.read_text(encoding="utf-8") == '{"reasons":["café","a, b"],"n":1.5,"ok":true}'


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ({"cases": [{"match": {}, "steps": []}, {"match": {"attempt": "2"}, "steps": []}]}, "cases[1].match.attempt"),
        ({"cases": [{"match": {"attempt": True}, "steps": []}]}, "cases[0].match.attempt: `attempt` takes a whole"),
        ({"cases": [{"match": {"colour": "red"}, "steps": []}]}, "cases[0].match.colour: unknown match key"),
        ({"cases": [{"match": {"prompt": "(unclosed"}, "steps": []}]}, "cases[0].match.prompt: bad regular exp"),
        ({"cases": [{"match": {"role": ["planner"]}, "steps": []}]}, "cases[0].match.role: `role` takes a string"),
        ({"cases": [{"match": {"task": 2}, "steps": []}]}, "cases[0].match.task: `task` takes a string"),
        ({"cases": [{"match": [], "steps": []}]}, "cases[0].match: `match` is an object"),
        ({"cases": [{"steps": []}]}, "cases[0].match: `match` is an object"),
        ({"cases": [{"match": {}}]}, "cases[0]: a case needs the `steps`"),
        ({"cases": [{"match": {}, "steps": {}}]}, "cases[0].steps: `steps` must be a list"),
        ({"cases": [{"match": {}, "steps": [{"say": "a"}, {"sleep": -1}]}]}, "cases[0].steps[1]"),
        ({"cases": [{"match": {}, "when": 1, "steps": []}]}, "cases[0].when: unknown case key"),
        ({"cases": ["planner"]}, "cases[0]: a case is an object"),
        ({"cases": {}}, "`cases` must be a list"),
        ({"description": "nothing to play"}, "a scenario needs a list of `steps`, a list of `cases`, or both"),
        ({"steps": [{"answer": 1, "say": "x"}]}, "steps[0]"),
    ],
)
def test_a_bad_case_is_refused_with_its_path(tmp_path: Path, scenario: object, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(scenario))
    done = play(tmp_path, None, prompt=role_prompt("planner"), env={"NUMERUS_SCENARIO": str(path)})
    assert done.returncode == 2
    assert done.stderr.startswith(f"numerus-scripted-agent: bad scenario: {path}: {message}"), done.stderr
    assert done.stdout == ""
