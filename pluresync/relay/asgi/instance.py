"""
One Vercel function instance of the relay: its registry, its Redis
connection and pub/sub subscriber, its sockets.

Vercel pins each WebSocket to the instance that took its upgrade, and
instances cannot reach each other: Redis is the only way between them.  The
keys, messages and rules of that signalling are the cluster protocol every
relay front shares (L{pluresync.relay.cluster.protocol}); this module does
its I/O with C{redis.asyncio}: one subscriber connection per instance, a
heartbeat, the look-ups, and the two messages only this front uses
(C{accept} and its C{answer}: the acceptor's instance asks the connector's
owner to pair it, since no link between instances is possible).  The bytes
of a pair go through Redis lists (L{pluresync.relay.asgi.pipe}).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pluresync.relay.cluster.protocol import (
    AcceptAnswer,
    AcceptRequest,
    ClusterKeys,
    ClusterNode,
    Command,
    Offer,
    PendingLookUp,
    encode,
    look_up,
    new_instance_id,
    run_steps,
    text,
)
from pluresync.relay.core.pairing import Connector, Pairing, Registry
from pluresync.relay.core.session import Phase
from pluresync.relay.core.wire import Connect, ErrorCode, ProtocolError

from .config import RelayConfig
from .tasks import Tasks, quiet

if TYPE_CHECKING:
    from .connection import RelaySocket
    from .pipe import Pipe

log = logging.getLogger("pluresync.relay.asgi")

#: What C{P inst:ID} holds for an ASGI instance (nothing to reach it at).
_ALIVE = "1"


class RelayInstance:
    """
    One function instance of the relay (see the module docstring).  Started
    lazily by the first request (L{ensure_started}).
    """

    def __init__(self, config: RelayConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.instance = new_instance_id()
        self.keys = ClusterKeys(config.prefix)
        self.started_at = time.monotonic()
        self.redis: Any = None
        self.redis_ok = False
        self.registry: Registry | None = None
        self.node: ClusterNode[RelaySocket] | None = None
        self.sockets: set[RelaySocket] = set()
        #: pending accept requests sent to other instances
        self.answers: dict[str, asyncio.Future[AcceptAnswer]] = {}
        #: pipes alive on this instance (for the heartbeat)
        self.pipes: set[Pipe] = set()
        #: pipes' END pushes under way (shutdown waits for them)
        self.ending: set[asyncio.Task[Any]] = set()
        self.shutting_down = False
        self.tasks = Tasks()
        self._start_lock: asyncio.Lock | None = None

    @property
    def ttl(self) -> int:
        return max(1, int(round(self.config.ttl)))

    def spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        return self.tasks.spawn(coroutine)

    # -- life cycle ------------------------------------------------------------

    async def ensure_started(self) -> None:
        if self.registry is not None:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self.registry is not None:
                return
            import redis.asyncio as aioredis  # imported here: /health of a misconfigured relay still answers

            loop = asyncio.get_running_loop()
            limits = self.config.limits
            self.redis = aioredis.from_url(
                self.config.redis_url,
                decode_responses=False,
                socket_connect_timeout=2,
                socket_keepalive=True,
                health_check_interval=30,
                # Every pipe end holds a connection in BLPOP (up to `poll` s,
                # also a little after its pair ended): redis-py's default pool
                # (100 in redis-py 8) fails commands beyond that at once.
                max_connections=self.config.redis_max_connections,
            )
            registry = Registry(
                loop.call_later,
                max_pending=limits.max_pending,
                accept_timeout=limits.accept_timeout,
                max_wait=limits.max_wait,
                default_wait=limits.default_wait,
            )
            self.node = ClusterNode(
                self.instance,
                self.keys,
                registry,
                publish=lambda channel, message: self.spawn(self.publish(channel, message)),
                offer=lambda message, instance: self.spawn(self._send_offer(message, instance)),
                deliver=self._deliver_offer,
            )
            self.registry = registry
            ready = loop.create_future()
            self.spawn(self._subscriber(ready))
            try:
                await asyncio.wait_for(asyncio.shield(ready), 3.0)
            except Exception:
                pass
            self.spawn(self._heartbeat_loop())

    async def shutdown(self) -> None:
        """Close every socket with 1001 and forget this instance in Redis."""
        self.shutting_down = True
        # Listeners last: one that went first would fail its offered
        # connectors with no-listener before their own 1001.
        sockets = sorted(self.sockets, key=lambda socket: socket.session.phase is Phase.LISTENING)
        for socket in sockets:
            socket.session.go_away()
        await asyncio.gather(*(s.flush() for s in sockets), return_exceptions=True)
        # The partners' END items (1001), before the tasks are cancelled.
        ending = [task for task in self.ending if not task.done()]
        if ending:
            await quiet(asyncio.wait_for(asyncio.gather(*ending, return_exceptions=True), 2))
        if self.redis is not None:
            await quiet(asyncio.wait_for(self.redis.delete(self.keys.instance(self.instance)), 2))
        self.tasks.cancel_all()
        if self.redis is not None:
            await quiet(self.redis.aclose())

    async def execute(self, commands: list[Command]) -> list[Any]:
        """Send C{commands} pipelined (one round trip); their replies."""
        pipe = self.redis.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute()

    async def _subscriber(self, ready: asyncio.Future[None]) -> None:
        backoff = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(*self.keys.subscriptions(self.instance))
                self.redis_ok = True
                backoff = 0.2
                if not ready.done():
                    ready.set_result(None)
                else:
                    await self._resync()
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        self._message(message["data"])
                    except Exception:
                        log.exception("cluster message handler failed")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.redis_ok:
                    log.warning("Redis lost: %r", error)
                self.redis_ok = False
            finally:
                await quiet(pubsub.aclose())
            await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))
            backoff = min(backoff * 2, 2.0)

    async def _resync(self) -> None:
        """Redis came back (maybe empty): announce our listeners, look up for our waiting connectors."""
        assert self.node is not None
        await self._heartbeat_once()
        for rdv, peer in self.node.listeners:
            await self._announce(rdv, peer)
        for rdv in self.node.waiting_rendezvous():
            self.node.offer_remote(rdv, await self.look_up(rdv))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat_once()
            await asyncio.sleep(self.config.heartbeat)

    async def _heartbeat_once(self) -> None:
        assert self.node is not None
        commands = self.node.heartbeat(self.ttl, _ALIVE)
        commands += [("SET", p.alive_key, "1", "EX", self.ttl) for p in self.pipes]
        try:
            await asyncio.wait_for(self.execute(commands), 5)
            self.redis_ok = True
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if self.redis_ok:
                log.warning("Redis heartbeat failed: %r", error)
            self.redis_ok = False

    # -- health ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        counts = self.registry.counts() if self.registry else {"listeners": 0, "sessions": 0, "pending": 0}
        return {"connections": len(self.sockets), **counts}

    @property
    def ready(self) -> bool:
        return self.redis_ok and not self.shutting_down

    # -- cluster messages --------------------------------------------------------

    async def publish(self, channel: str, message: str) -> None:
        try:
            await self.redis.publish(channel, message)
        except Exception as error:
            log.warning("publish failed: %r", error)

    def _message(self, data: bytes) -> None:
        assert self.node is not None
        message = self.node.received(data)
        if isinstance(message, AcceptRequest):
            self._remote_accept(message)
        elif isinstance(message, AcceptAnswer):
            future = self.answers.pop(message.req, None)
            if future is not None and not future.done():
                future.set_result(message)

    # -- listeners ---------------------------------------------------------------

    async def _announce(self, rdv: str, peer: str) -> None:
        assert self.node is not None
        try:
            await self.execute(self.node.announcement(rdv, peer, self.ttl))
        except Exception as error:
            log.warning("listener announcement failed: %r", error)

    def add_listener(self, socket: RelaySocket, rdv: str, peer: str) -> Any:
        """Register C{socket} as a listener (its offers are recorded first: see L{LocalOffers})."""
        assert self.node is not None and self.registry is not None
        if self.node.listener_added(rdv, peer, socket):
            self.spawn(self._announce(rdv, peer))
        return self.registry.listen(rdv, peer, LocalOffers(self, socket))

    def remove_listener(self, socket: RelaySocket, listener: Any) -> None:
        assert self.node is not None and self.registry is not None
        self.registry.remove_listener(listener)
        if self.node.listener_removed(listener.rdv, listener.peer, socket):
            self.spawn(quiet(self.redis.execute_command(*self.node.withdrawal(listener.rdv, listener.peer))))

    def _deliver_offer(self, socket: RelaySocket, offer: Offer) -> None:
        socket.session.incoming(offer.session, offer.from_)

    # -- connectors --------------------------------------------------------------

    def connect(self, message: Connect, channel: Any) -> Connector:
        """
        Register a connector (C{channel}: its session); look it up in Redis
        when no listener is here.

        @raise ProtocolError: as L{Registry.connect}.
        """
        assert self.node is not None
        connector, pending = self.node.connect(
            message.rdv,
            message.peer,
            message.from_,
            message.wait,
            channel,
            clustered=True,
            lookup_timeout=self.config.answer_timeout,
        )
        if pending is not None:
            self.spawn(self._look_up_for(pending))
        return connector

    async def _look_up_for(self, pending: PendingLookUp) -> None:
        assert self.node is not None
        self.node.looked_up(pending, await self.look_up(pending.rdv))

    async def look_up(self, rdv: str) -> list[tuple[str, str]]:
        """Live listeners of C{rdv} on other instances, as C{(instance, peer)}."""
        try:
            return await run_steps(look_up(self.keys, rdv, self.instance), self.redis.execute_command)
        except Exception as error:
            log.warning("listener lookup failed: %r", error)
            return []

    async def _send_offer(self, message: Offer, instance: str) -> None:
        assert self.node is not None
        ttl = max(1, int(self.config.limits.accept_timeout + 5))
        await quiet(self.execute(self.node.offer_commands(message, instance, self.instance, ttl)))

    async def record_session(self, session: str) -> None:
        """Make C{session} (offered to a listener here) findable from any instance."""
        ttl = max(1, int(self.config.limits.accept_timeout + 5))
        await quiet(self.redis.set(self.keys.session(session), self.instance.encode(), ex=ttl))

    # -- accept ------------------------------------------------------------------

    async def accept(self, session: str) -> str | None:
        """
        Pair the session's connector (wherever it is) with the accepting
        socket; the peer id the acceptor is told.

        @raise ProtocolError: C{no-session}, C{peer-gone}.
        """
        assert self.registry is not None
        no_session = ProtocolError(ErrorCode.NO_SESSION, "no such session (unknown, expired or already accepted)")
        try:
            pairing = self.registry.accept(session)
        except ProtocolError:
            pass
        else:
            self.spawn(quiet(self.redis.delete(self.keys.session(session))))
            self._paired_here(pairing)
            return pairing.connector_peer
        try:
            owner = await self.redis.getdel(self.keys.session(session))
        except Exception:
            owner = None
        if owner is None or text(owner) == self.instance:
            raise no_session
        req = new_instance_id()
        future: asyncio.Future[AcceptAnswer] = asyncio.get_running_loop().create_future()
        self.answers[req] = future
        await self.publish(self.keys.channel(text(owner)), encode(AcceptRequest(session, req, self.instance)))
        try:
            answer = await asyncio.wait_for(future, self.config.answer_timeout)
        except TimeoutError:
            raise no_session from None
        finally:
            self.answers.pop(req, None)
        if answer.error is not None:
            raise ProtocolError(answer.error, answer.message or answer.error.value)
        return answer.peer

    def _paired_here(self, pairing: Pairing) -> None:
        """The connector of C{pairing} is on this instance: tell it, start its pipe."""
        pairing.connector.channel.front.paired_as_connector(pairing)

    def _remote_accept(self, message: AcceptRequest) -> None:
        assert self.registry is not None
        reply = self.keys.channel(message.reply)
        try:
            pairing = self.registry.accept(message.session)
        except ProtocolError as error:
            answer = AcceptAnswer(message.req, error=error.code, message=error.message)
        else:
            if pairing.connector.channel.phase is not Phase.CONNECTING:
                self.registry.unpair(pairing.connector)
                answer = AcceptAnswer(message.req, error=ErrorCode.PEER_GONE, message="the connector left")
            else:
                self._paired_here(pairing)
                answer = AcceptAnswer(message.req, peer=pairing.connector_peer)
        self.spawn(self.publish(reply, encode(answer)))


class LocalOffers:
    """
    The registry channel of a listener socket of this instance: a local
    connector's session is recorded in Redis before the listener hears of
    it, so its C{accept} may land on any instance.
    """

    def __init__(self, instance: RelayInstance, socket: RelaySocket) -> None:
        self.instance = instance
        self.socket = socket

    def incoming(self, session: str, peer: str | None) -> None:
        async def offer() -> None:
            await self.instance.record_session(session)
            self.socket.session.incoming(session, peer)

        self.instance.spawn(offer())
