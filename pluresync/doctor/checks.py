"""
The doctor's checks of one relay path, in order: DNS, TCP (to the relay or
to its proxy), the proxy's CONNECT tunnel, TLS, the WebSocket upgrade, the
relay's C{/health}, and a full pairing round trip with itself.

Each check is bounded by the same timeout, closes every connection it made
before it returns (so nothing lingers in the reactor), and gives a L{Row}:
a verdict, the time it took, what it found and, when something is wrong,
one line saying what to do. A check whose prerequisite failed is
C{skipped}.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from urllib.parse import urlsplit

from twisted.internet import error as neterror
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, DeferredList, TimeoutError
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IHandshakeListener, IResolutionReceiver
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS, trustRootFromCertificates
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.dial.proxy import ProxyTunnelEndpoint
from pluresync.dial.tcp import tcp_endpoint
from pluresync.dial.tlserrors import describe_tls_failure
from pluresync.doctor import tlsinfo
from pluresync.doctor.report import FAIL, OK, SKIPPED, WARN, Row, Section
from pluresync.endpoints.relay import RelayClientEndpoint, RelayConfig
from pluresync.endpoints.relaylistener import RelayListeningPort
from pluresync.errors import RelayError
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes.http import open_http_relay_socket
from pluresync.pipes.websocket import open_relay_socket
from pluresync.relay.core.wire import CLOSE_NORMAL, SUBPROTOCOL, ErrorCode, encode_listen

#: How long closing a connection may take once a check is done with it.
CLOSE_TIMEOUT = 5.0


# -- small tools ----------------------------------------------------------------


def _bounded(reactor, d: Deferred, seconds: float) -> Deferred:
    """C{d}, failing with C{TimeoutError} (and cancelled) after C{seconds}."""
    return d.addTimeout(max(seconds, 0.001), reactor)


def _unwrapped(failure: Failure) -> Failure:
    """The first reason inside twisted.web's wrappers (C{ResponseNeverReceived} and the like)."""
    reasons = getattr(failure.value, "reasons", None)
    if isinstance(reasons, list) and reasons and isinstance(reasons[0], Failure):
        return reasons[0]
    return failure


def _why(failure: Failure, timeout: float) -> str:
    """A failure in words, for a row's detail."""
    failure = _unwrapped(failure)
    if failure.check(TimeoutError, CancelledError, neterror.TimeoutError):
        return f"no answer within {timeout:g} s"
    if failure.check(neterror.ConnectionRefusedError):
        return "connection refused"
    message = failure.getErrorMessage().strip()
    return message or type(failure.value).__name__


def _timed_out(failure: Failure) -> bool:
    failure = _unwrapped(failure)
    return bool(failure.check(TimeoutError, CancelledError, neterror.TimeoutError))


def _authority(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _proxy_variable(secure: bool) -> str:
    return "HTTPS_PROXY" if secure else "HTTP_PROXY"


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace(":", "\\:")


class _Probe(Protocol):
    """A protocol that only notices the connection's end."""

    def __init__(self) -> None:
        self.lost: Deferred[None] = Deferred()

    def connectionLost(self, reason) -> None:
        if not self.lost.called:
            self.lost.callback(None)


@implementer(IHandshakeListener)
class _TLSProbe(_Probe):
    """Notices the end of the TLS handshake, or why it failed, and the server's certificates."""

    def __init__(self) -> None:
        super().__init__()
        self.handshake: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.connection = None

    def handshakeCompleted(self) -> None:
        if not self.handshake.called:
            self.handshake.callback(None)

    def chain(self) -> list:
        connection = self.connection
        if connection is None:
            try:
                connection = self.transport.getHandle()
            except Exception:
                return []
        try:
            return list(connection.get_peer_cert_chain(as_cryptography=True) or [])
        except Exception:
            return []

    def connectionLost(self, reason) -> None:
        self.reason = reason
        try:
            self.connection = self.transport.getHandle()
        except Exception:
            self.connection = None
        if not self.handshake.called:
            self.handshake.errback(reason)
        super().connectionLost(reason)


async def _close(reactor, protocol: _Probe) -> None:
    """Close a probe's connection and wait (bounded) until it is gone."""
    if protocol.lost.called:
        return
    protocol.transport.loseConnection()
    try:
        await _bounded(reactor, protocol.lost, CLOSE_TIMEOUT)
    except Exception:
        protocol.transport.abortConnection()
        await protocol.lost


class _Context:
    """One path's checks: what they share, and how much time each has."""

    def __init__(self, reactor, config: RelayConfig, timeout: float) -> None:
        self.reactor = reactor
        self.config = config
        self.relay = config.relay
        self.proxy = config.proxy
        self.timeout = timeout

    def now(self) -> float:
        return self.reactor.seconds()

    def tcp(self):
        """The endpoint that reaches the relay's host and port: direct, or through the proxy's tunnel."""
        if self.proxy is not None:
            return ProxyTunnelEndpoint(self.reactor, self.proxy, self.relay.host, self.relay.port)
        return tcp_endpoint(self.reactor, self.relay.host, self.relay.port, timeout=self.timeout)

    def trust(self):
        return trustRootFromCertificates(list(self.config.ca)) if self.config.ca else None

    def tls(self, endpoint, host: str | None = None):
        return wrapClientTLS(optionsForClientTLS(host or self.relay.host, trustRoot=self.trust()), endpoint)

    def stream(self):
        """The endpoint an HTTP client uses: TCP (or tunnel), then TLS for wss://."""
        endpoint = self.tcp()
        return self.tls(endpoint) if self.relay.secure else endpoint

    @property
    def proxy_fix(self) -> str:
        variable = _proxy_variable(self.relay.secure)
        return f"if your network has a proxy, set {variable}=http://PROXY:PORT (or pass proxy=http\\://PROXY\\:PORT)"


# -- 1. DNS -------------------------------------------------------------------------


@implementer(IResolutionReceiver)
class _Addresses:
    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.done: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution) -> None:
        pass

    def addressResolved(self, address) -> None:
        host = getattr(address, "host", None)
        if host and host not in self.addresses:
            self.addresses.append(host)

    def resolutionComplete(self) -> None:
        if not self.done.called:  # not after a timeout cancelled it
            self.done.callback(self.addresses)


async def check_dns(ctx: _Context) -> Row:
    host = ctx.relay.host
    if isIPAddress(host) or isIPv6Address(host):
        return Row("dns", OK, None, f"{host} is an IP address: no lookup needed")
    started = ctx.now()
    receiver = _Addresses()
    try:
        ctx.reactor.nameResolver.resolveHostName(receiver, host, portNumber=ctx.relay.port)
        addresses = await _bounded(ctx.reactor, receiver.done, ctx.timeout)
    except Exception:
        failure = Failure()
        addresses = None
        why = _why(failure, ctx.timeout)
    else:
        why = "no addresses found"
    took = ctx.now() - started
    if addresses:
        shown = ", ".join(addresses[:4]) + (f" and {len(addresses) - 4} more" if len(addresses) > 4 else "")
        return Row("dns", OK, took, f"{host} -> {shown}")
    if ctx.proxy is not None:
        # Behind a proxy the proxy resolves the relay's name; many corporate
        # networks resolve only internal names for their clients.
        return Row(
            "dns",
            WARN,
            took,
            f"{host}: {why} here (the proxy resolves it for us, so this may be fine)",
            "if the proxy cannot reach the relay either, check the relay URL's host name",
        )
    return Row(
        "dns",
        FAIL,
        took,
        f"{host}: {why}",
        "DNS failed: check the relay URL's host name, or your resolver (/etc/resolv.conf, VPN)",
    )


# -- 2. TCP (and the proxy's CONNECT) ------------------------------------------------


async def check_tcp(ctx: _Context) -> Row:
    """TCP to the relay, or to the proxy when one applies."""
    proxy = ctx.proxy
    if proxy is not None:
        host, port = proxy.host, proxy.port
        endpoint = tcp_endpoint(ctx.reactor, host, port, timeout=ctx.timeout)
        what = f"to the proxy {proxy.describe()}"
    else:
        host, port = ctx.relay.host, ctx.relay.port
        endpoint = ctx.tcp()
        what = f"to {_authority(host, port)} (direct, no proxy)"
    started = ctx.now()
    try:
        probe = await _bounded(ctx.reactor, endpoint.connect(Factory.forProtocol(_Probe)), ctx.timeout)
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        why = _why(failure, ctx.timeout)
        if proxy is not None:
            fix = (
                f"the proxy is unreachable: check its address (it comes from {proxy.source or 'proxy='}); "
                "if this relay needs no proxy, pass proxy=none or add the relay's host to NO_PROXY"
            )
        else:
            kind = "timed out" if _timed_out(failure) else "refused" if "refused" in why else "failed"
            fix = (
                f"TCP to port {port} {kind}: a firewall blocks it, or nothing listens there "
                f"(check the relay URL's port); {ctx.proxy_fix}"
            )
        return Row("tcp", FAIL, took, f"{what}: {why}", fix)
    took = ctx.now() - started
    peer = probe.transport.getPeer()
    peer_text = _authority(getattr(peer, "host", host), getattr(peer, "port", port))
    await _close(ctx.reactor, probe)
    return Row("tcp", OK, took, f"{what}: connected to {peer_text}")


def _connect_fix(message: str, ctx: _Context) -> str:
    port = ctx.relay.port
    if "requires authentication" in message or "refused the credentials" in message:
        source = ctx.proxy.source if ctx.proxy is not None else "proxy="
        return (
            f"the proxy wants a login: put USER:PASSWORD in its URL (in {source}, percent-encoded: "
            "http://USER:PASSWORD@PROXY:PORT)"
        )
    if "could not reach the relay" in message:
        return "the proxy cannot reach the relay: check the relay URL; the relay may be down"
    if " 403 " in message or "may not allow CONNECT" in message:
        return f"the proxy does not allow CONNECT to port {port}: use a relay on port 443, or ask the proxy's admins"
    if "closed the connection before answering" in message or "malformed answer" in message:
        return "that address is not an HTTP proxy (or a broken one): check the proxy's address and port"
    return "check the proxy's address and its rules for CONNECT"


async def check_connect(ctx: _Context) -> Row:
    """The proxy's CONNECT tunnel to the relay."""
    proxy = ctx.proxy
    target = _authority(ctx.relay.host, ctx.relay.port)
    started = ctx.now()
    try:
        probe = await _bounded(ctx.reactor, ctx.tcp().connect(Factory.forProtocol(_Probe)), ctx.timeout)
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        why = _why(failure, ctx.timeout)
        return Row("proxy", FAIL, took, f"CONNECT {target} through {proxy.address}: {why}", _connect_fix(why, ctx))
    took = ctx.now() - started
    await _close(ctx.reactor, probe)
    return Row("proxy", OK, took, f"CONNECT {target} through {proxy.address}: tunnel open")


# -- 3. TLS -------------------------------------------------------------------------------


def _ca_fix(ctx: _Context, inspected: bool) -> str:
    example = f"relay:url={_escaped(ctx.relay.url)}:ca=/path/to/ca.pem"
    if inspected:
        return (
            "TLS inspection: pass ca=PATH with your company's CA certificate (PEM; ask IT, or export it "
            f"from your browser), e.g. {example}; or ask IT to exempt {ctx.relay.host} from inspection"
        )
    if ctx.config.ca:
        return (
            "the certificate does not chain to the CA(s) in ca=: give the relay's CA bundle "
            "(or your company's CA if your network inspects TLS)"
        )
    return (
        f"pass ca=PATH with the relay's CA (a private relay) or your company's CA (a TLS-inspecting "
        f"network), e.g. {example}"
    )


def _is_public_relay(host: str) -> bool:
    from pluresync.endpoints.relay import PRESETS

    return any(urlsplit(url).hostname == host for url in PRESETS.values())


async def check_tls(ctx: _Context) -> Row:
    relay = ctx.relay
    probe = _TLSProbe()
    started = ctx.now()
    trust = "the CA(s) in ca=" if ctx.config.ca else "the system's trust store"
    try:
        await _bounded(ctx.reactor, ctx.tls(ctx.tcp()).connect(Factory.forProtocol(lambda: probe)), ctx.timeout)
        await _bounded(ctx.reactor, probe.handshake, ctx.timeout - (ctx.now() - started))
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        chain = probe.chain()
        if probe.transport is None:
            # TCP (or the tunnel) failed this time, after working in the previous row.
            return Row(
                "tls",
                FAIL,
                took,
                f"could not connect again: {_why(failure, ctx.timeout)}",
                "the connection worked a moment ago: the network is unstable or the relay went away; try again",
            )
        if not probe.lost.called:
            probe.transport.abortConnection()
            await probe.lost
        if _timed_out(failure) or probe.reason is None:
            return Row(
                "tls",
                FAIL,
                took,
                f"the server accepted TCP but did not finish a TLS handshake within {ctx.timeout:g} s",
                "is it a plain ws:// relay (then use ws:// in the relay URL)? Otherwise something between "
                "you and the relay holds TLS connections: try another network or a proxy",
            )
        text = describe_tls_failure(probe.reason, relay.host, relay.port, transport=probe.connection)
        text = text or f"the TLS handshake failed: {_why(probe.reason, ctx.timeout)}"
        leaf = chain[0] if chain else None
        shown = f" ({tlsinfo.summary(leaf)})" if leaf is not None else ""
        if "not signed by a trusted CA" in text or "failed verification" in text:
            product = tlsinfo.inspection_product(chain)
            if product is not None:
                detail = f"TLS inspection by {product}: the certificate is not the relay's own{shown}"
                return Row("tls", FAIL, took, detail, _ca_fix(ctx, True))
            if not ctx.config.ca and _is_public_relay(relay.host):
                detail = (
                    f"{text}; a public relay's certificate should verify, so this looks like a "
                    f"TLS-inspecting proxy{shown}"
                )
                return Row("tls", FAIL, took, detail, _ca_fix(ctx, True))
            return Row("tls", FAIL, took, f"{text}{shown}", _ca_fix(ctx, False))
        if "expired" in text or "not valid yet" in text:
            fix = "check this machine's clock; if it is right, the relay's operator must renew its certificate"
        elif "is not valid for" in text:
            fix = "use the host name the certificate names in the relay URL, or fix the relay's certificate"
        elif "did not answer TLS" in text:
            fix = "the relay serves plain WebSocket: use ws:// in the relay URL (or check its port)"
        else:
            fix = "check the relay URL; try another network if a middlebox interferes with TLS"
        return Row("tls", FAIL, took, f"{text}{shown}", fix)
    took = ctx.now() - started
    chain = probe.chain()
    await _close(ctx.reactor, probe)
    if not chain:
        return Row("tls", OK, took, f"verified against {trust}")
    leaf = chain[0]
    detail = f"verified against {trust}: {tlsinfo.summary(leaf)}"
    product = tlsinfo.inspection_product(chain)
    if product is not None:
        return Row(
            "tls",
            WARN,
            took,
            f"{detail}; TLS is inspected by {product} (its CA is trusted here)",
            "inspection works here, but it sees the WebSocket (ciphertext only) and may break the upgrade; "
            f"ask IT to exempt {relay.host} if the next rows fail",
        )
    _, days = tlsinfo.expiry(leaf)
    if days is not None and days < tlsinfo.EXPIRY_WARNING_DAYS:
        return Row("tls", WARN, took, detail, "the relay's certificate expires soon: tell its operator")
    return Row("tls", OK, took, detail)


# -- 4. the WebSocket upgrade ------------------------------------------------------------


def _upgrade_failure(message: str, ctx: _Context) -> tuple[str, str]:
    """What an upgrade failure means, and what to do."""
    if "is not a pluresync relay" in message:
        return (
            f"not a pluresync relay: {message}",
            "not a pluresync relay: check the relay URL (host, port and path)",
        )
    upgrade = re.search(r"upgrade failed \[?(\d{3})\]?:? *([^)]*)", message)
    if upgrade is not None:
        code, reason = upgrade.group(1), upgrade.group(2).strip()
        status = f"{code} {reason}".strip()
        if code in ("401", "403"):
            return (
                f"the relay refused the upgrade: HTTP {status} (it admits only clients with a token?)",
                "the relay requires authentication: ask its operator for access, or use another relay",
            )
        if code == "503":
            return (
                f"the relay refused the upgrade: HTTP {status} (at its connection limit?)",
                "the relay is overloaded: try again later, or use another relay",
            )
        return (
            f"not a pluresync relay: HTTP {status} instead of the WebSocket upgrade (or something in "
            "between does not pass WebSocket upgrades)",
            "not a pluresync relay: check the relay URL (host, port and path); behind a proxy or "
            "load balancer, it must pass WebSocket upgrades",
        )
    if "going-away" in message or "shutting down" in message:
        return message, "the relay is restarting: try again in a minute"
    if "rate-limited" in message:
        return message, "the relay is rate-limiting this address: try again later"
    return message, "check the relay URL; if TCP and TLS work, something in between may block WebSockets"


async def check_websocket(ctx: _Context) -> Row:
    config = ctx.config
    identity = PeerIdentity.generate()
    # A listener registration under a random rendezvous id: nobody can
    # connect to it, and it is gone as soon as we close.
    hello = encode_listen(os.urandom(32).hex(), identity.peer_id)
    closed: Deferred[None] = Deferred()

    def lost(_: Failure) -> None:
        if not closed.called:
            closed.callback(None)

    started = ctx.now()
    try:
        protocol, _ = await _bounded(
            ctx.reactor,
            open_relay_socket(
                ctx.reactor,
                ctx.relay,
                hello,
                ca=list(config.ca) if config.ca else None,
                ping_interval=0,
                ping_timeout=0,
                proxy=ctx.proxy,
                token=config.token,
                on_lost=lost,
            ),
            ctx.timeout,
        )
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        if _timed_out(failure):
            return Row(
                "websocket",
                FAIL,
                took,
                f"no answer to the upgrade within {ctx.timeout:g} s",
                "the relay (or something in between) accepts connections but does not answer WebSocket "
                "upgrades: check the relay URL; a proxy may hold upgrades",
            )
        message = failure.getErrorMessage()
        detail, fix = _upgrade_failure(message, ctx)
        return Row("websocket", FAIL, took, detail, fix)
    took = ctx.now() - started
    protocol.sendClose(CLOSE_NORMAL)
    try:
        await _bounded(ctx.reactor, closed, CLOSE_TIMEOUT)
    except Exception:
        protocol.transport.abortConnection()
        await closed
    return Row("websocket", OK, took, f"upgraded to {SUBPROTOCOL}; a listener registration was ready")


async def check_http_pipe(ctx: _Context, upgrade_ok: bool) -> Row:
    """
    The relay's HTTP pipe (what C{pipe=auto} falls back to where WebSockets
    are refused): the same listener registration as L{check_websocket},
    over plain HTTP requests.
    """
    config = ctx.config
    hello = encode_listen(os.urandom(32).hex(), PeerIdentity.generate().peer_id)
    started = ctx.now()
    try:
        socket, _ = await _bounded(
            ctx.reactor,
            open_http_relay_socket(
                ctx.reactor,
                ctx.relay,
                hello,
                ca=list(config.ca) if config.ca else None,
                proxy=ctx.proxy,
                token=config.token,
            ),
            ctx.timeout,
        )
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        why = _why(failure, ctx.timeout)
        if upgrade_ok:
            return Row(
                "http pipe",
                WARN,
                took,
                f"the relay's HTTP pipe did not work ({why}); the WebSocket does, and is what is used",
                "nothing to do here; an older relay has no HTTP pipe (it matters only where WebSockets are refused)",
            )
        return Row(
            "http pipe",
            FAIL,
            took,
            f"neither a WebSocket nor the relay's HTTP pipe gets through: {why}",
            "something between here and the relay refuses it altogether: ask the proxy's admins to allow the "
            "relay's host (CONNECT to its port, then HTTPS POSTs to /pipe)",
        )
    took = ctx.now() - started
    socket.abort()
    if upgrade_ok:
        return Row("http pipe", OK, took, "the relay's HTTP pipe works too (pipe=auto uses the WebSocket)")
    return Row(
        "http pipe",
        OK,
        took,
        "WebSockets are refused from here, the relay's HTTP pipe works: relay: and auto: use it by themselves",
    )


# -- 5. /health ---------------------------------------------------------------------------


class _Endpoints:
    """Agent's endpoint factory: every URL goes to the relay, as the relay socket does; keeps the protocols."""

    def __init__(self, ctx: _Context) -> None:
        self._ctx = ctx
        self.protocols: list = []

    def endpointForURI(self, uri):
        outer = self

        class _Tracking:
            def connect(self, factory):
                d = outer._ctx.stream().connect(factory)

                def keep(protocol):
                    outer.protocols.append(protocol)
                    return protocol

                return d.addCallback(keep)

        return _Tracking()


def health_url(ctx: _Context) -> str:
    relay = ctx.relay
    path = urlsplit(relay.url).path.rstrip("/") + "/health"
    scheme = "https" if relay.secure else "http"
    return f"{scheme}://{_authority(relay.host, relay.port)}{path}"


async def check_health(ctx: _Context, upgrade_ok: bool) -> Row:
    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    url = health_url(ctx)
    endpoints = _Endpoints(ctx)
    agent = Agent.usingEndpointFactory(ctx.reactor, endpoints, HTTPConnectionPool(ctx.reactor, persistent=False))
    started = ctx.now()
    failed = WARN if upgrade_ok else FAIL
    try:
        try:
            response = await _bounded(ctx.reactor, treq.get(url, agent=agent), ctx.timeout)
            body = await _bounded(ctx.reactor, treq.content(response), ctx.timeout - (ctx.now() - started))
        finally:
            # Every connection the Agent opened is closed before we go on.
            await DeferredList([p.abort() for p in endpoints.protocols if hasattr(p, "abort")])
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        return Row(
            "health",
            failed,
            took,
            f"GET {url}: {_why(failure, ctx.timeout)}",
            "the relay does not answer HTTP requests: check the relay URL",
        )
    took = ctx.now() - started
    code = response.code
    try:
        health = json.loads(body)
        if not isinstance(health, dict) or health.get("status") is None:
            raise ValueError
    except ValueError:
        health = None
    if code == 200 and health is not None:
        fields = [f"status={health.get('status')}"]
        for name in ("version", "connections", "listeners", "sessions"):
            if name in health:
                fields.append(f"{name}={health[name]}")
        detail = f"GET {url}: {code} " + " ".join(fields)
        if health.get("status") != "ok":
            return Row("health", WARN, took, detail, "the relay reports a problem: tell its operator")
        if health.get("ready") is False:
            return Row(
                "health",
                WARN,
                took,
                detail + " ready=false",
                "the relay says it is not ready (shutting down, or a dependency is down): try again shortly",
            )
        return Row("health", OK, took, detail)
    if code == 404:
        detail = f"GET {url}: 404 not found"
        if upgrade_ok:
            return Row("health", WARN, took, detail, "/health is not routed to the relay (a proxy in front?); harmless")
        return Row("health", FAIL, took, detail, "/health not found: not a pluresync relay; check the relay URL")
    what = "not a pluresync /health document" if code == 200 else f"HTTP {code}"
    return Row(
        "health",
        failed,
        took,
        f"GET {url}: {what}",
        "not a pluresync relay's /health: check the relay URL" if not upgrade_ok else "ask the relay's operator",
    )


# -- 6. the round trip --------------------------------------------------------------------


class _Echo(Protocol):
    """The listening side: sends back whatever arrives."""

    def __init__(self, accepted: list) -> None:
        self.lost: Deferred[None] = Deferred()
        accepted.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason) -> None:
        if not self.lost.called:
            self.lost.callback(None)


class _Ping(Protocol):
    """The connecting side: waits for its message to come back."""

    def __init__(self, message: bytes) -> None:
        self.message = message
        self.received = b""
        self.echoed: Deferred[None] = Deferred()
        self.lost: Deferred[None] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if len(self.received) >= len(self.message) and not self.echoed.called:
            if self.received == self.message:
                self.echoed.callback(None)
            else:
                self.echoed.errback(ValueError("the message came back changed"))

    def connectionLost(self, reason) -> None:
        if not self.echoed.called:
            self.echoed.errback(reason)
        if not self.lost.called:
            self.lost.callback(None)


async def check_round_trip(ctx: _Context, pipe: str = "auto") -> Row:
    reactor = ctx.reactor
    # A fresh random key: this listener and client meet only each other,
    # never a real peer, and nothing of the user's key is used.
    base = replace(
        ctx.config,
        topic=SyncKey.generate().topic(),
        peer=None,
        wait=max(ctx.timeout - 1.0, 0.0),
        timeout=ctx.timeout,
        ping_interval=0.0,
        ping_timeout=0.0,
        pipe=pipe,
    )
    accepted: list[_Echo] = []
    # Its outcome is the row, not log lines ("listening through ...").
    port = RelayListeningPort(
        reactor,
        replace(base, identity=PeerIdentity.generate()),
        Factory.forProtocol(lambda: _Echo(accepted)),
        log=Logger(observer=lambda event: None),
    )
    client: _Ping | None = None
    message = b"pluresync doctor " + os.urandom(16).hex().encode()
    started = ctx.now()
    stage = "registering the listener"
    try:
        await _bounded(reactor, port.startListening(), ctx.timeout)
        stage = "pairing and the handshake"
        paired_at = ctx.now()
        endpoint = RelayClientEndpoint(reactor, replace(base, identity=PeerIdentity.generate()))
        remaining = ctx.timeout - (ctx.now() - started)
        client = await _bounded(reactor, endpoint.connect(Factory.forProtocol(lambda: _Ping(message))), remaining)
        pairing = ctx.now() - paired_at
        stage = "the message's round trip"
        sent_at = ctx.now()
        client.transport.write(message)
        remaining = ctx.timeout - (ctx.now() - started)
        await _bounded(reactor, client.echoed, remaining)
        rtt = ctx.now() - sent_at
    except Exception:
        failure = Failure()
        took = ctx.now() - started
        await _teardown(reactor, port, client, accepted, clean=False)
        why = _why(failure, ctx.timeout)
        if isinstance(failure.value, RelayError) and failure.value.code == ErrorCode.NO_LISTENER.value:
            fix = "the relay did not pair us with our own listener: it may run several instances without shared state"
        else:
            fix = (
                "the relay accepts WebSockets but pairing failed: try again; if it persists, tell the relay's operator"
            )
        return Row("round trip", FAIL, took, f"{stage}: {why}", fix)
    took = ctx.now() - started
    await _teardown(reactor, port, client, accepted, clean=True)
    over = " (over the HTTP pipe)" if pipe == "http" else ""
    return Row(
        "round trip",
        OK,
        took,
        f"paired with itself in {pairing * 1000:.0f} ms; end-to-end encrypted message round trip "
        f"{rtt * 1000:.1f} ms{over}",
    )


async def _teardown(reactor, port, client, accepted, clean: bool) -> None:
    """Close the round trip's connections and listener, and wait until they are gone."""
    waiting = []
    if client is not None:
        if clean:
            client.transport.loseConnection()
        else:
            client.transport.abortConnection()
        waiting.append(client.lost)
    for echo in accepted:
        if not clean:
            echo.transport.abortConnection()
        waiting.append(echo.lost)
    try:
        await _bounded(reactor, DeferredList(waiting), CLOSE_TIMEOUT)
    except Exception:
        for protocol in ([client] if client is not None else []) + list(accepted):
            protocol.transport.abortConnection()
        await DeferredList(waiting)
    await _bounded(reactor, port.stopListening(), CLOSE_TIMEOUT).addErrback(lambda _: None)


# -- one path ----------------------------------------------------------------------------


def _skipped(check: str, because: str) -> Row:
    return Row(check, SKIPPED, None, f"because {because}")


async def diagnose(reactor, config: RelayConfig, timeout: float) -> Section:
    """Run every check of one relay path, in order, and return its section of the report."""
    ctx = _Context(reactor, config, timeout)
    relay = ctx.relay
    where = relay.url
    if ctx.proxy is not None:
        where += f" through the proxy {ctx.proxy.describe()}"
    section = Section(config.name, where)
    rows = section.rows

    async def run(check, *args) -> Row:
        try:
            row = await check(ctx, *args)
        except Exception as e:  # a bug of ours must not hide the other rows
            row = Row(check.__name__.removeprefix("check_"), FAIL, None, f"internal error: {e!r}")
        rows.append(row)
        return row

    blocked = None
    dns = await run(check_dns)
    if dns.verdict == FAIL:
        blocked = "DNS failed"
    if blocked is None:
        if (await run(check_tcp)).verdict == FAIL:
            blocked = "TCP failed"
    else:
        rows.append(_skipped("tcp", blocked))
    if ctx.proxy is not None:
        if blocked is None:
            if (await run(check_connect)).verdict == FAIL:
                blocked = "the proxy's tunnel failed"
        else:
            rows.append(_skipped("proxy", blocked))
    if relay.secure:
        if blocked is None:
            if (await run(check_tls)).verdict == FAIL:
                blocked = "TLS failed"
        else:
            rows.append(_skipped("tls", blocked))
    else:
        rows.append(Row("tls", SKIPPED, None, "not used: ws:// is plain WebSocket (wss:// adds TLS)"))
    upgrade_ok = False
    if blocked is None:
        upgrade_ok = (await run(check_websocket)).verdict == OK
    else:
        rows.append(_skipped("websocket", blocked))
    http_ok = False
    if blocked is None:
        http_ok = (await run(check_http_pipe, upgrade_ok)).verdict == OK
    else:
        rows.append(_skipped("http pipe", blocked))
    if blocked is None:
        await run(check_health, upgrade_ok)
    else:
        rows.append(_skipped("health", blocked))
    if blocked is None and upgrade_ok:
        await run(check_round_trip, "ws")
    elif blocked is None and http_ok:
        await run(check_round_trip, "http")
    else:
        rows.append(_skipped("round trip", blocked or "neither the WebSocket upgrade nor the HTTP pipe worked"))
    return section
