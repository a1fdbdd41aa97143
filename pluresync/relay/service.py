"""
C{twist pluresync-relay}: command-line options and the relay service.

The plugin in C{twisted/plugins/pluresync_relay.py} points here; nothing
heavy is imported until L{makeService} runs.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import quoteStringArgument, serverFromString
from twisted.logger import Logger
from twisted.python import usage

from .._version import __version__
from .limits import RelayLimits

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


_positive_int.coerceDoc = "An integer >= 0."  # type: ignore[attr-defined]
_seconds.coerceDoc = "Seconds (a number >= 0)."  # type: ignore[attr-defined]


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
    ]

    def postOptions(self) -> None:
        self["endpoint"] = port_endpoint(self["port"], self["tls-cert"], self["tls-key"])
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
            )
        except ValueError as error:
            raise usage.UsageError(str(error)) from None


class RelayService(MultiService):
    """
    The relay: one listening port serving the relay site.

    C{stopService} (SIGTERM under C{twist}) stops listening and closes every
    WebSocket with 1001 "going away"; its Deferred fires once they are all
    closed (at most C{shutdown_timeout} seconds later).
    """

    def __init__(self, reactor: Any, endpoint: str, limits: RelayLimits) -> None:
        super().__init__()
        from .site import build_site

        self.site, self.factory = build_site(reactor, limits)
        self.endpoint = endpoint
        StreamServerEndpointService(serverFromString(reactor, endpoint), self.site).setServiceParent(self)

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
        super().startService()

    def stopService(self) -> Deferred[Any]:
        stopped = super().stopService()
        closed = self.factory.close_all()
        return DeferredList([stopped, closed], fireOnOneErrback=True, consumeErrors=True)


def makeService(config: Options, reactor: Any = None) -> RelayService:
    """Build the relay service from parsed L{Options}."""
    if reactor is None:
        from twisted.internet import reactor as global_reactor

        reactor = global_reactor
    return RelayService(reactor, config["endpoint"], config["limits"])
