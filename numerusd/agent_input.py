"""Input typed into a running agent's terminal: the daemon's side of `numerusctl attach`.

The daemon subscribes to `numerus.input.>`. Each message is a request whose body is bytes for the terminal of one
task's running agent, named by its subject `numerus.input.<job>.<task>` (the whole job id: numerusctl resolves
`last` and short ids first). Refused with a one-line error reply, nothing recorded and nothing written:

* a message with no reply subject (whoever sent it cannot be told, nor known: the reply inbox proves the role);
* a subject that is not exactly one job token and one task token (a wildcard, more or fewer parts);
* more than `MAX_INPUT_BYTES`;
* a job this daemon does not know, or a task of it that is not running (the domain's refusal, in its words), or
  whose agent is not running in this daemon.

Otherwise the input is decided through `JobBook.decide` (`InputSent` -> `AgentInputSent`: its size, its HMAC-SHA256
under the signing key and who sent it, never the bytes) and only then written to the agent's PTY, within
INPUT_WRITE_S.

Who may publish here is the bus's to say (`bus_roles.py`: the operator, never a viewer). Messages are handled one
at a time, in the order they arrive, so what is typed reaches the terminal in order.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from numerusd.book import JobBook
from numerusd.domain.observations import InputSent
from numerusd.errors import CommandRefused, NotFound, NumerusError, TooLarge, one_line
from numerusd.keys import Keyring
from numerusd.protocol import subjects
from numerusd.protocol.attach import MAX_INPUT_BYTES, InputReply
from numerusd.protocol.commands import ErrorReply
from numerusd.protocol.connection import USER_HEADER, asker
from numerusd.protocol.ids import is_token
from numerusd.supervisor import Agents

log = logging.getLogger(__name__)

#: How long one input may wait for room in a terminal whose agent is slow to read it.
INPUT_WRITE_S = 2.0

_encoder = msgspec.json.Encoder()


async def listen_for_input(nc: Client, book: JobBook, agents: Agents, keyring: Keyring) -> Subscription:
    """Subscribe to `numerus.input.>` and serve each message as the module docstring says."""

    async def on_message(msg: Msg) -> None:
        if not msg.reply:
            log.warning("input on %s without a reply subject: ignored", msg.subject)
            return
        try:
            reply = await _type_in(book, agents, keyring, msg)
        except NumerusError as e:
            await _answer_error(nc, msg.reply, e)
            return
        except Exception:
            log.exception("input on %s failed", msg.subject)
            await _answer_error(nc, msg.reply, NumerusError("internal error, see the daemon log"))
            return
        await nc.publish(msg.reply, _encoder.encode(reply))

    return await nc.subscribe(subjects.INPUTS, cb=on_message)


async def _type_in(book: JobBook, agents: Agents, keyring: Keyring, msg: Msg) -> InputReply:
    target = subjects.input_target(msg.subject)
    if target is None or not all(is_token(part) for part in target):
        raise CommandRefused(f"input goes to numerus.input.<job>.<task> (one id each), not {msg.subject}")
    job_id, task_id = target
    data = msg.data or b""
    if len(data) > MAX_INPUT_BYTES:
        raise TooLarge(f"the input is {len(data)} bytes, over the limit of {MAX_INPUT_BYTES} bytes: send it in pieces")
    if job_id not in book.jobs:
        raise NotFound(f"no job {job_id}")
    if agents.terminal_of(job_id, task_id) is None:
        task = book.jobs[job_id].tasks.get(task_id)
        state = "no such task" if task is None else f"task {task_id} is {task.status}"
        raise CommandRefused(f"{state}: only a running agent of job {job_id} takes input")
    by = asker((msg.headers or {}).get(USER_HEADER), msg.reply)
    mac = hmac.new(keyring.current_key, data, hashlib.sha256).hexdigest()
    await book.decide(job_id, InputSent(task=task_id, size=len(data), mac=mac, by=by))
    terminal = agents.terminal_of(job_id, task_id)  # looked up again: the agent may have ended meanwhile
    written = await terminal.write(data, INPUT_WRITE_S) if terminal is not None else 0
    return InputReply(size=len(data), written=written)


async def _answer_error(nc: Client, reply: str, error: NumerusError) -> None:
    message = one_line(error.message)
    headers = {"Nats-Service-Error-Code": "400" if isinstance(error, CommandRefused) else "500"}
    headers["Nats-Service-Error"] = message
    await nc.publish(reply, _encoder.encode(ErrorReply(code=error.code, message=message)), headers=headers)
