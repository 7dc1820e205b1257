"""What `numerusctl attach` and the daemon say on `numerus.input.<job>.<task>`: input for a running agent's terminal.

A request's body is the bytes typed, as they are, at most MAX_INPUT_BYTES (a paste is sent in pieces that size).
The reply is an `InputReply`, or an error as every verb's is (the micro-service error headers, an `ErrorReply`
body). The daemon records each input as `AgentInputSent` (its size and SHA-256, never the bytes: they may be a
secret) before it writes it to the agent's terminal. Types and constants only, shared by both programs.
"""

from __future__ import annotations

import msgspec

#: The most bytes one input message may carry; a larger one is refused whole (nothing recorded or written).
MAX_INPUT_BYTES = 64 * 1024

#: The key that detaches `numerusctl attach` from the terminal, as telnet's: Ctrl-].
DETACH_KEY = b"\x1d"


class InputReply(msgspec.Struct, frozen=True, kw_only=True):
    """The input was recorded and `written` of its `size` bytes went into the terminal (fewer: the agent does not
    read its input, and the terminal's queue is full)."""

    size: int
    written: int
