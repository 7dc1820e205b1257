"""The reviewer's verdict on a task's work, and the schema it answers with.

After a task's executor exits, its checks pass and its diff matches its claim, the reviewer agent is asked
(read-only sandbox, `codex exec --output-schema`) whether the work does what the task asked. Its answer is
decoded here, once; a `fail` verdict fails the quality gate and its reasons go to the executor's next attempt.

Types only: nothing here does I/O.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from numerusd.protocol.claims import strict_schema


class Verdict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Whether a task's work may be merged, and why (or why not)."""

    verdict: Annotated[
        Literal["pass", "fail"],
        msgspec.Meta(description="'pass' when the work does what the task asked and nothing else; else 'fail'."),
    ]
    reasons: Annotated[
        tuple[str, ...],
        msgspec.Meta(description="Why, one point per item; for 'fail', what the author must change."),
    ]


#: The one decoder for a reviewer's answer.
VERDICT_DECODER = msgspec.json.Decoder(Verdict)


def decode_verdict(raw: bytes | str) -> Verdict:
    """The verdict in a reviewer's answer; `msgspec.ValidationError` names the bad place, e.g. `$.verdict`."""
    return VERDICT_DECODER.decode(raw)


def output_schema() -> dict[str, Any]:
    """The JSON Schema for `codex exec --output-schema`, in the strict structured-outputs subset."""
    root = strict_schema(Verdict)
    root["title"] = "Verdict"
    return root
