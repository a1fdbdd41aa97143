"""
One relay WebSocket of the Vercel function: the ASGI adapter of its
L{pluresync.relay.core.session.RelaySession}.

What a socket may do, what answers a wrong message, how it ends and with
which close code, the hello timer and the log labels are the session's
rules, shared with the Twisted relay (L{pluresync.relay.server.websocket}).
This module feeds the session what the ASGI server reports (C{opened},
C{control}, C{client_closed}, C{go_away}) and does what it asks
(L{pluresync.relay.core.session.SessionFront}): send and close through ASGI
messages, register with the instance.  Once paired, binary messages go to
the socket's L{pluresync.relay.asgi.pipe.Pipe}, never through the session.

What this front does differently: the bytes of a pair go through Redis
lists, and every socket is closed with 1001 C{going away} shortly before the
function's maximum duration.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pluresync.relay.core.pairing import Connector, ConnectorState, Listener, Pairing
from pluresync.relay.core.session import Phase, RelaySession
from pluresync.relay.core.wire import CLOSE_NORMAL, Accept, Connect, ErrorCode, Listen, ProtocolError, encode_ready

from .pipe import Pipe, abandon

if TYPE_CHECKING:
    from .instance import RelayInstance

log = logging.getLogger("pluresync.relay.asgi")

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

#: The close code an ASGI server reports when the client sent none.
_NO_STATUS = 1005


class RelaySocket:
    """One WebSocket: the L{SessionFront} of its session (see the module docstring)."""

    def __init__(self, instance: RelayInstance, receive: Receive, send: Send, tenant: str | None = None) -> None:
        self.instance = instance
        self.tenant = tenant
        self._receive = receive
        self._send = send
        self.closed = False
        self.listener: Listener | None = None
        self.connector: Connector | None = None
        self.pipe: Pipe | None = None
        #: the last ASGI write; each write waits for the one before (order)
        self._last_write: asyncio.Future[bool] | None = None
        limits = instance.config.limits
        self.session = RelaySession(
            self,
            asyncio.get_running_loop().call_later,
            hello_timeout=limits.hello_timeout,
            announced_limits=instance.config.announced_limits,
            log=log.info,
        )

    # -- ordered ASGI writes --------------------------------------------------------

    def _write(self, message: dict[str, Any], closing: bool = False) -> asyncio.Future[bool]:
        before = self._last_write

        async def write() -> bool:
            if before is not None:
                await asyncio.wait([before])
            if self.closed:
                return False
            if closing:
                self.closed = True
            try:
                await self._send(message)
                return True
            except Exception:
                self.closed = True
                return False

        self._last_write = task = self.instance.spawn(write())
        return task

    async def send_data(self, data: bytes) -> bool:
        """Send one binary message of the partner; whether the socket took it."""
        return await self._write({"type": "websocket.send", "bytes": data})

    async def flush(self) -> None:
        """Wait until everything written so far is sent."""
        if self._last_write is not None:
            await asyncio.wait([self._last_write])

    # -- the session's front (pluresync.relay.core.session.SessionFront) ------------

    def send_control(self, message: bytes) -> None:
        self._write({"type": "websocket.send", "text": message.decode("utf-8")})

    def close(self, code: int, reason: str) -> None:
        self._write({"type": "websocket.close", "code": code, "reason": reason}, closing=True)

    def listen(self, session: RelaySession, message: Listen) -> None:
        self.send_control(encode_ready(self.instance.config.announced_limits))
        self.listener = self.instance.add_listener(self, message.rdv, message.peer)

    def connect(self, session: RelaySession, message: Connect) -> None:
        try:
            self.connector = self.instance.connect(message, session)
        except ProtocolError as error:
            session.failed(error)

    def decline(self, session: RelaySession, message: Any) -> None:
        # This front does not announce decline in its ready (its connectors
        # wait in other function instances): the connector's accept timeout
        # tells it instead.
        return None

    def accept(self, session: RelaySession, message: Accept) -> None:
        self.instance.spawn(self._accept(session, message.session))

    async def _accept(self, session: RelaySession, session_id: str) -> None:
        try:
            peer = await self.instance.accept(session_id)
        except ProtocolError as error:
            session.failed(error)
            return
        except Exception as error:
            log.warning("accept failed: %r", error)
            session.failed(ProtocolError(ErrorCode.PEER_GONE, "internal error"))
            return
        if session.phase is not Phase.CONNECTING:
            # Gone while the answer came: the connector gets peer-gone.
            await abandon(self.instance, session_id, "a")
            return
        self._pair(session_id, "a", peer)

    def paired_as_connector(self, pairing: Pairing) -> None:
        """This socket's connector was accepted (here or from another instance)."""
        self._pair(pairing.session, "c", pairing.listener_peer)

    def _pair(self, session_id: str, role: str, peer: str | None) -> None:
        pipe = Pipe(self.instance, self, session_id, role)
        self.session.paired(pipe, peer, session_id)
        if self.session.phase is not Phase.PAIRED:
            # The socket ended meanwhile: no pipe that nobody reads; the partner gets peer-gone.
            self.instance.spawn(abandon(self.instance, session_id, role))
            return
        self.pipe = pipe
        pipe.start()

    def unpaired(self, how: str) -> None:
        if self.connector is not None:
            registry = self.instance.registry
            assert registry is not None
            registry.unpair(self.connector)
        log.info("pair ended %s: %s", self.session.label, how)

    def forget(self) -> None:
        if self.listener is not None:
            listener, self.listener = self.listener, None
            self.instance.remove_listener(self, listener)
        if self.connector is not None and self.connector.state is not ConnectorState.PAIRED:
            registry = self.instance.registry
            assert registry is not None
            registry.remove_connector(self.connector)

    def counted(self, code: ErrorCode) -> None:
        """No metrics on this front (the function has no C{/metrics})."""

    # -- life ------------------------------------------------------------------------

    async def run(self) -> None:
        """Feed the session until the client's socket ends."""
        config = self.instance.config
        session = self.session
        max_message = config.limits.max_message
        # The cap announced as session_seconds, counted from here (just after the upgrade).
        going_away = asyncio.get_running_loop().call_later(config.socket_seconds, session.go_away)
        session.opened(self.tenant)
        try:
            while True:
                message = await self._receive()
                kind = message.get("type")
                if kind == "websocket.disconnect":
                    session.client_closed(int(message.get("code") or _NO_STATUS) == CLOSE_NORMAL)
                    return
                if kind != "websocket.receive":
                    continue
                text, data = message.get("text"), message.get("bytes")
                payload = data if text is None else text.encode("utf-8")
                if payload is None:
                    continue
                if len(payload) > max_message:
                    session.failed(ProtocolError(ErrorCode.TOO_LARGE, f"messages are at most {max_message} bytes"))
                elif text is None and self.pipe is not None and session.phase is Phase.PAIRED:
                    await self.pipe.from_client(payload)
                else:
                    session.control(payload, text is None)
        finally:
            going_away.cancel()
            # Whatever stopped the loop, the socket is done (nothing if it already was).
            session.client_closed(False)
