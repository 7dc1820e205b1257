"""Generated files match the types, and events written by earlier versions still decode and replay."""

from __future__ import annotations

from pathlib import Path

from numerusd import domain, schemas
from numerusd.protocol.envelope import digest, open_event
from numerusd.protocol.events import EVENT_TYPES

DATA = Path(__file__).parent / "data"
V1_KEYS = {"ktest-v1": bytes(32)}


def test_checked_in_schemas_and_event_catalogue_are_current():
    stale = [
        str(path.relative_to(schemas.ROOT))
        for path, content in schemas.generated().items()
        if not path.exists() or path.read_text() != content
    ]
    assert stale == [], "run 'python -m numerusd.schemas' to regenerate"


def test_every_event_type_is_in_the_schema_and_the_catalogue():
    schema = schemas.events_schema()
    catalogue = (schemas.ROOT / "docs" / "events.md").read_text()
    for name in EVENT_TYPES:
        assert name in schema["$defs"]
        assert f"## {name}\n" in catalogue


def test_events_written_by_version_0_1_still_verify_decode_and_replay():
    lines = (DATA / "events_v1.jsonl").read_bytes().splitlines()
    events, prev = [], ""
    for wire in lines:
        event = open_event(wire, V1_KEYS)
        assert event.prev == prev
        prev = digest(wire)
        events.append(event)
    (job,) = domain.fold(events).values()
    assert job.status == "completed"
    task = job.tasks["t1"]
    assert (task.status, task.exit_code, task.input_tokens, task.thread_id) == (
        "completed",
        0,
        1200,
        "0199a213-81c0-7800-8aa1-bbab2a035a53",
    )
