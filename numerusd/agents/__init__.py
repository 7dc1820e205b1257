"""Agent adapters: how to run each kind of coding agent and read what it prints.

`base` holds the port (`AgentProfile`, `AgentInvocation`, the `AgentAdapter` and `AgentOutputParser` Protocols);
`registry` which adapter serves which kind (`adapter_for`); `codex` the OpenAI Codex CLI adapter; `scripted` the
same adapter pointed at `scripted_agent`, a fake Codex driven by a scenario file for tests and demos.

This package imports nothing on purpose: the scripted agent is started as a program many times in tests and
must start fast.
"""
