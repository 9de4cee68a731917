"""Optional OpenTelemetry spans: one per RPC, and one per sandbox lifecycle phase under it.

Off unless asked (`corral daemon --tracing otlp|file:PATH`): then the daemon holds
`NO_TRACING`, whose hooks return one shared do-nothing span, and no opentelemetry module is
imported. On, spans go through opentelemetry-sdk (dev dependency; `corral[otlp]` in
production): `otlp` exports over OTLP/gRPC to OTEL_EXPORTER_OTLP_ENDPOINT (the SDK's
variables apply), `file:PATH` appends one JSON object a span to PATH (tests, air-gapped
hosts). Export is batched on the SDK's own thread, never on the event loop.

Spans: `SandboxesServicer.Create` etc. (kind SERVER, attributes rpc.method, corral.tenant,
rpc.grpc.status_code; status ERROR when it failed), with children for the phases the daemon
runs: `sandbox.spawn` (PID 1 cloned, id maps, cgroup, mounts, pivot_root, seccomp and the
exec of corral-init: one C call, ext/_spawn.pyx, so one span), `exec.spawn` (a command's
helper, relay and execve). No id is a span name; ids are attributes.
"""

from __future__ import annotations

import contextvars
import json


class _NoSpan:
    """The span of tracing off: every call does nothing."""

    __slots__ = ()

    def set(self, key: str, value) -> None:
        pass

    def failed(self, code: str, message: str = "") -> None:
        pass

    def end(self) -> None:
        pass


NO_SPAN = _NoSpan()
#: The RPC span of the task running now: the parent of the phases it runs.
_current: contextvars.ContextVar = contextvars.ContextVar("corral_span", default=NO_SPAN)


def current():
    """The RPC span of the task running now (NO_SPAN when none or tracing is off)."""
    return _current.get()


class NoTracing:
    """Tracing off: hooks return NO_SPAN, or the function they were given."""

    enabled = False

    def rpc(self, method: str):
        return NO_SPAN

    def phase_in_thread(self, fn, name: str, **attributes):
        """fn, run in a span `name` (child of this task's RPC span) when tracing is on."""
        return fn

    def shutdown(self) -> None:
        pass


NO_TRACING = NoTracing()


class _RpcSpan:
    __slots__ = ("span", "token")

    def __init__(self, span):
        self.span = span
        self.token = _current.set(self)

    def set(self, key: str, value) -> None:
        self.span.set_attribute(key, value)

    def failed(self, code: str, message: str = "") -> None:
        from opentelemetry.trace import Status, StatusCode

        self.span.set_attribute("rpc.grpc.status_code", code)
        self.span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:200]))

    def end(self) -> None:
        self.span.end()
        try:
            _current.reset(self.token)
        except ValueError:  # ended in another context (a stream closed from elsewhere)
            pass


class Tracing(NoTracing):
    """Spans of one daemon, from its own TracerProvider (never the global one)."""

    enabled = True

    def __init__(self, target: str, service_name: str = "corral-daemon"):
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter_for(target)))
        self.tracer = self.provider.get_tracer("corral.runtime")

    def rpc(self, method: str):
        from opentelemetry.trace import SpanKind

        return _RpcSpan(self.tracer.start_span(method, kind=SpanKind.SERVER,
                                               attributes={"rpc.method": method}))

    def phase_in_thread(self, fn, name: str, **attributes):
        from opentelemetry import trace

        parent = _current.get()
        context = (trace.set_span_in_context(parent.span) if isinstance(parent, _RpcSpan)
                   else None)
        tracer = self.tracer

        def traced(*args):
            with tracer.start_as_current_span(name, context=context, attributes=attributes):
                return fn(*args)

        return traced

    def shutdown(self) -> None:
        """Export what is left (the SDK's thread), then stop."""
        self.provider.shutdown()


def check_target(target: str) -> str:
    """`otlp` or `file:PATH`.

    Raises:
        ValueError: anything else, or the SDK (or the OTLP exporter) is not installed.
    """
    if target != "otlp" and not (target.startswith("file:") and len(target) > 5):
        raise ValueError(f"{target!r} is not 'otlp' or 'file:PATH'")
    try:
        import opentelemetry.sdk.trace  # noqa: F401
        if target == "otlp":
            import opentelemetry.exporter.otlp.proto.grpc.trace_exporter  # noqa: F401
    except ImportError as exc:
        raise ValueError(f"tracing needs {exc.name}: pip install 'corral[otlp]'") from None
    return target


def exporter_for(target: str):
    if target == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    return JsonLinesExporter(target.removeprefix("file:"))


class JsonLinesExporter:
    """Appends one JSON object a span to a file (name, ids, parent, times, attributes,
    status). Duck-types the SDK's SpanExporter (export, shutdown, force_flush)."""

    def __init__(self, path: str):
        self.path = path

    def export(self, spans) -> object:
        from opentelemetry.sdk.trace.export import SpanExportResult

        lines = []
        for span in spans:
            ctx = span.get_span_context()
            lines.append(json.dumps({
                "name": span.name,
                "trace_id": f"{ctx.trace_id:032x}",
                "span_id": f"{ctx.span_id:016x}",
                "parent_id": f"{span.parent.span_id:016x}" if span.parent else "",
                "kind": span.kind.name,
                "start_ns": span.start_time, "end_ns": span.end_time,
                "attributes": dict(span.attributes or {}),
                "status": span.status.status_code.name,
            }, default=str))
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return True
