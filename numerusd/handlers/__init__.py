"""One module per request verb: `numerusctl <verb>` -> `numerus.cmd.<verb>` -> `handlers/<verb>.py`.

Each module exports `async def handle(context, request) -> reply`, where `context` (see `context.py`) is all
it may use of the daemon. A handler sees typed requests only (the service decodes at the edge) and raises
`CommandRefused` and its subclasses to refuse.
"""

from numerusd.handlers import (
    accept,
    approve,
    clean,
    diff,
    discard,
    events,
    kill,
    logs,
    pause,
    plan,
    reject,
    resume,
    retry,
    run,
    skip,
    start,
    status,
    workers,
)

#: The handler of each verb.
HANDLERS = {
    "run": run.handle,
    "status": status.handle,
    "kill": kill.handle,
    "logs": logs.handle,
    "events": events.handle,
    "plan": plan.handle,
    "clean": clean.handle,
    "resume": resume.handle,
    "retry": retry.handle,
    "skip": skip.handle,
    "pause": pause.handle,
    "start": start.handle,
    "diff": diff.handle,
    "accept": accept.handle,
    "discard": discard.handle,
    "approve": approve.handle,
    "reject": reject.handle,
    "workers": workers.handle,
}
