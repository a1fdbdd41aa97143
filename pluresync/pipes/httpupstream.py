"""
How an HTTP pipe's frames reach the relay (docs/protocol.md, "HTTP pipe",
"Upstreams"): first as one streaming request body; where a proxy holds
bodies until they end, as a sequence of bounded POSTs, one at a time.

Its life is an Automat machine::

    probing --the relay's pong to the probe--> streaming
       |                                          |
       +--no pong within the probe bound--> bounded (POSTs)
       |                                          |
       +------------- close ----------------> closing --stop--> stopped

A probing upstream writes into the streaming body as a streaming one does:
if a proxy holds it, ending it releases everything written, in order, and
the bounded POSTs carry what follows.

Backpressure: a streaming body is the TCP transport's producer (Agent
registers it), so a full connection pauses the pipe's writer; bounded POSTs
pause it while more than one POST's worth (at least L{PIPE_BUFFER}) waits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from pluresync.automata import Transitions
from pluresync.errors import RelayLostError
from pluresync.relay.core.httpwire import PIPE_HEADER, SEQ_HEADER

log = Logger(namespace="pluresync.relay.client")

#: At least this much may wait for the next bounded POST before the writer
#: is paused (as much as a WebSocket's transport buffers: pipes/websocket.py).
PIPE_BUFFER = 256 * 1024


@implementer(IBodyProducer)
class BytesBody:
    """A bounded upstream's body, already whole."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


@implementer(IBodyProducer)
class StreamingBody:
    """
    A streaming upstream's chunked body: frames go to the connection as
    they come; Agent registers it as the transport's streaming producer, and
    it passes pauses and resumes on to the pipe's writer.
    """

    length = UNKNOWN_LENGTH

    def __init__(self, paused: Callable[[], None], resumed: Callable[[], None]) -> None:
        self._paused = paused
        self._resumed = resumed
        self._consumer: Any = None
        self._pending: list[bytes] = []
        self._done: Deferred[None] | None = None
        self.ended = False

    def startProducing(self, consumer: Any) -> Deferred[None]:
        self._consumer = consumer
        pending, self._pending = self._pending, []
        if pending:
            consumer.write(b"".join(pending))
        self._done = Deferred()
        if self.ended:
            self._done.callback(None)
        return self._done

    def write(self, data: bytes) -> None:
        if self.ended:
            return
        if self._consumer is None:
            self._pending.append(data)
        else:
            self._consumer.write(data)

    def end(self) -> None:
        """End the body at this frame boundary (the request then gets its answer)."""
        if not self.ended:
            self.ended = True
            if self._done is not None and not self._done.called:
                self._done.callback(None)

    def pauseProducing(self) -> None:
        self._paused()

    def resumeProducing(self) -> None:
        self._resumed()

    def stopProducing(self) -> None:
        self.ended = True


class _Inputs(Protocol):
    """Everything that happens to an upstream (the inputs of its machine)."""

    def send(self, data: bytes) -> None:
        "Whole frames for the relay."

    def probe_answered(self) -> None:
        "The relay's pong to the probe came: the streaming body gets through."

    def probe_expired(self) -> None:
        "No pong within the probe bound: something holds the body."

    def posted(self) -> None:
        "The upstream in flight was answered (204)."

    def close(self, frame: bytes) -> None:
        "The close frame: sent after everything before it, and nothing after it."

    def stop(self) -> None:
        "The pipe is over."


@dataclass(eq=False)
class _Core:
    """What an upstream's machine works on."""

    reactor: Any
    agent: Any
    url: bytes
    token: str
    max_post: int
    where: str
    failed: Callable[[Exception], None]
    proxy_authorization: bytes | None = None
    inputs: Any = field(default=None, repr=False)
    seq: int = 0
    body: StreamingBody | None = field(default=None, repr=False)
    posting: Deferred | None = field(default=None, repr=False)
    pending: list[bytes] = field(default_factory=list, repr=False)
    pending_size: int = 0
    producer: Any = field(default=None, repr=False)
    producer_paused: bool = False
    full: bool = False
    probe_call: Any = field(default=None, repr=False)

    @property
    def bound(self) -> int:
        """How much may wait for bounded POSTs before the writer pauses."""
        return max(self.max_post, PIPE_BUFFER)

    def start(self, first: bytes, probe: float) -> None:
        """Open the streaming upstream with C{first} (the probe ping, the hello) and time the probe."""
        self.body = StreamingBody(self.pause_writer, self.body_drained)
        self.body.write(first)
        self.probe_call = self.reactor.callLater(probe, self.inputs.probe_expired)
        self.post(self.body)

    def cancel_probe(self) -> None:
        call, self.probe_call = self.probe_call, None
        if call is not None and call.active():
            call.cancel()

    def end_body(self) -> None:
        body, self.body = self.body, None
        if body is not None:
            body.end()

    def post(self, body: Any) -> None:
        headers = Headers(
            {
                PIPE_HEADER: [self.token.encode("ascii")],
                SEQ_HEADER: [str(self.seq).encode("ascii")],
                b"Cache-Control": [b"no-store"],
            }
        )
        if self.proxy_authorization is not None:
            headers.addRawHeader(b"Proxy-Authorization", self.proxy_authorization)
        self.seq += 1
        d = self.agent.request(b"POST", self.url, headers, body)
        self.posting = d
        d.addCallbacks(self.answered, self.post_failed)

    def answered(self, response: Any) -> Deferred:
        code = response.code

        def read(_: Any) -> None:
            self.posting = None
            if code in (200, 204):
                self.inputs.posted()
            else:
                self.failed(
                    RelayLostError(
                        f"the relay at {self.where} refused an upstream request of the HTTP pipe (HTTP {code})"
                    )
                )

        return readBody(response).addBoth(read)

    def post_failed(self, failure: Failure) -> None:
        if self.posting is None:
            return  # stopped: the request was cancelled
        self.posting = None
        self.failed(
            RelayLostError(f"an upstream request of the HTTP pipe to {self.where} failed: {failure.getErrorMessage()}")
        )

    def queue(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_size += len(data)
        if self.pending_size > self.bound:
            self.pause_writer()

    def flush(self) -> None:
        """Send what waits as the next bounded POST, if none is in flight; resume the writer when there is room."""
        if self.posting is None and self.pending:
            batch: list[bytes] = []
            size = 0
            # Bounded: at most every frame that waits, at least one.
            while self.pending and (not batch or size + len(self.pending[0]) <= self.max_post):
                piece = self.pending.pop(0)
                batch.append(piece)
                size += len(piece)
            self.pending_size -= size
            self.post(BytesBody(b"".join(batch)))
        if self.full and self.pending_size <= self.bound:
            self.resume_writer()

    def pause_writer(self) -> None:
        self.full = True
        if self.producer is not None and not self.producer_paused:
            self.producer_paused = True
            self.producer.pauseProducing()

    def resume_writer(self) -> None:
        self.full = False
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()

    def body_drained(self) -> None:
        """The streaming body's connection has room again (bounded POSTs decide by what waits)."""
        if self.pending_size <= self.bound:
            self.resume_writer()


_builder = TypeMachineBuilder(_Inputs, _Core)
_PROBING = _builder.state("probing")
_STREAMING = _builder.state("streaming")
_BOUNDED = _builder.state("bounded")
_CLOSING = _builder.state("closing")
_STOPPED = _builder.state("stopped")
_ALL = (_PROBING, _STREAMING, _BOUNDED, _CLOSING, _STOPPED)
_transitions = Transitions(_Inputs)
_on = _transitions.upon


@_on(_PROBING, _Inputs.send).loop()
@_on(_STREAMING, _Inputs.send).loop()
def _stream(inputs: _Inputs, core: _Core, data: bytes) -> None:
    core.body.write(data)


@_on(_BOUNDED, _Inputs.send).loop()
def _post(inputs: _Inputs, core: _Core, data: bytes) -> None:
    core.queue(data)
    core.flush()


@_on(_PROBING, _Inputs.probe_answered).to(_STREAMING)
def _streams(inputs: _Inputs, core: _Core) -> None:
    core.cancel_probe()


@_on(_PROBING, _Inputs.probe_expired).to(_BOUNDED)
def _step_down(inputs: _Inputs, core: _Core) -> None:
    core.probe_call = None
    log.info("{relay}: a proxy holds HTTP request bodies; the HTTP pipe sends bounded POSTs", relay=core.where)
    # Ending the body releases it from the proxy; the bounded POSTs follow its answer.
    core.end_body()
    core.body_drained()


@_on(_BOUNDED, _Inputs.posted).loop()
@_on(_CLOSING, _Inputs.posted).loop()
def _next_post(inputs: _Inputs, core: _Core) -> None:
    core.flush()


@_on(_PROBING, _Inputs.close).to(_CLOSING)
@_on(_STREAMING, _Inputs.close).to(_CLOSING)
def _close_stream(inputs: _Inputs, core: _Core, frame: bytes) -> None:
    core.cancel_probe()
    core.body.write(frame)
    core.end_body()


@_on(_BOUNDED, _Inputs.close).to(_CLOSING)
def _close_posts(inputs: _Inputs, core: _Core, frame: bytes) -> None:
    core.queue(frame)
    core.flush()


def _stop(inputs: _Inputs, core: _Core) -> None:
    core.cancel_probe()
    core.end_body()
    posting, core.posting = core.posting, None
    if posting is not None:
        posting.cancel()
    core.pending.clear()
    core.pending_size = 0


for _state in (_PROBING, _STREAMING, _BOUNDED, _CLOSING):
    _on(_state, _Inputs.stop).to(_STOPPED)(_stop)

# Everything else changes nothing: a frame after the close, a late probe
# timer or answer, an answer to the streaming request before the close.
_transitions.ignore_the_rest(_ALL, [name for name in _Inputs.__dict__ if not name.startswith("_")])

_Machine = _builder.build()


class HttpUpstream:
    """
    The upstream side of one HTTP pipe (see the module docstring).

    @param agent: the pipe's Agent for upstream requests (its pool keeps
        the connection between bounded POSTs).
    @param failed: called with a L{RelayLostError} when an upstream request
        fails or is refused; the pipe then ends (and calls L{stop}).
    """

    def __init__(
        self,
        reactor: Any,
        agent: Any,
        url: bytes,
        token: str,
        max_post: int,
        where: str,
        failed: Callable[[Exception], None],
        proxy_authorization: bytes | None = None,
    ) -> None:
        core = _Core(reactor, agent, url, token, max_post, where, failed, proxy_authorization)
        self._core = core
        self._inputs = _Machine(core)
        core.inputs = self._inputs

    def start(self, first: bytes, probe: float) -> None:
        """Open the streaming upstream with C{first}; C{probe} seconds for the relay's pong."""
        self._core.start(first, probe)

    def send(self, data: bytes) -> None:
        self._inputs.send(data)

    def probe_answered(self) -> None:
        self._inputs.probe_answered()

    def close(self, frame: bytes) -> None:
        self._inputs.close(frame)

    def stop(self) -> None:
        self._inputs.stop()

    def register_producer(self, producer: Any) -> None:
        """Pause C{producer} (the pipe's writer, or C{None}) while the upstream is full."""
        core = self._core
        core.producer = producer
        core.producer_paused = False
        if producer is not None and core.full:
            core.producer_paused = True
            producer.pauseProducing()
