"""
Pieces for real-process stream tests and benchmarks (issue 9: streams that
outlive their path): a sender that streams a known pattern, a receiver that
proves what arrived, two relays behind one C{auto:} string, and a transfer
that ties them together.

 - L{Pattern}: deterministic pseudo-random bytes, cheap to make (a 1 MiB
   random block, rotated per MiB by an offset derived from the MiB's index,
   which also heads the MiB): a byte lost, duplicated or moved changes what
   follows it, so the receiver's sha256 (and its byte-by-byte check) catch it.
 - L{PatternSender}: a client protocol and C{IPushProducer} that streams
   C{size} bytes of the pattern (optionally paced to a rate), then
   C{loseConnection()}; it hashes what it wrote.
 - L{PatternReceiver} and L{ReceiverFactory}: the listening side. The
   factory counts C{buildProtocol} and C{connectionMade} calls (one stream
   must be ONE connection); the receiver hashes and checks what arrives,
   records the longest gap in delivery, can pause its transport for a while
   at a byte count, and offers Deferreds for "N bytes have arrived" and "the
   connection ended".
 - L{start_relays} and L{RelayPair}: one or two L{RelayProcess}es in the
   C{azure} (primary) and C{vercel} (backup) slots, and C{auto:} strings for
   them (with L{SESSION_EXTRA} appended).
 - L{RelayEndpoints}: C{relay:} strings instead, for relays the harness did
   not start (the Vercel function under uvicorn): the listener through one
   URL, the client through the same or another.
 - L{Transfer}: a listener with a L{ReceiverFactory} and a client with a
   L{PatternSender} (C{auto:} through a L{RelayPair}, or C{relay:} through
   L{RelayEndpoints}), in this process; its C{problems()} say what is wrong
   with the result, in words.
 - L{session_stats}: the session layer's C{transport.stats()}, when it has one.

Nothing here sleeps: every wait is a Deferred with a deadline (the relay
processes, C{poll} and the clean-up come from L{tests.relayprocess}).
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor as _global_reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.session.params import SessionParams

from .relayprocess import RelayProcess, poll, start_relay

MiB = 1 << 20

#: Bytes each stream test moves (issue 9 asks for 256 MiB);
#: C{PLURESYNC_STREAM_TEST_MIB=16} shrinks it for a quick local run.
STREAM_BYTES = int(os.environ.get("PLURESYNC_STREAM_TEST_MIB", "256")) * MiB

#: Extra endpoint parameters every C{auto:} string the harness builds ends
#: with, e.g. C{":stall=1:window=1048576"} (or C{PLURESYNC_STREAM_EXTRA}); the
#: session's defaults (resume=30, window=16 MiB, stall=2, rotate=20) otherwise.
#: If it names window=, the retransmit check uses that window.
SESSION_EXTRA = os.environ.get("PLURESYNC_STREAM_EXTRA", "")

#: The session layer's default retransmit window (window=), and how far above
#: it the retransmit buffer's peak may go (one write's worth of records).
DEFAULT_WINDOW = SessionParams().window
WINDOW_SLACK = 256 * 1024

#: What C{transport.stats()} must hold, once the session layer gives it.
STATS_KEYS = ("retransmit_bytes", "retransmit_peak", "receive_bytes", "swaps", "path")

#: Bytes per sender write (the bench's peers use the same).
CHUNK = 64 * 1024


def window() -> int:
    """The retransmit window the strings ask for: C{window=} in L{SESSION_EXTRA}, else the default."""
    for part in SESSION_EXTRA.split(":"):
        name, _, value = part.partition("=")
        if name == "window" and value:
            return int(value)
    return DEFAULT_WINDOW


def describe(reason: Failure | None) -> str:
    """C{ConnectionDone}, or C{RelayLostError: the relay at ... (close code 1006)}."""
    if reason is None:
        return "still open"
    value = reason.value
    text = str(value)
    name = type(value).__name__
    return f"{name}: {text}" if text and text != name else name


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


# -- the pattern ---------------------------------------------------------------


class Pattern:
    """
    Deterministic pseudo-random bytes from a seed. MiB number C{i} is the
    base block (1 MiB from C{random.Random(seed)}) rotated by an offset
    derived from C{i} (blake2b), with C{i} in its first 8 bytes: every MiB
    differs, so a duplicated, lost or reordered range never matches by
    chance. Making a MiB is one 1 MiB slice (well above 1 GB/s).
    """

    def __init__(self, seed: bytes = b"pluresync issue 9") -> None:
        self.seed = seed
        base = random.Random(seed).randbytes(MiB)
        self._doubled = base + base
        # The last few MiBs made: a sender and a receiver sharing one pattern
        # work a few MiBs apart.
        self._cached: dict[int, bytes] = {}

    def block(self, index: int) -> bytes:
        """MiB number C{index} of the stream."""
        block = self._cached.get(index)
        if block is None:
            digest = hashlib.blake2b(index.to_bytes(8, "big"), key=self.seed[:64], digest_size=8).digest()
            shift = int.from_bytes(digest, "big") % MiB
            block = index.to_bytes(8, "big") + self._doubled[shift + 8 : shift + MiB]
            if len(self._cached) >= 8:
                del self._cached[min(self._cached)]
            self._cached[index] = block
        return block

    def chunk(self, offset: int, size: int) -> bytes:
        """The C{size} bytes at stream offset C{offset} (at most one MiB boundary is crossed per MiB)."""
        parts = []
        for _ in range(size // MiB + 2):
            if size <= 0:
                break
            index, inner = divmod(offset, MiB)
            take = min(size, MiB - inner)
            parts.append(self.block(index)[inner : inner + take])
            offset += take
            size -= take
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def sha256(self, size: int) -> str:
        """The sha256 (hex) of the first C{size} bytes."""
        digest = hashlib.sha256()
        for offset in range(0, size, MiB):
            digest.update(self.chunk(offset, min(MiB, size - offset)))
        return digest.hexdigest()


class StreamEnded(AssertionError):
    """The connection ended before the byte count a test waited for."""


# -- the sending side ----------------------------------------------------------


@implementer(IPushProducer)
class PatternSender(Protocol):
    """
    Streams C{size} bytes of a L{Pattern} as a streaming producer registered
    on its transport (it stops writing when paused and goes on when
    resumed), then unregisters and calls C{loseConnection()}.

    With C{rate} (bytes per second) it paces itself: a test that needs a
    transfer to last several relay session caps gets one whatever the
    machine's speed.

    @ivar sent: bytes written so far. @ivar sha256: hex digest of them, once all are written.
    @ivar made: fires with this protocol at C{connectionMade}.
    @ivar ended: fires (with C{None}) at C{connectionLost}; C{reason} holds its reason.
    @ivar pauses: how often the transport paused us.
    """

    def __init__(
        self,
        size: int,
        pattern: Pattern | None = None,
        *,
        chunk: int = CHUNK,
        rate: float | None = None,
        clock: Any = None,
    ) -> None:
        self.size = size
        self.pattern = pattern or Pattern()
        self.chunk_size = chunk
        self.rate = rate
        self.clock = clock or _global_reactor
        self.sent = 0
        self.pauses = 0
        self.paused = False
        self.stopped = False
        self.finished = False
        self.sha256: str | None = None
        self.reason: Failure | None = None
        self.started: float | None = None
        self.finished_at: float | None = None
        self.ended_at: float | None = None
        self.made: Deferred[PatternSender] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._digest = hashlib.sha256()
        self._wake = None

    @property
    def path(self) -> str | None:
        """The path carrying the stream now (C{relay:azure}, ...), as the transport names it."""
        if self.transport is None:
            return None
        return self.transport.getPeer().transport

    def connectionMade(self) -> None:
        self.started = self.clock.seconds()
        self.transport.registerProducer(self, True)
        self.made.callback(self)
        self._produce()

    # IPushProducer

    def pauseProducing(self) -> None:
        if not self.paused:
            self.paused = True
            self.pauses += 1

    def resumeProducing(self) -> None:
        self.paused = False
        self._produce()

    def stopProducing(self) -> None:
        self.stopped = True

    def _produce(self) -> None:
        if self._wake is not None or self.finished:
            return
        limit = self.size
        if self.rate:
            elapsed = self.clock.seconds() - self.started
            limit = min(self.size, int(elapsed * self.rate) + self.chunk_size)
        write, chunk = self.transport.write, self.pattern.chunk
        # Bounded: each turn writes at least one byte, at most size bytes in all.
        while not self.paused and not self.stopped and self.reason is None and self.sent < limit:
            data = chunk(self.sent, min(self.chunk_size, limit - self.sent))
            self._digest.update(data)
            self.sent += len(data)
            write(data)
        if self.sent >= self.size:
            self._finish()
        elif self.rate and not self.paused and not self.stopped and self.reason is None:
            due = self.started + self.sent / self.rate  # when one more chunk is allowed
            self._wake = self.clock.callLater(max(0.005, due - self.clock.seconds()), self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._produce()

    def _finish(self) -> None:
        self.finished = True
        self.finished_at = self.clock.seconds()
        self.sha256 = self._digest.hexdigest()
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        self.ended_at = self.clock.seconds()
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        self.ended.callback(None)


# -- the receiving side --------------------------------------------------------


class PatternReceiver(Protocol):
    """
    Hashes and counts what arrives and checks it against the L{Pattern}
    byte by byte (C{mismatch_at}: the first stream offset that differs).

    @ivar longest_gap: the longest time (s) between two consecutive
        C{dataReceived} calls after the first byte, leaving out our own
        pause (from its end to the next byte counts); C{longest_gap_at} is
        the byte count where it ended.
    @ivar pause_at, pause_for: pause the transport (C{pauseProducing}) for
        C{pause_for} seconds once C{pause_at} bytes have arrived;
        C{during_pause}: bytes delivered while we were paused (should be 0).
    """

    def __init__(
        self,
        pattern: Pattern | None = None,
        *,
        pause_at: int | None = None,
        pause_for: float = 0.0,
        clock: Any = None,
    ) -> None:
        self.pattern = pattern or Pattern()
        self.clock = clock or _global_reactor
        self.pause_at = pause_at
        self.pause_for = pause_for
        self.received = 0
        self.chunks = 0
        self.mismatch_at: int | None = None
        self.first_byte: float | None = None
        self.last_byte: float | None = None
        self.longest_gap = 0.0
        self.longest_gap_at = 0
        self.paused_at: float | None = None
        self.resumed_at: float | None = None
        self.during_pause = 0
        self.reason: Failure | None = None
        self.ended_at: float | None = None
        self.ended: Deferred[None] = Deferred()
        self._digest = hashlib.sha256()
        self._waiters: list[tuple[int, Deferred]] = []
        self._last: float | None = None
        self._resume_call = None

    @property
    def sha256(self) -> str:
        return self._digest.hexdigest()

    @property
    def path(self) -> str | None:
        return self.transport.getPeer().transport if self.transport is not None else None

    def connectionMade(self) -> None:
        self.factory.connectionMade(self)

    def dataReceived(self, data: bytes) -> None:
        now = self.clock.seconds()
        if self.first_byte is None:
            self.first_byte = now
        elif self._last is not None and now - self._last > self.longest_gap:
            self.longest_gap = now - self._last
            self.longest_gap_at = self.received
        self._last = self.last_byte = now
        if self.paused_at is not None and self.resumed_at is None:
            self.during_pause += len(data)
        if self.mismatch_at is None:
            expected = self.pattern.chunk(self.received, len(data))
            if data != expected:
                first = next((i for i in range(len(data)) if data[i] != expected[i]), len(expected))
                self.mismatch_at = self.received + first
        self._digest.update(data)
        self.received += len(data)
        self.chunks += 1
        while self._waiters and self._waiters[0][0] <= self.received:
            self._waiters.pop(0)[1].callback(self)
        if self.pause_at is not None and self.paused_at is None and self.received >= self.pause_at:
            self._pause()

    def _pause(self) -> None:
        self.paused_at = self.clock.seconds()
        self.transport.pauseProducing()
        self._resume_call = self.clock.callLater(self.pause_for, self._resume)

    def _resume(self) -> None:
        self._resume_call = None
        self.resumed_at = self.clock.seconds()
        # Our own pause is no gap in delivery; from the resume on, waiting is.
        self._last = self.resumed_at
        self.transport.resumeProducing()

    def arrived(self, count: int) -> Deferred[PatternReceiver]:
        """Fires once C{count} bytes have arrived; fails with L{StreamEnded} if the connection ends first."""
        d: Deferred[PatternReceiver] = Deferred()
        if self.received >= count:
            d.callback(self)
        elif self.reason is not None:
            d.errback(self._endedEarly(count))
        else:
            self._waiters.append((count, d))
            self._waiters.sort(key=lambda waiter: waiter[0])
        return d

    def _endedEarly(self, count: int) -> StreamEnded:
        return StreamEnded(f"the connection ended ({describe(self.reason)}) after {self.received} of {count} bytes")

    def connectionLost(self, reason: Failure = None) -> None:
        self.reason = reason
        self.ended_at = self.clock.seconds()
        if self._resume_call is not None:
            self._resume_call.cancel()
            self._resume_call = None
        waiters, self._waiters = self._waiters, []
        for count, d in waiters:
            d.errback(self._endedEarly(count))
        self.ended.callback(None)


class ReceiverFactory(Factory):
    """
    Builds L{PatternReceiver}s and counts them: C{built} (buildProtocol
    calls) and C{made} (connectionMade calls). A stream that survives its
    path is ONE connection: both stay 1.
    """

    def __init__(self, pattern: Pattern | None = None, **receiver: Any) -> None:
        self.pattern = pattern or Pattern()
        self.receiver = receiver
        self.built = 0
        self.made = 0
        self.protocols: list[PatternReceiver] = []
        self._first: list[Deferred] = []

    def buildProtocol(self, addr) -> PatternReceiver:
        protocol = PatternReceiver(self.pattern, **self.receiver)
        protocol.factory = self
        self.built += 1
        self.protocols.append(protocol)
        return protocol

    def connectionMade(self, protocol: PatternReceiver) -> None:
        self.made += 1
        first, self._first = self._first, []
        for d in first:
            d.callback(protocol)

    def first(self) -> Deferred[PatternReceiver]:
        """Fires with the first protocol once its C{connectionMade} ran."""
        made = [p for p in self.protocols if p.transport is not None]
        if made:
            return succeed(made[0])
        d: Deferred[PatternReceiver] = Deferred()
        self._first.append(d)
        return d


# -- the relays -------------------------------------------------------------------


@dataclass
class RelayPair:
    """
    The relays behind one C{auto:} string: C{azure} (the primary slot) and
    C{vercel} (the backup slot, C{None} when only the primary runs; the
    strings then say C{relays=azure}).
    """

    key: str
    azure: RelayProcess
    vercel: RelayProcess | None = None

    @property
    def relays(self) -> dict[str, RelayProcess]:
        """C{{"relay:azure": process, ...}}: the names C{getPeer().transport} uses."""
        named = {"relay:azure": self.azure}
        if self.vercel is not None:
            named["relay:vercel"] = self.vercel
        return named

    def relay(self, path: str) -> RelayProcess:
        """The relay process behind a path name (C{relay:azure}, C{relay:vercel})."""
        try:
            return self.relays[path]
        except KeyError:
            raise AssertionError(f"the stream runs through {path!r}, not one of {sorted(self.relays)}") from None

    def endpoint(self, **params: Any) -> str:
        """
        An C{auto:} string for these relays, with C{params} (C{ping=1},
        C{delay=2}, ...) and then L{SESSION_EXTRA}.
        """
        parts = [f"auto:key={self.key}", f"azure={self.azure.escaped_url}"]
        if self.vercel is not None:
            parts.append(f"vercel={self.vercel.escaped_url}")
        else:
            params.setdefault("relays", "azure")
        # The streams under test run through the relays: a LAN path (this
        # host's own listener, found by mDNS) would win every race.
        params.setdefault("direct", "off")
        parts += [f"{name}={value}" for name, value in params.items()]
        return ":".join(parts) + SESSION_EXTRA

    # What L{Transfer} asks for: both sides use the same auto: string.
    server_endpoint = endpoint
    client_endpoint = endpoint


@dataclass
class RelayEndpoints:
    """
    C{relay:} strings for one L{Transfer}: the listener registers through
    C{server_url} and the client connects through C{client_url} (the same
    relay, or another instance sharing its state, as two Vercel instances
    sharing Redis). The URLs are escaped for an endpoint string
    (L{tests.relayprocess.escaped_url}); L{SESSION_EXTRA} is appended.
    """

    key: str
    server_url: str
    client_url: str

    def _endpoint(self, url: str, params: dict[str, Any]) -> str:
        parts = [f"relay:url={url}", f"key={self.key}"]
        parts += [f"{name}={value}" for name, value in params.items()]
        return ":".join(parts) + SESSION_EXTRA

    def server_endpoint(self, **params: Any) -> str:
        return self._endpoint(self.server_url, params)

    def client_endpoint(self, **params: Any) -> str:
        return self._endpoint(self.client_url, params)


def registered(port: Any) -> bool:
    """Whether a listening port is registered: on every relay (C{auto:}), or at its relay (C{relay:})."""
    transports = getattr(port, "transports", None)
    if transports is not None:
        return all(transports.values())
    return bool(port.connected)


async def start_relays(test, key: str, azure: Iterable[str] = (), vercel: Iterable[str] | None = ()) -> RelayPair:
    """
    Start the primary (and, unless C{vercel} is C{None}, the backup) relay at
    the same time, each with its extra command-line options; C{test}'s
    cleanup kills them (L{start_relay}).
    """
    starts = [ensureDeferred(start_relay(test, list(azure)))]
    if vercel is not None:
        starts.append(ensureDeferred(start_relay(test, list(vercel))))
    started = await gatherResults(starts, consumeErrors=True)
    return RelayPair(key, *started)


# -- one transfer ------------------------------------------------------------------


def session_stats(transport: Any) -> dict | None:
    """C{transport.stats()} once the session layer gives it; C{None} before."""
    stats = getattr(transport, "stats", None)
    return stats() if callable(stats) else None


@dataclass
class Transfer:
    """
    One stream of C{size} pattern bytes from a client to a listener
    registered on every relay of C{relays} (C{auto:} strings from a
    L{RelayPair}, or C{relay:} strings from L{RelayEndpoints}), both in this
    process. C{test} is a TestCase (or anything with C{addCleanup}): the
    listener is stopped and any connection still open is aborted at its
    cleanup, before the relays are killed.
    """

    test: Any
    relays: RelayPair | RelayEndpoints
    size: int
    client: dict = field(default_factory=dict)
    server: dict = field(default_factory=dict)
    receiver: dict = field(default_factory=dict)
    rate: float | None = None
    pattern: Pattern = field(default_factory=Pattern)
    clock: Any = None

    def __post_init__(self) -> None:
        self.clock = self.clock or _global_reactor
        self.factory = ReceiverFactory(self.pattern, clock=self.clock, **self.receiver)
        self.sender: PatternSender | None = None
        self.port = None
        self.started: float | None = None

    @property
    def receiving(self) -> PatternReceiver | None:
        """The first receiving protocol (there must be only one)."""
        return self.factory.protocols[0] if self.factory.protocols else None

    async def listen(self, registered_within: float = 30) -> None:
        """Listen on every relay; wait until each has confirmed the registration."""
        self.port = await serverFromString(self.clock, self.relays.server_endpoint(**self.server)).listen(self.factory)
        self.test.addCleanup(self.port.stopListening)
        self.test.addCleanup(lambda: ensureDeferred(self._abort()))
        await poll(
            lambda: registered(self.port),
            timeout=registered_within,
            what="the listener registering on every relay",
        )

    async def connect(self) -> PatternSender:
        """Connect and start sending; fires once the client's protocol is made."""
        self.started = self.clock.seconds()
        # Known before connect() fires, so the cleanup can abort it whatever happens.
        self.sender = sender = PatternSender(self.size, self.pattern, rate=self.rate, clock=self.clock)
        await clientFromString(self.clock, self.relays.client_endpoint(**self.client)).connect(
            Factory.forProtocol(lambda: sender)
        )
        return sender

    async def start(self) -> PatternReceiver:
        """L{listen}, L{connect}, and wait for the listener's protocol."""
        await self.listen()
        await self.connect()
        return await self.factory.first().addTimeout(30, self.clock)

    async def arrived(self, count: int, within: float) -> PatternReceiver:
        """Wait (bounded) until C{count} bytes have reached the listener's protocol."""
        receiving = await self.factory.first().addTimeout(within, self.clock)
        return await self._bounded(receiving.arrived(count), within, f"{mib(count)} to arrive")

    async def ended(self, within: float) -> None:
        """Wait (bounded) until both ends' C{connectionLost} ran; C{problems()} then says what went wrong."""
        receiving = await self.factory.first().addTimeout(within, self.clock)
        both = gatherResults([self.sender.ended, receiving.ended], consumeErrors=True)
        await self._bounded(both, within, "both ends of the stream to end")

    async def _bounded(self, d: Deferred, within: float, what: str) -> Any:
        from twisted.internet.defer import TimeoutError as DeferredTimeout

        try:
            return await d.addTimeout(within, self.clock)
        except DeferredTimeout:
            raise AssertionError(f"waited {within:g} s for {what}: {self.progress()}") from None

    # -- results ------------------------------------------------------------------

    def progress(self) -> str:
        """Where the stream is, in words (for failure messages)."""
        sender, receiving = self.sender, self.receiving
        parts = []
        if sender is not None:
            parts.append(f"sent {mib(sender.sent)}, sender {describe(sender.reason)}, path {sender.path}")
        if receiving is not None:
            parts.append(f"received {mib(receiving.received)}, receiver {describe(receiving.reason)}")
        return "; ".join(parts) or "not connected"

    def problems(self) -> list[str]:
        """What is wrong with a finished transfer, first the most telling; empty if nothing."""
        sender, receiving, size = self.sender, self.receiving, self.size
        if sender is None or receiving is None:
            return ["not connected"]
        found = []
        for side, protocol, count in (("receiver", receiving, receiving.received), ("sender", sender, sender.sent)):
            if protocol.reason is None:
                found.append(f"the {side}'s connection has not ended ({count} of {size} bytes)")
            elif not protocol.reason.check(ConnectionDone):
                found.append(f"stream lost: {describe(protocol.reason)} ({side}, after {count} of {size} bytes)")
        if sender.sent != size:
            found.append(f"the sender wrote {sender.sent} of {size} bytes")
        if receiving.received != size:
            found.append(f"the receiver got {receiving.received} of {size} bytes")
        if receiving.mismatch_at is not None:
            found.append(f"the received bytes differ from what was sent from offset {receiving.mismatch_at} on")
        if sender.sha256 is not None and receiving.sha256 != sender.sha256:
            found.append(f"sha256 differs: sent {sender.sha256}, received {receiving.sha256}")
        if (self.factory.built, self.factory.made) != (1, 1):
            found.append(
                f"the listener built {self.factory.built} protocols and ran connectionMade "
                f"{self.factory.made} times; one stream must be one connection"
            )
        return found

    @property
    def elapsed(self) -> float | None:
        """From C{connect()} to the receiver's last byte."""
        receiving = self.receiving
        if self.started is None or receiving is None or receiving.last_byte is None:
            return None
        return receiving.last_byte - self.started

    def stats(self) -> dict[str, dict | None]:
        """Both ends' C{transport.stats()} (C{None} per side without a session layer)."""
        return {
            "sender": session_stats(self.sender.transport) if self.sender else None,
            "receiver": session_stats(self.receiving.transport) if self.receiving else None,
        }

    async def _abort(self) -> None:
        protocols: list[Any] = [self.sender, *self.factory.protocols]
        open_ = [p for p in protocols if p is not None and p.transport is not None and not p.ended.called]
        for protocol in open_:
            protocol.transport.abortConnection()
        for protocol in open_:
            await protocol.ended.addTimeout(10, self.clock)


def check_stats(test, transfer: Transfer, log: Callable[..., None] | None = None) -> dict[str, dict | None]:
    """
    If the transports have C{stats()} (the session layer), assert each has
    L{STATS_KEYS} and a retransmit peak within the window plus
    L{WINDOW_SLACK}; log the swaps. Without C{stats()} (today), check nothing.
    """
    found = transfer.stats()
    limit = window() + WINDOW_SLACK
    for side, stats in found.items():
        if stats is None:
            continue
        for key in STATS_KEYS:
            test.assertIn(key, stats, f"the {side}'s transport.stats() has no {key!r}: {stats}")
        test.assertLessEqual(
            stats["retransmit_peak"],
            limit,
            f"the {side}'s retransmit buffer peaked at {stats['retransmit_peak']} bytes, above the window "
            f"{window()} + {WINDOW_SLACK}",
        )
        if log is not None:
            log(
                "{side}: {swaps} swaps, retransmit peak {peak} bytes, path {path}",
                side=side,
                swaps=stats["swaps"],
                peak=stats["retransmit_peak"],
                path=stats["path"],
            )
    return found


class Cleanups:
    """Stands in for a TestCase where the harness wants C{addCleanup()} (the bench)."""

    def __init__(self) -> None:
        self._calls: list[tuple[Callable, tuple]] = []

    def addCleanup(self, f: Callable, *args: Any) -> None:
        self._calls.append((f, args))

    async def run(self) -> None:
        """Run every cleanup, last added first; an error in one does not stop the others."""
        errors = []
        while self._calls:
            f, args = self._calls.pop()
            try:
                result = f(*args)
                if isinstance(result, Deferred) or hasattr(result, "__await__"):
                    await result
            except Exception as e:  # noqa: BLE001 - reported after the rest ran
                errors.append(e)
        if errors:
            raise errors[0]
