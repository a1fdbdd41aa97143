"""
LAN discovery: peers on one network find each other over mDNS/DNS-SD, with
no relay and no internet.

A listener L{advertise}s the TCP port it accepts pipes on
(L{pluresync.pipes.tcp.listen_tcp_pipes}); a connecting peer
L{discover}s it and opens a pipe to one of its addresses
(L{pluresync.direct.race.connect_lan_pipe}).  What is advertised is
L{pluresync.direct.lanadvert}'s: a random label and tags that only holders of
the topic recognise (docs/security.md, "What a LAN observer sees").

python-zeroconf runs its own thread with an asyncio loop inside.  Everything
that touches its objects runs there, sent over as a coroutine
(L{LoopBridge.run}); everything it reports comes back to the reactor through
C{reactor.callFromThread} and nothing else, and every decision (is this
advertisement ours, is it complete, are we done) is taken in the reactor
thread.  No other thread is started.  Closing happens in two steps so that
the reactor never waits on mDNS traffic: the goodbyes and cancellations run
on zeroconf's loop, and only when they are done does the reactor close
Zeroconf, which then has nothing left to wait for and joins its thread at
once.

zeroconf is LGPL and an optional dependency (the C{pluresync[direct]} extra):
it is imported only when discovery or advertising starts, and its absence is
a L{LanDiscoveryError} that says what to install.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from pluresync.direct.lanadvert import (
    SERVICE_TYPE,
    Advert,
    check_key,
    lan_key,
    make_advert,
    recognise,
    usable_address,
    verify,
)
from pluresync.errors import LanDiscoveryError

__all__ = [
    "SERVICE_TYPE",
    "LanAdvertisement",
    "LanDiscovery",
    "LoopBridge",
    "Mdns",
    "advertise",
    "discover",
    "lan_key",
]

#: How long (seconds) caches may keep our records: short, so an advertisement
#: that ended without its goodbyes (a crash) is forgotten soon.
ADVERT_TTL = 120
#: How long the first closing step (goodbyes, cancellations on zeroconf's
#: loop) may take before Zeroconf is closed anyway.
WIND_DOWN_TIMEOUT = 5.0
#: Advertisements one discovery resolves at most (memory stays bounded on a
#: LAN full of pluresync peers, or of forgeries of our label).
MAX_SERVICES = 32

_log = Logger()


def _zeroconf():
    """The zeroconf package, imported now, or a L{LanDiscoveryError} saying how to get it."""
    try:
        import zeroconf
        import zeroconf.asyncio
    except ImportError:
        raise LanDiscoveryError(
            "LAN discovery needs the zeroconf package, which pluresync does not install by default: "
            "pip install 'pluresync[direct]'"
        ) from None
    return zeroconf


def _adapters() -> list:
    import ifaddr  # zeroconf's own dependency, present whenever zeroconf is

    return ifaddr.get_adapters()


def local_addresses() -> list[str]:
    """This host's IPv4 addresses that a LAN peer could connect to (no loopback)."""
    found = []
    for adapter in _adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and usable_address(ip.ip):
                found.append(ip.ip)
    return list(dict.fromkeys(found))


def local_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks this host's interfaces are on (no loopback)."""
    networks = []
    for adapter in _adapters():
        for ip in adapter.ips:
            if ip.is_IPv4 and usable_address(ip.ip):
                networks.append(ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False))
    return networks


def rank(addresses: Sequence[str], networks: Sequence[ipaddress.IPv4Network]) -> list[str]:
    """
    C{addresses} with those on one of our own C{networks} first (the others
    may be another host's private network that only looks the same, or not
    routed from here), in their advertised order otherwise.
    """

    def on_our_network(address: str) -> bool:
        ip = ipaddress.IPv4Address(address)
        return any(ip in network for network in networks)

    return sorted(addresses, key=lambda address: not on_our_network(address))


class LoopBridge:
    """
    zeroconf's thread, as the reactor sees it: work goes over as coroutines
    run on its asyncio loop, and results come back as Deferreds fired in the
    reactor thread, through C{reactor.callFromThread} only.
    """

    def __init__(self, reactor, loop: asyncio.AbstractEventLoop) -> None:
        self._reactor = reactor
        self._loop = loop

    def run(self, function: Callable[..., Coroutine], *args: Any) -> Deferred:
        """
        Run C{function(*args)} (a coroutine function) on the loop.

        @return: a Deferred fired in the reactor thread with its result or
            error; cancelling it cancels the coroutine.
        """
        if self._loop.is_closed():
            return fail(LanDiscoveryError("mDNS has already stopped"))
        future = asyncio.run_coroutine_threadsafe(function(*args), self._loop)
        d: Deferred = Deferred(lambda _: future.cancel())
        # Called in zeroconf's thread when the coroutine ends (or at once, in
        # ours, if it has already ended): only the hand-off happens there.
        future.add_done_callback(lambda done: self._reactor.callFromThread(self._deliver, d, done))
        return d

    @staticmethod
    def _deliver(d: Deferred, future) -> None:
        if d.called or future.cancelled():
            return  # cancelled from this side: the Deferred already failed
        error = future.exception()
        if error is not None:
            d.errback(Failure(error))
        else:
            d.callback(future.result())

    def forward(self, function: Callable[..., None]) -> Callable[..., None]:
        """A callable for zeroconf's thread that runs C{function} with the same arguments in the reactor thread."""

        def handOff(*args: Any, **kwargs: Any) -> None:
            self._reactor.callFromThread(function, *args, **kwargs)

        return handOff


class Mdns:
    """
    One running Zeroconf instance (its sockets and its thread), from
    L{start} to L{close}; what it runs goes through its C{bridge}.
    """

    def __init__(self, reactor, zeroconf) -> None:
        self._reactor = reactor
        self.zeroconf = zeroconf
        self.bridge = LoopBridge(reactor, zeroconf.loop)
        self._closing = False
        self._closed = False
        self._waiting: list[Deferred[None]] = []

    @classmethod
    def start(cls, reactor, interfaces: Sequence[str] | None) -> Mdns:
        """Open the multicast sockets and start zeroconf's thread (milliseconds)."""
        module = _zeroconf()
        choice = list(interfaces) if interfaces else module.InterfaceChoice.All
        try:
            zeroconf = module.Zeroconf(interfaces=choice, ip_version=module.IPVersion.V4Only)
        except Exception as e:
            raise LanDiscoveryError(f"could not start mDNS on this host's network interfaces: {e}") from None
        return cls(reactor, zeroconf)

    def close(self, wind_down: Callable[[], Coroutine] | None = None) -> Deferred[None]:
        """
        Stop what runs on the loop (C{wind_down}, then withdrawing every
        registered service with goodbyes), then close Zeroconf and join its
        thread.

        @return: a Deferred that fires once the thread has ended (each call
            gets its own; only the first call's C{wind_down} runs).
        """
        waiter: Deferred[None] = Deferred()
        if self._closed:
            waiter.callback(None)
            return waiter
        self._waiting.append(waiter)
        if self._closing:
            return waiter
        self._closing = True
        zeroconf = self.zeroconf

        async def windDown() -> None:
            if wind_down is not None:
                await wind_down()
            await zeroconf.async_unregister_all_services()

        stepping = self.bridge.run(windDown)
        limit = self._reactor.callLater(WIND_DOWN_TIMEOUT, stepping.cancel)

        def wound(result) -> None:
            if limit.active():
                limit.cancel()
            if isinstance(result, Failure):
                _log.warn("mDNS did not wind down cleanly: {why}", why=result.getErrorMessage())
            self._finishClose()

        stepping.addBoth(wound)
        return waiter

    def _finishClose(self) -> None:
        began = time.monotonic()
        try:
            # Nothing is left on the loop to wait for: this joins at once.
            self.zeroconf.close()
        except Exception:
            _log.failure("closing mDNS failed")
        _log.debug("mDNS closed in {ms:.1f} ms", ms=(time.monotonic() - began) * 1000)
        self._closed = True
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)


class LanAdvertisement:
    """
    A listener's advertisement on the LAN, from L{advertise} until L{stop}.

    @ivar advert: what is advertised (public: everyone on the LAN sees it),
        once started.
    @ivar ready: fires with this advertisement once it is announced, or fails
        with L{LanDiscoveryError}.
    """

    def __init__(
        self,
        reactor,
        key: bytes,
        port: int,
        addresses: Sequence[str] | None,
        interfaces: Sequence[str] | None,
        *,
        start_mdns: Callable[..., Mdns] = Mdns.start,
    ) -> None:
        self._reactor = reactor
        self._start_mdns = start_mdns
        self._key = key
        self.port = port
        self._addresses = addresses
        self._interfaces = interfaces
        self.advert: Advert | None = None
        self._mdns: Mdns | None = None
        self._registering: Deferred | None = None
        # Filled and read on zeroconf's loop only: the task repeating the
        # announcement, which closing must cancel, whenever it was made.
        self._on_loop: list = []
        self._stopping = False
        self.ready: Deferred[LanAdvertisement] = Deferred()

    def start(self) -> LanAdvertisement:
        try:
            module = _zeroconf()
            addresses = local_addresses() if self._addresses is None else self._addresses
            if not addresses:
                raise LanDiscoveryError("this host has no IPv4 address a LAN peer could connect to")
            self.advert = make_advert(self._key, self.port, addresses)
            info = self._serviceInfo(module, self.advert)
            self._mdns = self._start_mdns(self._reactor, self._interfaces)
        except LanDiscoveryError:
            self.ready.errback()
            return self
        zeroconf, on_loop = self._mdns.zeroconf, self._on_loop

        async def register() -> None:
            # Probing for a name conflict (RFC 6762 8.1) would cost a second
            # for nothing: the name is 24 random bytes long.
            on_loop.append(await zeroconf.async_register_service(info, cooperating_responders=True))

        self._registering = self._mdns.bridge.run(register)
        self._registering.addCallbacks(self._registered, self._failed)
        return self

    @staticmethod
    def _serviceInfo(module, advert: Advert):
        return module.ServiceInfo(
            SERVICE_TYPE,
            advert.instance_name,
            port=advert.port,
            properties=advert.properties,
            server=advert.host_name,
            addresses=[socket.inet_aton(address) for address in advert.addresses],
            host_ttl=ADVERT_TTL,
            other_ttl=ADVERT_TTL,
        )

    def _registered(self, _) -> None:
        self._registering = None
        _log.info(
            "advertising a LAN listener on TCP port {port} ({count} address(es))",
            port=self.port,
            count=len(self.advert.addresses),
        )
        self.ready.callback(self)

    def _failed(self, failure: Failure) -> None:
        self._registering = None
        if self._stopping:
            return  # stop() cancelled it, and said so on ready
        self.ready.errback(Failure(LanDiscoveryError(f"could not advertise on the LAN: {failure.getErrorMessage()}")))
        self.stop()

    def stop(self) -> Deferred[None]:
        """
        Withdraw the advertisement (goodbye packets, so seekers' caches drop
        it) and stop mDNS.

        @return: a Deferred firing once zeroconf's thread has ended.
        """
        if self._mdns is None:
            return succeed(None)
        first = not self._stopping
        self._stopping = True
        if first and not self.ready.called:
            self.ready.errback(Failure(LanDiscoveryError("the advertisement was stopped before it was announced")))
            self.ready.addErrback(lambda _: None)
        if self._registering is not None:
            self._registering.addErrback(lambda _: None)
            self._registering.cancel()

        on_loop = self._on_loop

        async def windDown() -> None:
            for announcing in on_loop:
                announcing.cancel()  # the remaining repeats of the announcement

        return self._mdns.close(windDown)


def advertise(
    reactor,
    port: int,
    key: bytes,
    *,
    addresses: Sequence[str] | None = None,
    interfaces: Sequence[str] | None = None,
) -> LanAdvertisement:
    """
    Advertise a TCP port that accepts pipes (L{pluresync.pipes.tcp.listen_tcp_pipes})
    to LAN peers that hold the same topic, until C{stop()}.

    Each call makes a new advertisement (a fresh salt, label and host name),
    unlinkable to any other: call it again rather than reusing one across
    restarts.

    @param key: the LAN key, L{lan_key}C{(topic)}.
    @param addresses: the IPv4 addresses to advertise (at most 8 are);
        this host's non-loopback ones by default.
    @param interfaces: the IPv4 addresses of the interfaces mDNS runs on; all by default.
    @return: the advertisement, already starting; its C{ready} fires once it
        is announced, or fails with L{LanDiscoveryError} (zeroconf missing,
        no usable address, no multicast).
    @raise ValueError: C{key} is not a LAN key, C{port} no port, or an
        address given is not a unicast IPv4 address.
    """
    check_key(key)
    if not 0 < port < 65536:
        raise ValueError(f"cannot advertise port {port}")
    return LanAdvertisement(reactor, key, port, addresses, interfaces).start()


class LanDiscovery:
    """
    One search for a topic's listeners on the LAN, bounded in time.

    @ivar result: fires with the candidate addresses found (C{IPv4Address}es,
        best first per advertisement, advertisements in the order they were
        found), after mDNS has stopped; fails with L{LanDiscoveryError} if
        mDNS could not run; cancelling it ends the search at once (mDNS then
        stops in the background: see C{closed}).
    @ivar closed: fires once zeroconf's thread has ended.
    """

    def __init__(
        self,
        reactor,
        key: bytes,
        timeout: float,
        *,
        first: bool = False,
        on_found: Callable[[list[IPv4Address]], object] | None = None,
        interfaces: Sequence[str] | None = None,
        max_services: int = MAX_SERVICES,
        start_mdns: Callable[..., Mdns] = Mdns.start,
    ) -> None:
        check_key(key)
        self._reactor = reactor
        self._start_mdns = start_mdns
        self._key = key
        self._timeout = timeout
        self._first = first
        self._on_found = on_found
        self._interfaces = interfaces
        self._max_services = max_services
        self._mdns: Mdns | None = None
        self._networks: list[ipaddress.IPv4Network] = []
        # Filled and read on zeroconf's loop only: the browser, which closing
        # must cancel, whenever it was made.
        self._on_loop: list = []
        self._browsing: Deferred | None = None
        self._seen: set[str] = set()
        self._resolving: dict[str, Deferred] = {}
        self._found: list[IPv4Address] = []
        self._deadline: Any = None
        self._ends_at = 0.0
        self._done = False
        self.result: Deferred[list[IPv4Address]] = Deferred(self._cancel)
        self.closed: Deferred[None] = Deferred()

    def start(self) -> Deferred[list[IPv4Address]]:
        try:
            module = _zeroconf()
            self._networks = local_networks()
            self._mdns = self._start_mdns(self._reactor, self._interfaces)
        except LanDiscoveryError:
            self._done = True
            self.closed.callback(None)
            self.result.errback()
            return self.result
        self._ends_at = self._reactor.seconds() + self._timeout
        self._deadline = self._reactor.callLater(self._timeout, self._finish)
        zeroconf = self._mdns.zeroconf
        handOff = self._mdns.bridge.forward(self._serviceChanged)

        def changed(zeroconf, service_type: str, name: str, state_change) -> None:
            # zeroconf's thread: hand the name over, decide nothing here.
            handOff(name, state_change.name)

        on_loop = self._on_loop

        async def browse() -> None:
            on_loop.append(module.asyncio.AsyncServiceBrowser(zeroconf, SERVICE_TYPE, handlers=[changed]))

        self._browsing = self._mdns.bridge.run(browse)
        self._browsing.addCallbacks(self._browsingStarted, self._browseFailed)
        return self.result

    def _browsingStarted(self, _) -> None:
        self._browsing = None

    def _browseFailed(self, failure: Failure) -> None:
        self._browsing = None
        if not self._done:
            self._finish(LanDiscoveryError(f"could not browse the LAN: {failure.getErrorMessage()}"))

    def _serviceChanged(self, name: str, state: str) -> None:
        """(reactor thread) An advertisement of our service type appeared, changed or left."""
        if self._done or state == "Removed" or not name.lower().endswith("." + SERVICE_TYPE.lower()):
            return
        label = name[: -len(SERVICE_TYPE) - 1].lower()
        if label in self._seen or not recognise(self._key, label):
            return
        if len(self._seen) >= self._max_services:
            return
        self._seen.add(label)
        zeroconf, module = self._mdns.zeroconf, _zeroconf()
        wait_ms = max(1, int((self._ends_at - self._reactor.seconds()) * 1000))

        async def resolve():
            info = module.asyncio.AsyncServiceInfo(SERVICE_TYPE, name)
            if not await info.async_request(zeroconf, wait_ms):
                return None
            return info.port, dict(info.properties)

        d = self._mdns.bridge.run(resolve)
        self._resolving[label] = d
        d.addCallbacks(self._resolved, self._resolveFailed, callbackArgs=(label,), errbackArgs=(label,))

    def _resolved(self, resolved: tuple[int, dict] | None, label: str) -> None:
        self._resolving.pop(label, None)
        if self._done or resolved is None:
            return
        port, properties = resolved
        addresses = verify(self._key, label, port, properties)
        if addresses is None:
            _log.debug("ignored a LAN advertisement whose addresses failed their check")
            return
        candidates = [IPv4Address("TCP", address, port) for address in rank(addresses, self._networks)]
        self._found.extend(candidates)
        _log.debug("found a LAN peer at {addresses} port {port}", addresses=", ".join(addresses), port=port)
        if self._on_found is not None:
            try:
                self._on_found(candidates)
            except Exception:
                _log.failure("a LAN discovery callback failed")
        if self._first and not self._done:
            self._finish()

    def _resolveFailed(self, failure: Failure, label: str) -> None:
        self._resolving.pop(label, None)
        if not self._done:
            _log.debug("could not resolve a LAN advertisement: {why}", why=failure.getErrorMessage())

    def _finish(self, error: Exception | None = None) -> None:
        """Stop searching, stop mDNS, then report."""
        if self._done:
            return
        self._done = True
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        for d in [self._browsing, *self._resolving.values()]:
            if d is not None:
                d.addErrback(lambda _: None)
                d.cancel()
        self._resolving.clear()
        on_loop = self._on_loop

        async def windDown() -> None:
            for browser in on_loop:
                await browser.async_cancel()

        closing = self._mdns.close(windDown)
        closing.chainDeferred(self.closed)

        def report(_) -> None:
            if self.result.called:
                return  # cancelled
            if error is not None:
                self.result.errback(Failure(error))
            else:
                self.result.callback(list(self._found))

        self.closed.addCallback(report)

    def _cancel(self, d: Deferred) -> None:
        self._finish()


def discover(
    reactor,
    key: bytes,
    timeout: float = 3.0,
    *,
    first: bool = False,
    on_found: Callable[[list[IPv4Address]], object] | None = None,
    interfaces: Sequence[str] | None = None,
) -> Deferred[list[IPv4Address]]:
    """
    Look for listeners of C{key}'s topic on the LAN for C{timeout} seconds.

    @param key: the LAN key, L{lan_key}C{(topic)}.
    @param first: stop at the first listener found instead of waiting out
        C{timeout} (the way to connect soonest).
    @param on_found: called (in the reactor thread) with each listener's
        candidate addresses as soon as it is found, to start connecting
        before the search ends.
    @param interfaces: the IPv4 addresses of the interfaces to search on; all by default.
    @return: a Deferred firing with the candidate addresses (C{IPv4Address}es,
        each listener's best first; empty if none was found in time), or
        failing with L{LanDiscoveryError} when mDNS cannot run here;
        cancelling it ends the search.
    """
    try:
        discovery = LanDiscovery(reactor, key, timeout, first=first, on_found=on_found, interfaces=interfaces)
    except ValueError as e:
        return fail(LanDiscoveryError(f"cannot search the LAN: {e}"))
    return discovery.start()
