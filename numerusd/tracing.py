"""Traces: the W3C trace context a command brings, carried into its events, and spans when asked for.

A client sends its trace context as the W3C `traceparent` NATS header (numerusctl takes it from `$TRACEPARENT`).
The daemon keeps it only if it has the W3C shape (`checked`): anything else a client sends there is dropped, never
stored. The command's handler runs with it (`logs.TRACEPARENT`), so the events the command causes carry it in
their envelope (`traceparent`), and a job's later events carry the job's (see `JobBook.decide`).

Spans are exported only when asked for (setting `otel_endpoint`, else `$OTEL_EXPORTER_OTLP_ENDPOINT`) and the
optional extra is installed (`pip install 'numerus[otel]'`): one span per handled command and one per task
attempt, each a child of the trace context it runs in; the events then carry the span's own context, so a trace
viewer links them to the daemon's span. `otel_endpoint = "console"` writes the spans to stderr, one JSON object a
line, instead of sending them. Without the extra, or when nothing asks for spans, no OpenTelemetry module is
imported and `span` costs a context manager.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

from numerusd import logs
from numerusd.protocol.connection import TRACE_HEADER

log = logging.getLogger(__name__)

#: The NATS header a client puts its trace context in (the W3C name).
HEADER = TRACE_HEADER
#: version-trace id-parent id-flags, lower-case hex (W3C Trace Context, level 1).
_SHAPE = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
#: What `otel_endpoint` names to write spans to stderr rather than send them.
CONSOLE = "console"

#: The exporting tracer while spans are exported (`start`), else None.
_tracer: Any = None
_provider: Any = None


def checked(value: str | None) -> str:
    """`value` if it is a W3C traceparent Numerus may store, else "" (dropped)."""
    if not value or len(value) != 55 or not _SHAPE.fullmatch(value):
        return ""
    version, trace, span, _ = value.split("-")
    if version == "ff" or trace == _ZERO_TRACE or span == _ZERO_SPAN:
        return ""  # invalid by the W3C rules
    return value


def start(endpoint: str | None) -> bool:
    """Export spans to `endpoint` (or `$OTEL_EXPORTER_OTLP_ENDPOINT`; `console`: stderr) if one is set and the
    OpenTelemetry SDK is installed; whether spans are exported. Says in the log why not when one was asked for."""
    global _tracer, _provider
    endpoint = endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None
    if endpoint is None:
        return False
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

        provider = TracerProvider(resource=Resource.create({"service.name": "numerusd"}))
        if endpoint == CONSOLE:
            one_line = ConsoleSpanExporter(out=sys.stderr, formatter=lambda span: span.to_json(indent=None) + "\n")
            provider.add_span_processor(SimpleSpanProcessor(one_line))
        else:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            url = None if endpoint == os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else endpoint.rstrip("/")
            exporter = OTLPSpanExporter(endpoint=f"{url}/v1/traces" if url else None)
            provider.add_span_processor(BatchSpanProcessor(exporter))
    except ImportError as e:
        log.warning("spans asked for (%s) but OpenTelemetry is not installed (%s): pip install 'numerus[otel]'",
                    endpoint, e.name)  # fmt: skip
        return False
    _provider = provider
    _tracer = provider.get_tracer("numerusd")
    log.info("exporting spans to %s", endpoint)
    return True


def stop() -> None:
    """Send the spans still buffered and stop exporting."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


@contextlib.contextmanager
def span(name: str, **attributes: str | int) -> Iterator[None]:
    """A span around the block, a child of the trace context it runs in (`logs.TRACEPARENT`), with the job and
    task it works for as attributes; inside, that context is the span's own. Nothing when spans are not
    exported."""
    tracer = _tracer
    if tracer is None:
        yield
        return
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagator = TraceContextTextMapPropagator()
    parent = logs.TRACEPARENT.get()
    context = propagator.extract({HEADER: parent}) if parent else None
    ids = {"numerus.job": logs.JOB.get(), "numerus.task": logs.TASK.get()}
    attributes = {**{key: value for key, value in ids.items() if value}, **attributes}
    with tracer.start_as_current_span(name, context=context, attributes=attributes):
        carrier: dict[str, str] = {}
        propagator.inject(carrier)
        with logs.scope(traceparent=checked(carrier.get(HEADER)) or parent):
            yield
