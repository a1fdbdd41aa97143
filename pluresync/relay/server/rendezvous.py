"""
What every relay socket does at the rendezvous, whatever carries it (a
WebSocket, L{pluresync.relay.server.websocket}, or an HTTP pipe,
L{pluresync.relay.server.httppipe}): register a listener, wait as a
connector, decline an offered session, and leave the registry when it
goes.  Pairing itself differs by front (each couples its own kind of
socket), so it stays with each.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger

from pluresync.relay.core.pairing import Connector, Listener
from pluresync.relay.core.session import RelaySession
from pluresync.relay.core.wire import Connect, Decline, ErrorCode, Listen, ProtocolError, encode_ready

log = Logger(namespace="pluresync.relay")


class RendezvousFront:
    """
    A relay socket's part in the registry (a mixin: the socket has
    C{factory}, C{session} and C{send_control}).  Its state lives in class
    attributes until set, so an idle socket's own dict holds nothing of it.
    """

    factory: Any
    session: RelaySession | None
    #: what this front adds to its log lines (e.g. " (HTTP pipe)")
    front_label = ""
    _listener: Listener | None = None
    _connector: Connector | None = None
    #: when this socket asked to connect (the pairing's wait, for the metrics)
    connect_at = 0.0

    def listen(self, session: RelaySession, message: Listen) -> None:
        factory = self.factory
        cap = factory.limits.rate.listeners_per_rdv
        if cap and factory.registry.listeners_of(message.rdv) >= cap:
            session.failed(ProtocolError(ErrorCode.RATE_LIMITED, f"at most {cap} listeners per rendezvous id"))
            return
        self.send_control(encode_ready(factory.announced_limits, decline=True))
        log.info("listener ready {label}{front}", label=session.label, front=self.front_label)
        self._listener = factory.registry.listen(message.rdv, message.peer, session)

    def connect(self, session: RelaySession, message: Connect) -> None:
        self.connect_at = self.factory.reactor.seconds()
        try:
            self._connector = self.factory.registry.connect(
                message.rdv, message.peer, message.from_, message.wait, session
            )
        except ProtocolError as error:
            session.failed(error)

    def decline(self, session: RelaySession, message: Decline) -> None:
        listener = self._listener
        if listener is None:
            return
        reason = f": {message.reason}" if message.reason else ""
        if self.factory.registry.decline(
            message.session, listener, message.code, f"the listener could not accept{reason}", message.retry
        ):
            log.info("declined {label} session={session}", label=session.label, session=message.session[:8])

    def forget(self) -> None:
        registry = self.factory.registry
        if self._listener is not None:
            listener, self._listener = self._listener, None
            registry.remove_listener(listener)
            log.info("listener gone {label}", label=self.session.label)
        if self._connector is not None:
            connector, self._connector = self._connector, None
            registry.remove_connector(connector)

    def counted(self, code: ErrorCode) -> None:
        self.factory.metrics.error(code.value)
