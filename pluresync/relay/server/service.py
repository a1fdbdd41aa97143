"""
C{twist pluresync-relay}: command-line options and the relay service.

The plugin in C{twisted/plugins/pluresync_relay.py} points here; nothing
heavy is imported until L{makeService} runs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService, UDPServer
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.server.fdlimit import raise_nofile
from pluresync.version import __version__

log = Logger(namespace="pluresync.relay")

_DEFAULTS = RelayLimits()


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError(f"{value!r} must not be negative")
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not number >= 0 or number == float("inf"):
        raise ValueError(f"{value!r} must be a finite number of seconds >= 0")
    return number


def _udp_port(value: str) -> int:
    number = int(value)
    if not 1 <= number <= 65534:
        raise ValueError(f"{value!r} must be a UDP port from 1 to 65534 (N+1 is used too)")
    return number


_positive_int.coerceDoc = "An integer >= 0."  # type: ignore[attr-defined]
_seconds.coerceDoc = "Seconds (a number >= 0)."  # type: ignore[attr-defined]
_udp_port.coerceDoc = "A UDP port from 1 to 65534."  # type: ignore[attr-defined]


def stun_interface(endpoint: str) -> str:
    """
    The address C{--udp-port} binds: the C{interface=} of the C{--port}
    endpoint, so the STUN ports are exactly as reachable as the relay;
    without one, every interface of the endpoint's family (C{::} for
    C{tcp6:}, otherwise every IPv4 address).
    """
    from pluresync.relay.server.authconfig import endpoint_interface

    kind, interface = endpoint_interface(endpoint)
    if interface is not None:
        return interface.strip("[]")
    return "::" if kind == "tcp6" else ""


def port_endpoint(port: str, tls_cert: str | None = None, tls_key: str | None = None) -> str:
    """
    The server endpoint string for C{--port} (and C{--tls-cert/--tls-key}).

    A bare number C{N} means C{tcp:N}.  With a certificate, a C{tcp:} port
    becomes the same C{ssl:} port with C{privateKey}/C{certKey} (the key
    defaults to the certificate file, for a combined PEM).

    @raise usage.UsageError: on TLS options with a non-TCP endpoint, or a
        key without a certificate.
    """
    port = port.strip()
    if port.isdigit():
        port = f"tcp:{port}"
    if tls_key is not None and tls_cert is None:
        raise usage.UsageError("--tls-key needs --tls-cert")
    if tls_cert is None:
        return port
    if not port.startswith("tcp:"):
        raise usage.UsageError(
            "--tls-cert/--tls-key need a bare port number or a tcp: endpoint "
            f"(got {port!r}); give ssl: options in the endpoint string instead"
        )
    key = tls_key if tls_key is not None else tls_cert
    return (
        "ssl:"
        + port[len("tcp:") :]
        + ":privateKey="
        + quoteStringArgument(key)
        + ":certKey="
        + quoteStringArgument(tls_cert)
    )


class Options(usage.Options):
    """Options of C{twist pluresync-relay}."""

    synopsis = "[options]"
    longdesc = (
        "Run a pluresync relay: a WebSocket server (subprotocol pluresync.v1) "
        "that pairs peers by rendezvous id and forwards their end-to-end "
        "encrypted bytes, with GET /health on the same port."
    )

    optParameters = [
        [
            "port",
            "p",
            "tcp:8080",
            "Server endpoint to listen on (a bare number N means tcp:N), "
            "e.g. 443, tcp:8080:interface=127.0.0.1, ssl:443:privateKey=key.pem.",
        ],
        ["tls-cert", None, None, "PEM certificate (chain): turns a bare/tcp port into ssl:."],
        ["tls-key", None, None, "PEM private key for --tls-cert (default: the --tls-cert file)."],
        ["metrics-port", None, None, "Serve GET /metrics on this endpoint instead of on --port (e.g. a private one)."],
        [
            "udp-port",
            None,
            None,
            "Also answer STUN Binding requests on UDP ports N and N+1 (clients learn their public address and "
            "NAT type); on the --port endpoint's interface. Off by default.",
            _udp_port,
        ],
        [
            "max-message",
            None,
            _DEFAULTS.max_message,
            "Largest WebSocket frame/message payload in bytes (larger: too-large, 4009).",
            _positive_int,
        ],
        [
            "open-timeout",
            None,
            _DEFAULTS.open_timeout,
            "Seconds for the HTTP upgrade and WebSocket opening handshake.",
            _seconds,
        ],
        [
            "hello-timeout",
            None,
            _DEFAULTS.hello_timeout,
            "Seconds after the upgrade to send the control message (then: timeout, 4008).",
            _seconds,
        ],
        [
            "ping-interval",
            None,
            _DEFAULTS.ping_interval,
            "Seconds of silence before the relay pings a client (0: never).",
            _seconds,
        ],
        [
            "ping-timeout",
            None,
            _DEFAULTS.ping_timeout,
            "Seconds a client has to answer a ping before it is dropped.",
            _seconds,
        ],
        [
            "max-connections",
            None,
            _DEFAULTS.max_connections,
            "Concurrent WebSockets; beyond it upgrades get HTTP 503 (0: unlimited).",
            _positive_int,
        ],
        [
            "max-pending",
            None,
            _DEFAULTS.max_pending,
            "Waiting connectors per rendezvous id (beyond: rate-limited, 4029).",
            _positive_int,
        ],
        ["max-wait", None, _DEFAULTS.max_wait, "Longest wait (seconds) a connector may ask for.", _seconds],
        [
            "accept-timeout",
            None,
            _DEFAULTS.accept_timeout,
            "Seconds a listener has to accept an incoming connector (then: timeout, 4008).",
            _seconds,
        ],
        [
            "auth",
            None,
            None,
            "Who may connect: open, tokens or signed (default: open only when listening on "
            "loopback; elsewhere it must be chosen). See docs/relay.md, Authentication.",
        ],
        ["auth-tokens-file", None, None, "--auth tokens: file of allowed tokens, one 'sha256:HEX tenant' per line."],
        ["auth-secret-file", None, None, "--auth signed: file holding the HMAC secret of `pluresync relay-token`."],
        [
            "connections-per-second",
            None,
            _DEFAULTS.rate.connections_per_second,
            "New WebSockets per second per client address (beyond: HTTP 429; 0: unlimited).",
            float,
        ],
        [
            "connections-burst",
            None,
            _DEFAULTS.rate.connections_burst,
            "New WebSockets one address may open at once.",
            _positive_int,
        ],
        [
            "connections-per-address",
            None,
            _DEFAULTS.rate.connections_per_address,
            "Concurrent WebSockets per client address (beyond: HTTP 429; 0: unlimited).",
            _positive_int,
        ],
        [
            "listeners-per-rdv",
            None,
            _DEFAULTS.rate.listeners_per_rdv,
            "Listeners per rendezvous id (beyond: rate-limited, 4029; 0: unlimited).",
            _positive_int,
        ],
        [
            "session-bytes-per-second",
            None,
            _DEFAULTS.rate.session_bytes_per_second,
            "Bytes per second each side of a session may send (0: unlimited).",
            _positive_int,
        ],
        [
            "session-bytes",
            None,
            _DEFAULTS.rate.session_bytes,
            "Bytes a session may forward (then 4029; 0: no cap).",
            _positive_int,
        ],
        ["session-seconds", None, _DEFAULTS.rate.session_seconds, "Longest session (then 4029; 0: no cap).", _seconds],
        [
            "global-bytes-per-second",
            None,
            _DEFAULTS.rate.global_bytes_per_second,
            "Bytes per second the relay forwards in all (0: unlimited).",
            _positive_int,
        ],
        ["redis", None, None, "Cluster with the other instances sharing this Redis: redis://HOST:PORT/N."],
        [
            "cluster-listen",
            None,
            None,
            "--redis: server endpoint for links from other instances (tcp:PORT:interface=IP).",
        ],
        ["cluster-address", None, None, "--redis: HOST:PORT other instances reach --cluster-listen at."],
        ["cluster-secret-file", None, None, "--redis: file holding the secret shared by the instances (>= 16 bytes)."],
    ]

    def opt_trusted_proxy(self, cidr: str) -> None:
        """Believe X-Forwarded-For from this proxy address or CIDR network (repeatable)."""
        self.setdefault("trusted-proxy", []).append(cidr)

    def postOptions(self) -> None:
        self["endpoint"] = port_endpoint(self["port"], self["tls-cert"], self["tls-key"])
        self["metrics-endpoint"] = port_endpoint(self["metrics-port"]) if self["metrics-port"] else None
        try:
            self["limits"] = RelayLimits(
                max_message=self["max-message"],
                open_timeout=self["open-timeout"],
                hello_timeout=self["hello-timeout"],
                ping_interval=self["ping-interval"],
                ping_timeout=self["ping-timeout"],
                max_connections=self["max-connections"],
                max_pending=self["max-pending"],
                max_wait=self["max-wait"],
                accept_timeout=self["accept-timeout"],
                rate=_rate_limits(self),
            )
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        from pluresync.relay.cluster.service import cluster_config

        try:
            self["cluster"] = cluster_config(
                self["redis"], self["cluster-listen"], self["cluster-address"], self["cluster-secret-file"]
            )
        except ValueError as error:
            raise usage.UsageError(str(error)) from None
        from pluresync.relay.server.authconfig import check_auth_options

        # The rules only (no file is read here): makeService reads them.
        check_auth_options(self["auth"], self["endpoint"], self["auth-tokens-file"], self["auth-secret-file"])


def _rate_limits(options: Any) -> Any:
    """The L{pluresync.relay.core.ratelimit.RateLimits} of the options (docs/relay.md, "Rate limits")."""
    from pluresync.relay.core.ratelimit import RateLimits, parse_networks

    return RateLimits(
        connections_per_second=options["connections-per-second"],
        connections_burst=options["connections-burst"],
        connections_per_address=options["connections-per-address"],
        listeners_per_rdv=options["listeners-per-rdv"],
        session_bytes_per_second=options["session-bytes-per-second"],
        session_bytes=options["session-bytes"],
        session_seconds=options["session-seconds"],
        global_bytes_per_second=options["global-bytes-per-second"],
        trusted_proxies=parse_networks(options.get("trusted-proxy", [])),
    )


class RelayService(MultiService):
    """
    The relay: one listening port serving the relay site (and, with
    C{udp_port}, a STUN server on UDP ports N and N+1).

    C{stopService} (SIGTERM under C{twist}) stops listening and closes every
    WebSocket with 1001 "going away"; its Deferred fires once they are all
    closed (at most C{shutdown_timeout} seconds later).
    """

    #: Authentication warnings logged at start (set by L{makeService}).
    auth_warnings: tuple[str, ...] = ()

    #: The STUN servers of C{--udp-port} (on N, then N+1); empty without it.
    stun_servers: tuple[Any, ...] = ()

    def __init__(
        self,
        reactor: Any,
        endpoint: str,
        limits: RelayLimits,
        metrics_endpoint: str | None = None,
        udp_port: int | None = None,
    ) -> None:
        super().__init__()
        from pluresync.relay.server.site import build_metrics_site, build_site

        self.site, self.factory = build_site(reactor, limits, metrics=metrics_endpoint is None)
        self.endpoint = endpoint
        StreamServerEndpointService(serverFromString(reactor, endpoint), self.site).setServiceParent(self)
        if metrics_endpoint is not None:
            metrics_site = build_metrics_site(reactor, self.factory.metrics)
            metrics_port = serverFromString(reactor, metrics_endpoint)
            StreamServerEndpointService(metrics_port, metrics_site).setServiceParent(self)
        self.udp_port = udp_port
        self.udp_interface = stun_interface(endpoint)
        if udp_port is not None:
            # Two ports, because a client compares the address each one saw
            # to tell a cone NAT from a symmetric one (docs/relay.md, STUN).
            from pluresync.direct.stunserver import StunServer

            self.stun_servers = (StunServer(), StunServer())
            for offset, server in enumerate(self.stun_servers):
                UDPServer(udp_port + offset, server, interface=self.udp_interface, reactor=reactor).setServiceParent(
                    self
                )

    def startService(self) -> None:
        try:
            from autobahn.websocket import USES_NVX as nvx
        except ImportError:  # pragma: no cover - older Autobahn
            nvx = False
        log.info(
            "pluresync relay {version} on {endpoint} (Autobahn NVX acceleration: {nvx})",
            version=__version__,
            endpoint=self.endpoint.split(":privateKey=")[0],
            nvx=nvx,
        )
        _log_authentication(self.factory.authenticator, self.auth_warnings)
        # Each WebSocket is a file descriptor: tens of thousands of them.
        limit = raise_nofile()
        log.info("{limit}", limit=limit.describe())
        if limit.soft is not None:
            self.site.health.info["fd_limit"] = limit.soft
        if self.udp_port is not None:
            log.info(
                "STUN on UDP ports {first} and {second} ({interface})",
                first=self.udp_port,
                second=self.udp_port + 1,
                interface=self.udp_interface or "every IPv4 interface",
            )
        super().startService()

    def stopService(self) -> Deferred[Any]:
        stopped = super().stopService()
        closed = self.factory.close_all()
        return DeferredList([stopped, closed], fireOnOneErrback=True, consumeErrors=True)


def _auth_problem(message: str) -> None:
    log.warn("authentication: {problem}", problem=message)


def _log_authentication(authenticator: Any, warnings: tuple[str, ...]) -> None:
    """The start-up lines about authentication (never a token or secret)."""
    log.info("authentication: {mode} ({what})", mode=authenticator.mode, what=repr(authenticator))
    for warning in warnings:
        log.warn("authentication: {problem}", problem=warning)
    # Autobahn logs whole upgrade requests (Authorization header included)
    # at debug level; never let that reach a relay's log.
    import txaio

    if txaio.get_global_log_level() in ("debug", "trace"):
        txaio.set_global_log_level("info")
        log.warn("Autobahn debug logging was on; turned it off (it would log Authorization headers)")


def makeService(config: Options, reactor: Any = None) -> RelayService:
    """Build the relay service from parsed L{Options}."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    from pluresync.relay.server.authconfig import relay_authenticator

    try:
        authenticator, warnings = relay_authenticator(
            config.get("auth"),
            config["endpoint"],
            config.get("auth-tokens-file"),
            config.get("auth-secret-file"),
            report=_auth_problem,
        )
    except usage.UsageError as e:
        # `twist` shows a traceback for anything makeService raises; a
        # configuration problem deserves one clear line (exit status 1).
        raise SystemExit(f"twist pluresync-relay: error: {e}") from None
    service = RelayService(
        reactor,
        config["endpoint"],
        config["limits"],
        metrics_endpoint=config.get("metrics-endpoint"),
        udp_port=config.get("udp-port"),
    )
    service.factory.authenticator = authenticator
    service.auth_warnings = tuple(warnings)
    if config.get("cluster") is not None:
        from pluresync.relay.cluster.service import attach_cluster

        try:
            attach_cluster(service, config["cluster"], reactor)
        except ValueError as e:
            raise SystemExit(f"twist pluresync-relay: error: {e}") from None
    return service
