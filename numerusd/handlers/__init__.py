"""One module per request verb: `numerusctl <verb>` -> `numerus.cmd.<verb>` -> `handlers/<verb>.py`.

Each module exports `async def handle(context, request) -> reply`, where `context` (see `context.py`) is all
it may use of the daemon. A handler sees typed requests only (the service decodes at the edge) and raises
`CommandRefused` and its subclasses to refuse.
"""

from numerusd.handlers import approve, clean, events, kill, logs, plan, reject, run, status

#: The handler of each verb.
HANDLERS = {
    "run": run.handle,
    "status": status.handle,
    "kill": kill.handle,
    "logs": logs.handle,
    "events": events.handle,
    "plan": plan.handle,
    "clean": clean.handle,
    "approve": approve.handle,
    "reject": reject.handle,
}
