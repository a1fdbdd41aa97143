"""
The backup relay as an ASGI application (the Vercel front), clustered through
Redis.  Relay protocol v1 (C{docs/protocol.md}) exactly as the Twisted relay
speaks it; no Twisted, no Autobahn in this module.

Vercel runs a Python function as an ASGI app; each WebSocket is pinned to the
function instance that took its upgrade, instances cannot reach each other,
and every connection ends at the function's maximum duration.  So:

 - pairing uses the shared pure core L{pluresync.relay.core.pairing.Registry}
   (one per instance, authoritative for the connectors on that instance) and
   the control-message rules of L{pluresync.relay.core.wire};
 - Redis is the only way between instances.  Signalling (a listener's
   registration, an C{incoming} offer for a listener on another instance, a
   listener gone, an C{accept} and its answer) is Redis pub/sub: small
   messages, one subscriber connection per instance.  Keys (C{P} is
   L{RelayConfig.prefix}):

     - C{P inst:ID}: instance ID is alive (TTL, heartbeat);
     - C{P lst:RDV}: hash of C{"INSTANCE PEER"}: listeners of a rendezvous;
     - C{P ses:S}: the instance owning the connector offered in session S
       (TTL: accept timeout + margin; taken once with C{GETDEL});
     - channels C{P i:ID} (messages for one instance) and C{P listeners}
       (every new listener, so waiting connectors elsewhere are offered);

 - data never uses pub/sub (it drops slow subscribers): each direction of a
   pair is a Redis list C{P d:S:ROLE} (ROLE C{c}: the connector's bytes, C{a}:
   the acceptor's), written with C{RPUSH} and read with C{BLPOP} + C{LPOP n}.
   Flow control is a credit window: a side stops reading its WebSocket while
   C{window} of its messages are unread; the reading side acknowledges what it
   delivered on C{P k:S:ROLE}.  Memory per direction is at most C{window}
   messages.  Each side of a pipe refreshes C{P a:S:ROLE} (TTL); a side whose
   partner's key is gone ends with C{peer-gone}.  Everything has a TTL.

   Both halves of a pair go through Redis even when they sit on the same
   instance (one code path; the backup relay is for small data).

 - a socket is closed with 1001 C{going away} shortly before the function's
   maximum duration (L{RelayConfig.max_duration} − L{RelayConfig.close_margin});
   its partner gets 1001 too.

Configuration comes from the environment (L{RelayConfig.from_env}).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from pluresync.relay.core.auth import Authenticator, OpenAuth, SignedTokenAuth, parse_secret_file
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.core.pairing import Connector, ConnectorState, Listener, Pairing, Registry
from pluresync.relay.core.wire import (
    SUBPROTOCOL,
    Accept,
    Connect,
    ErrorCode,
    Listen,
    ProtocolError,
    encode_error,
    encode_incoming,
    encode_paired,
    encode_ready,
    parse_control,
    short_id,
)
from pluresync.version import __version__

log = logging.getLogger("pluresync.relay.asgi.app")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001

_DATA = b"\x00"
_END = b"\x01"
_CLOSE_REASONS = {1000: "peer closed", 1001: "going away", 4010: "peer-gone"}
UNAUTHORIZED_REASON = "this relay requires a valid token"


#: Seconds after a pipe's cleanup to delete its keys once more (see Pipe._cleanup).
_LATE_CLEANUP = 1.0

#: Remote offers a listener's socket remembers (see Relay.offer_received).
_MAX_REMOTE_OFFERS = 1024


class ConfigError(ValueError):
    """The environment does not configure a usable relay."""


@dataclass(frozen=True)
class RelayConfig:
    """
    Everything the Vercel relay reads from its environment.

    @ivar redis_url: C{redis://} or C{rediss://} URL (C{PLURESYNC_REDIS_URL},
        else C{REDIS_URL}, else C{KV_URL}).
    @ivar max_duration: the function's maximum duration, seconds
        (C{PLURESYNC_MAX_DURATION}, default 300 as in C{vercel.json}).
    @ivar close_margin: how long before C{max_duration} the relay closes a
        socket with 1001 (C{PLURESYNC_CLOSE_MARGIN}, default 5).
    @ivar window: messages one side may have unread in Redis
        (C{PLURESYNC_WINDOW}, default 16).
    """

    redis_url: str
    auth: Authenticator
    limits: RelayLimits = RelayLimits()
    max_duration: float = 300.0
    close_margin: float = 5.0
    window: int = 16
    prefix: str = "pluresync:vercel:"
    heartbeat: float = 2.0
    ttl: float = 6.0
    answer_timeout: float = 5.0
    poll: float = 1.0
    data_ttl: int = 120

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RelayConfig:
        """
        Read C{PLURESYNC_*} variables (see C{deploy/vercel/README.md}).

        C{PLURESYNC_AUTH} must be given: C{open}, or C{signed} with the
        secrets (one per line, at least 32 characters) in
        C{PLURESYNC_AUTH_SECRETS}.

        @raise ConfigError: a missing or malformed setting.
        """
        env = dict(os.environ if environ is None else environ)
        url = env.get("PLURESYNC_REDIS_URL") or env.get("REDIS_URL") or env.get("KV_URL")
        if not url:
            raise ConfigError("no Redis: set PLURESYNC_REDIS_URL (redis:// or rediss://)")
        mode = env.get("PLURESYNC_AUTH", "").strip().lower()
        if mode == "open":
            auth: Authenticator = OpenAuth()
        elif mode == "signed":
            secrets = env.get("PLURESYNC_AUTH_SECRETS", "").replace("\\n", "\n").encode()
            try:
                auth = SignedTokenAuth(parse_secret_file(secrets, "PLURESYNC_AUTH_SECRETS"))
            except ValueError as error:
                raise ConfigError(str(error)) from None
        else:
            raise ConfigError(
                "choose who may use this relay: PLURESYNC_AUTH=signed with PLURESYNC_AUTH_SECRETS, "
                "or PLURESYNC_AUTH=open"
            )

        def number(name: str, default: float, minimum: float) -> float:
            text = env.get(name)
            if text is None or text == "":
                return default
            try:
                value = float(text)
            except ValueError:
                raise ConfigError(f"{name} must be a number, got {text!r}") from None
            if not value >= minimum or value == float("inf"):
                raise ConfigError(f"{name} must be a finite number >= {minimum:g}")
            return value

        limits = RelayLimits(
            max_message=int(number("PLURESYNC_MAX_MESSAGE", 262144, 135168)),
            hello_timeout=number("PLURESYNC_HELLO_TIMEOUT", 10.0, 0),
            accept_timeout=number("PLURESYNC_ACCEPT_TIMEOUT", 10.0, 0),
            max_wait=number("PLURESYNC_MAX_WAIT", 120.0, 0),
            max_pending=int(number("PLURESYNC_MAX_PENDING", 64, 1)),
            max_connections=int(number("PLURESYNC_MAX_CONNECTIONS", 10000, 0)),
        )
        return cls(
            redis_url=url,
            auth=auth,
            limits=limits,
            max_duration=number("PLURESYNC_MAX_DURATION", 300.0, 1),
            close_margin=number("PLURESYNC_CLOSE_MARGIN", 5.0, 0),
            window=int(number("PLURESYNC_WINDOW", 16, 1)),
            prefix=env.get("PLURESYNC_REDIS_PREFIX", "pluresync:vercel:"),
        )


def _announced(limits: RelayLimits) -> dict[str, Any]:
    """The C{limits} object of C{ready}/C{paired} (the same shape as the Twisted relay's)."""
    return {
        "session_bytes_per_second": None,
        "session_bytes": None,
        "session_seconds": None,
        "max_message": limits.max_message,
    }


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _RemoteListener:
    """Registry channel of a stand-in for a listener on another instance."""

    def __init__(self, relay: Relay, instance: str, rdv: str, peer: str) -> None:
        self.relay = relay
        self.instance = instance
        self.rdv = rdv
        self.peer = peer

    def incoming(self, session: str, peer: str | None) -> None:
        self.relay._spawn(self.relay._offer_remote(self, session, peer))


class Relay:
    """
    One function instance of the relay: its registry, its Redis connections,
    its sockets.  Started lazily by the first request (L{ensure_started}).
    """

    def __init__(self, config: RelayConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.instance = os.urandom(8).hex()
        self.started_at = time.monotonic()
        self.redis: Any = None
        self.redis_ok = False
        self.registry: Registry | None = None
        self.sockets: set[RelaySocket] = set()
        #: local listener sockets by (rdv, peer), round-robin order
        self.listeners: dict[tuple[str, str], list[RelaySocket]] = {}
        #: pending accept requests sent to other instances
        self.answers: dict[str, asyncio.Future[dict[str, Any]]] = {}
        #: pipes alive on this instance (for the heartbeat)
        self.pipes: set[Pipe] = set()
        self.shutting_down = False
        self._start_lock: asyncio.Lock | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._pubsub: Any = None

    # -- keys ------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return self.config.prefix + ":".join(parts)

    def channel(self, instance: str) -> str:
        return self.key("i", instance)

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
            )
            self.registry = Registry(
                loop.call_later,
                max_pending=limits.max_pending,
                accept_timeout=limits.accept_timeout,
                max_wait=limits.max_wait,
                default_wait=limits.default_wait,
            )
            ready = loop.create_future()
            self._spawn(self._subscriber(ready))
            try:
                await asyncio.wait_for(asyncio.shield(ready), 3.0)
            except Exception:
                pass
            self._spawn(self._heartbeat_loop())

    async def shutdown(self) -> None:
        """Close every socket with 1001 and forget this instance in Redis."""
        self.shutting_down = True
        await asyncio.gather(*(s.going_away() for s in list(self.sockets)), return_exceptions=True)
        if self.redis is not None:
            try:
                await asyncio.wait_for(self.redis.delete(self.key("inst", self.instance)), 2)
            except Exception:
                pass
        for task in list(self._tasks):
            task.cancel()
        if self.redis is not None:
            try:
                await self.redis.aclose()
            except Exception:
                pass

    def _spawn(self, coroutine: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("relay task failed: %r", t.exception())

        task.add_done_callback(done)
        return task

    async def _subscriber(self, ready: asyncio.Future[None]) -> None:
        backoff = 0.2
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            self._pubsub = pubsub
            try:
                await pubsub.subscribe(self.channel(self.instance), self.key("listeners"))
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
                        self._message(message["channel"].decode(), json.loads(message["data"]))
                    except Exception:
                        log.exception("cluster message handler failed")
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if self.redis_ok:
                    log.warning("Redis lost: %r", error)
                self.redis_ok = False
            finally:
                try:
                    await pubsub.aclose()
                except Exception:
                    pass
            await asyncio.sleep(backoff * (0.8 + 0.4 * random.random()))
            backoff = min(backoff * 2, 2.0)

    async def _resync(self) -> None:
        """Redis came back (maybe empty): announce our listeners, look up for our waiting connectors."""
        await self._heartbeat_once()
        for rdv, peer in list(self.listeners):
            await self._announce(rdv, peer)
        assert self.registry is not None
        for rdv in self.registry.waiting_rendezvous():
            if self.waiting_for(rdv):
                self.offer_remote(rdv, await self.look_up(rdv))

    async def _heartbeat_loop(self) -> None:
        while True:
            await self._heartbeat_once()
            await asyncio.sleep(self.config.heartbeat)

    async def _heartbeat_once(self) -> None:
        ttl = max(1, int(round(self.config.ttl)))
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.set(self.key("inst", self.instance), b"1", ex=ttl)
            for rdv, peer in self.listeners:
                pipe.hset(self.key("lst", rdv), f"{self.instance} {peer}", b"1")
                pipe.expire(self.key("lst", rdv), ttl)
            for p in self.pipes:
                pipe.set(p.alive_key, b"1", ex=ttl)
            await asyncio.wait_for(pipe.execute(), 5)
            self.redis_ok = True
        except asyncio.CancelledError:
            raise
        except Exception as error:
            if self.redis_ok:
                log.warning("Redis heartbeat failed: %r", error)
            self.redis_ok = False

    # -- health ------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        registry = self.registry
        return {
            "connections": len(self.sockets),
            "listeners": registry.listener_count if registry else 0,
            "sessions": registry.paired_count if registry else 0,
            "pending": registry.pending_count if registry else 0,
        }

    @property
    def ready(self) -> bool:
        return self.redis_ok and not self.shutting_down

    # -- cluster messages --------------------------------------------------------

    async def publish(self, channel: str, message: dict[str, Any]) -> None:
        try:
            await self.redis.publish(channel, _dumps(message))
        except Exception as error:
            log.warning("publish failed: %r", error)

    def _message(self, channel: str, message: dict[str, Any]) -> None:
        if channel == self.key("listeners"):
            instance, rdv, peer = message.get("instance"), message.get("rdv"), message.get("peer")
            if instance != self.instance and isinstance(rdv, str) and isinstance(peer, str):
                if self.waiting_for(rdv):
                    self.offer_remote(rdv, [(instance, peer)])
            return
        op = message.get("op")
        if op == "incoming":
            self._remote_incoming(message)
        elif op == "gone":
            assert self.registry is not None
            self.registry.cancel_session(
                str(message.get("session")), ErrorCode.NO_LISTENER, "the listener went away before accepting"
            )
        elif op == "accept":
            self._remote_accept(message)
        elif op == "answer":
            future = self.answers.pop(str(message.get("req")), None)
            if future is not None and not future.done():
                future.set_result(message)

    # -- listeners ---------------------------------------------------------------

    async def _announce(self, rdv: str, peer: str) -> None:
        ttl = max(1, int(round(self.config.ttl)))
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.hset(self.key("lst", rdv), f"{self.instance} {peer}", b"1")
            pipe.expire(self.key("lst", rdv), ttl)
            pipe.publish(self.key("listeners"), _dumps({"rdv": rdv, "peer": peer, "instance": self.instance}))
            await pipe.execute()
        except Exception as error:
            log.warning("listener announcement failed: %r", error)

    def add_listener(self, socket: RelaySocket, rdv: str, peer: str) -> Listener:
        assert self.registry is not None
        same = self.listeners.setdefault((rdv, peer), [])
        first = not same
        same.append(socket)
        listener = self.registry.listen(rdv, peer, socket)
        if first:
            self._spawn(self._announce(rdv, peer))
        return listener

    def remove_listener(self, socket: RelaySocket) -> None:
        assert self.registry is not None
        listener = socket.listener
        if listener is None:
            return
        self.registry.remove_listener(listener)
        same = self.listeners.get((listener.rdv, listener.peer), [])
        if socket in same:
            same.remove(socket)
            if not same:
                del self.listeners[(listener.rdv, listener.peer)]
                self._spawn(
                    self._quiet(self.redis.hdel(self.key("lst", listener.rdv), f"{self.instance} {listener.peer}"))
                )
        # Connectors of other instances offered to this listener and not yet
        # accepted: no-listener (a "gone" for an accepted one changes nothing).
        for session, owner in socket.remote_offers.items():
            self._spawn(self.publish(self.channel(owner), {"op": "gone", "session": session}))
        socket.remote_offers.clear()

    @staticmethod
    async def _quiet(awaitable: Awaitable[Any]) -> None:
        try:
            await awaitable
        except Exception:
            pass

    def _remote_incoming(self, message: dict[str, Any]) -> None:
        rdv, peer, session, owner = (message.get(k) for k in ("rdv", "peer", "session", "owner"))
        from_ = message.get("from")
        same = self.listeners.get((rdv, peer)) if isinstance(rdv, str) and isinstance(peer, str) else None
        if not same:
            self._spawn(self.publish(self.channel(str(owner)), {"op": "gone", "session": session}))
            return
        socket = same.pop(0)
        same.append(socket)
        socket.remote_offers[str(session)] = str(owner)
        # Bounded: offers are only remembered to say "gone" when the listener
        # leaves; the oldest are long accepted or expired.
        while len(socket.remote_offers) > _MAX_REMOTE_OFFERS:
            del socket.remote_offers[next(iter(socket.remote_offers))]
        socket.incoming(str(session), from_ if isinstance(from_, str) else None, record=False)

    # -- connectors --------------------------------------------------------------

    async def connect(self, message: Connect, socket: RelaySocket) -> Connector:
        assert self.registry is not None
        registry = self.registry
        if registry.has_listener(message.rdv, message.peer):
            return registry.connect(message.rdv, message.peer, message.from_, message.wait, socket)
        immediate = message.wait is not None and message.wait <= 0
        wait = self.config.answer_timeout if immediate else message.wait
        connector = registry.connect(message.rdv, message.peer, message.from_, wait, socket)
        if connector.state is ConnectorState.WAITING:
            self.offer_remote(message.rdv, await self.look_up(message.rdv))
            if immediate and connector.state is ConnectorState.WAITING:
                registry.remove_connector(connector)
                peer = connector.peer
                text = (
                    "no listener for this rendezvous"
                    if peer is None
                    else f"no listener with peer id {short_id(peer)}... for this rendezvous"
                )
                socket.failed(ProtocolError(ErrorCode.NO_LISTENER, text))
        return connector

    def waiting_for(self, rdv: str) -> list[Connector]:
        """The connectors still waiting for a listener of C{rdv} (the registry knows)."""
        assert self.registry is not None
        return self.registry.waiting_for(rdv)

    async def look_up(self, rdv: str) -> list[tuple[str, str]]:
        """Live listeners of C{rdv} on other instances, as C{(instance, peer)}."""
        try:
            fields = await self.redis.hkeys(self.key("lst", rdv))
            entries = []
            for item in fields or ():
                instance, _, peer = item.decode().partition(" ")
                if instance != self.instance and peer:
                    entries.append((instance, peer))
            if not entries:
                return []
            alive = await self.redis.mget([self.key("inst", i) for i, _ in entries])
            dead = [f"{i} {p}" for (i, p), a in zip(entries, alive, strict=True) if a is None]
            if dead:
                self._spawn(self._quiet(self.redis.hdel(self.key("lst", rdv), *dead)))
            return [entry for entry, a in zip(entries, alive, strict=True) if a is not None]
        except Exception as error:
            log.warning("listener lookup failed: %r", error)
            return []

    def offer_remote(self, rdv: str, found: list[tuple[str, str]]) -> None:
        assert self.registry is not None
        random.shuffle(found)
        for instance, peer in found:
            if not any(c.peer in (None, peer) for c in self.waiting_for(rdv)):
                continue
            stand_in = self.registry.listen(rdv, peer, _RemoteListener(self, instance, rdv, peer))
            self.registry.retire_listener(stand_in)

    async def _offer_remote(self, stand_in: _RemoteListener, session: str, peer: str | None) -> None:
        await self.record_session(session)
        await self.publish(
            self.channel(stand_in.instance),
            {
                "op": "incoming",
                "rdv": stand_in.rdv,
                "peer": stand_in.peer,
                "session": session,
                "from": peer,
                "owner": self.instance,
            },
        )

    async def record_session(self, session: str) -> None:
        ttl = max(1, int(self.config.limits.accept_timeout + 5))
        await self._quiet(self.redis.set(self.key("ses", session), self.instance.encode(), ex=ttl))

    # -- accept ------------------------------------------------------------------

    async def accept(self, session: str) -> tuple[str | None, str]:
        """
        Pair the session's connector (wherever it is) with the accepting
        socket; C{(peer for the acceptor, session)}.

        @raise ProtocolError: C{no-session}, C{peer-gone}.
        """
        assert self.registry is not None
        try:
            pairing = self.registry.accept(session)
        except ProtocolError:
            pass
        else:
            self._spawn(self._quiet(self.redis.delete(self.key("ses", session))))
            await self._paired_here(pairing)
            return pairing.connector_peer, session
        try:
            owner = await self.redis.getdel(self.key("ses", session))
        except Exception:
            owner = None
        if owner is None or owner.decode() == self.instance:
            raise ProtocolError(ErrorCode.NO_SESSION, "no such session (unknown, expired or already accepted)")
        req = os.urandom(8).hex()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.answers[req] = future
        await self.publish(
            self.channel(owner.decode()), {"op": "accept", "session": session, "req": req, "reply": self.instance}
        )
        try:
            answer = await asyncio.wait_for(future, self.config.answer_timeout)
        except TimeoutError:
            raise ProtocolError(
                ErrorCode.NO_SESSION, "no such session (unknown, expired or already accepted)"
            ) from None
        finally:
            self.answers.pop(req, None)
        if answer.get("ok"):
            peer = answer.get("peer")
            return (peer if isinstance(peer, str) else None), session
        try:
            code = ErrorCode(answer.get("code"))
        except ValueError:
            code = ErrorCode.NO_SESSION
        raise ProtocolError(code, str(answer.get("message") or code.value))

    async def _paired_here(self, pairing: Pairing) -> None:
        """The connector of C{pairing} is on this instance: tell it, start its pipe."""
        connector_socket = pairing.connector.channel
        assert isinstance(connector_socket, RelaySocket)
        await connector_socket.paired(pairing.session, "c", pairing.listener_peer, pairing.connector)

    def _remote_accept(self, message: dict[str, Any]) -> None:
        assert self.registry is not None
        session, req, reply = str(message.get("session")), message.get("req"), str(message.get("reply"))
        try:
            pairing = self.registry.accept(session)
        except ProtocolError as error:
            answer = {"op": "answer", "req": req, "ok": False, "code": error.code.value, "message": error.message}
            self._spawn(self.publish(self.channel(reply), answer))
            return
        socket = pairing.connector.channel
        if isinstance(socket, RelaySocket) and socket.closed:
            self.registry.unpair(pairing.connector)
            answer = {"op": "answer", "req": req, "ok": False, "code": "peer-gone", "message": "the connector left"}
            self._spawn(self.publish(self.channel(reply), answer))
            return

        async def pair() -> None:
            await self._paired_here(pairing)
            await self.publish(
                self.channel(reply), {"op": "answer", "req": req, "ok": True, "peer": pairing.connector_peer}
            )

        self._spawn(pair())


class Pipe:
    """
    One side of a pair: this instance's socket, and the two Redis lists of
    the session (see the module docstring).  The socket's receive loop calls
    L{from_client}; a task runs L{_deliver}.
    """

    def __init__(self, relay: Relay, socket: RelaySocket, session: str, role: str) -> None:
        other = "a" if role == "c" else "c"
        self.relay = relay
        self.socket = socket
        self.role = role
        self.out_key = relay.key("d", session, role)
        self.in_key = relay.key("d", session, other)
        self.my_acks = relay.key("k", session, role)
        self.their_acks = relay.key("k", session, other)
        self.alive_key = relay.key("a", session, role)
        self.partner_alive = relay.key("a", session, other)
        self.inflight = 0
        self.ended = False
        self.started = relay.clock()
        self.sent_bytes = 0
        self.task: asyncio.Task[Any] | None = None
        self.on_end: Callable[[], None] = lambda: None

    async def start(self) -> None:
        self.relay.pipes.add(self)
        ttl = max(1, int(round(self.relay.config.ttl)))
        await Relay._quiet(self.relay.redis.set(self.alive_key, b"1", ex=ttl))
        self.task = self.relay._spawn(self._deliver())

    # -- client → Redis ------------------------------------------------------------

    async def from_client(self, text: str | None, data: bytes | None) -> None:
        if self.ended:
            return
        if text is not None:
            await self.end(4000, "bad-request", 4010)
            return
        assert data is not None
        if len(data) > self.relay.config.limits.max_message:
            await self.end(4009, "too-large", 4010)
            return
        redis = self.relay.redis
        try:
            while self.inflight >= self.relay.config.window and not self.ended:
                got = await redis.blpop([self.my_acks], timeout=self.relay.config.poll)
                if got is not None:
                    self.inflight -= int(got[1])
                    more = await redis.lpop(self.my_acks, 64)
                    self.inflight -= sum(int(x) for x in more or ())
            if self.ended:
                return
            pipe = redis.pipeline(transaction=False)
            pipe.rpush(self.out_key, _DATA + data)
            pipe.expire(self.out_key, self.relay.config.data_ttl)
            await pipe.execute()
        except Exception as error:
            log.warning("pipe write failed: %r", error)
            await self.end(4010, "peer-gone", 4010)
            return
        self.inflight += 1
        self.sent_bytes += len(data)

    async def client_closed(self, code: int) -> None:
        """The client ended its socket: tell the partner (1000 after the data, else 4010 at once)."""
        if self.ended:
            return
        self._finish()
        if code == CLOSE_NORMAL:
            await self._push_end(CLOSE_NORMAL, front=False)
        else:
            await self._push_end(4010, front=True)
        await self._cleanup()

    async def end(self, code: int, reason: str, partner_code: int) -> None:
        """The relay ends this side (C{code}) and its partner (C{partner_code})."""
        if self.ended:
            return
        self._finish()
        await self._push_end(partner_code, front=True)
        await self.socket.close(code, reason)
        await self._cleanup()

    def _finish(self) -> None:
        self.ended = True
        self.relay.pipes.discard(self)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()
        self.on_end()

    async def _push_end(self, code: int, front: bool) -> None:
        item = _END + str(code).encode()
        try:
            pipe = self.relay.redis.pipeline(transaction=False)
            (pipe.lpush if front else pipe.rpush)(self.out_key, item)
            pipe.expire(self.out_key, self.relay.config.data_ttl)
            await pipe.execute()
        except Exception as error:
            log.warning("pipe end failed: %r", error)

    async def _cleanup(self) -> None:
        # Our out-list is the partner's to read (and delete); ours are the in-list and acks.
        keys = (self.in_key, self.my_acks, self.alive_key)
        await Relay._quiet(self.relay.redis.delete(*keys))
        # A partner ending at the same moment may still push its END or last
        # acks into our keys, re-creating them just after this delete (each
        # would then only expire with its TTL): delete once more a little later.
        self.relay._spawn(self._delete_later(keys))

    async def _delete_later(self, keys: tuple[str, ...]) -> None:
        await asyncio.sleep(_LATE_CLEANUP)
        await Relay._quiet(self.relay.redis.delete(*keys))

    # -- Redis → client ------------------------------------------------------------

    async def _deliver(self) -> None:
        relay = self.relay
        redis = relay.redis
        grace = relay.config.ttl + relay.config.heartbeat
        window = relay.config.window
        try:
            while not self.ended:
                got = await redis.blpop([self.in_key], timeout=relay.config.poll)
                if got is None:
                    if relay.clock() - self.started > grace and not await redis.exists(self.partner_alive):
                        await self.end(4010, "peer-gone", 4010)
                        return
                    continue
                items = [got[1]]
                more = await redis.lpop(self.in_key, window)
                items.extend(more or ())
                delivered = 0
                for item in items:
                    if item[:1] == _DATA:
                        if not await self.socket.send_bytes(item[1:]):
                            return  # the client is gone; the receive loop reports it
                        delivered += 1
                        continue
                    code = int(item[1:])
                    self._finish()
                    await self.socket.close(code, _CLOSE_REASONS.get(code, "peer-gone"))
                    # The partner ended first and writes nothing more: the
                    # last one out deletes every key of the session.
                    await Relay._quiet(
                        redis.delete(
                            self.in_key, self.out_key, self.my_acks, self.their_acks, self.alive_key, self.partner_alive
                        )
                    )
                    return
                if delivered:
                    pipe = redis.pipeline(transaction=False)
                    pipe.rpush(self.their_acks, str(delivered).encode())
                    pipe.expire(self.their_acks, relay.config.data_ttl)
                    await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("pipe read failed: %r", error)
            await self.end(4010, "peer-gone", 4010)


class RelaySocket:
    """
    One WebSocket: HELLO → LISTENING / CONNECTING / ACCEPTING → PAIRED.
    Its C{incoming} and C{failed} are the registry's channel methods.
    """

    def __init__(self, relay: Relay, receive: Receive, send: Send) -> None:
        self.relay = relay
        self._receive = receive
        self._send = send
        self.phase = "hello"
        self.closed = False
        self.listener: Listener | None = None
        self.connector: Connector | None = None
        self.pipe: Pipe | None = None
        #: sessions of other instances' connectors offered to this listener → owner
        self.remote_offers: dict[str, str] = {}
        self._lock = asyncio.Lock()
        self._timers: list[asyncio.TimerHandle] = []

    # -- sending -------------------------------------------------------------------

    async def send_text(self, data: bytes) -> bool:
        return await self._emit({"type": "websocket.send", "text": data.decode("utf-8")})

    async def send_bytes(self, data: bytes) -> bool:
        return await self._emit({"type": "websocket.send", "bytes": data})

    async def _emit(self, message: dict[str, Any]) -> bool:
        async with self._lock:
            if self.closed:
                return False
            try:
                await self._send(message)
                return True
            except Exception:
                self.closed = True
                return False

    async def close(self, code: int, reason: str) -> None:
        async with self._lock:
            if self.closed:
                return
            self.closed = True
            try:
                await self._send({"type": "websocket.close", "code": code, "reason": reason})
            except Exception:
                pass

    async def fail_now(self, error: ProtocolError) -> None:
        """Report C{error} (before pairing) and close with its code."""
        if self.closed:
            return
        await self.send_text(encode_error(error.code, error.message, error.retry))
        await self.close(error.code.close_code, error.code.value)
        self._forget()

    # -- registry channel ------------------------------------------------------------

    def incoming(self, session: str, peer: str | None, record: bool = True) -> None:
        async def send() -> None:
            if record:  # a local connector: its session must be findable from any instance
                await self.relay.record_session(session)
            await self.send_text(encode_incoming(session, peer))

        self.relay._spawn(send())

    def failed(self, error: ProtocolError) -> None:
        self.relay._spawn(self.fail_now(error))

    # -- life ------------------------------------------------------------------------

    async def run(self) -> None:
        relay = self.relay
        config = relay.config
        loop = asyncio.get_running_loop()
        if config.limits.hello_timeout > 0:
            self._timers.append(loop.call_later(config.limits.hello_timeout, self._hello_expired))
        deadline = max(0.5, config.max_duration - config.close_margin)
        self._timers.append(loop.call_later(deadline, lambda: relay._spawn(self.going_away())))
        try:
            while True:
                message = await self._receive()
                kind = message.get("type")
                if kind == "websocket.disconnect":
                    await self._disconnected(int(message.get("code") or 1005))
                    return
                if kind != "websocket.receive" or self.closed:
                    continue
                text, data = message.get("text"), message.get("bytes")
                if self.phase == "paired":
                    assert self.pipe is not None
                    await self.pipe.from_client(text, data)
                elif self.phase == "hello":
                    await self._hello(text, data)
                else:
                    await self.fail_now(
                        ProtocolError(
                            ErrorCode.BAD_REQUEST, "one control message per WebSocket, then nothing before pairing"
                        )
                    )
        finally:
            for timer in self._timers:
                timer.cancel()
            self._forget()

    def _hello_expired(self) -> None:
        if self.phase == "hello" and not self.closed:
            seconds = self.relay.config.limits.hello_timeout
            self.relay._spawn(
                self.fail_now(ProtocolError(ErrorCode.TIMEOUT, f"no control message within {seconds:g} s"))
            )

    async def going_away(self) -> None:
        """The function's maximum duration (or shutdown) is near: 1001, partner too."""
        if self.pipe is not None and not self.pipe.ended:
            await self.pipe.end(CLOSE_GOING_AWAY, "going away", CLOSE_GOING_AWAY)
        else:
            await self.close(CLOSE_GOING_AWAY, "going away")
        self._forget()

    async def _hello(self, text: str | None, data: bytes | None) -> None:
        limits = self.relay.config.limits
        if text is None:
            if data is not None and len(data) > limits.max_message:
                await self.fail_now(ProtocolError(ErrorCode.TOO_LARGE, "message too large"))
            else:
                await self.fail_now(ProtocolError(ErrorCode.BAD_REQUEST, "a binary message before pairing"))
            return
        try:
            message = parse_control(text.encode("utf-8"))
        except ProtocolError as error:
            await self.fail_now(error)
            return
        relay = self.relay
        try:
            if isinstance(message, Listen):
                self.phase = "listening"
                await self.send_text(encode_ready(_announced(limits)))
                self.listener = relay.add_listener(self, message.rdv, message.peer)
            elif isinstance(message, Connect):
                self.phase = "connecting"
                self.connector = await relay.connect(message, self)
            elif isinstance(message, Accept):
                self.phase = "accepting"
                peer, session = await relay.accept(message.session)
                if self.closed:
                    # Gone while the answer came: the connector gets peer-gone.
                    pipe = Pipe(relay, self, session, "a")
                    await pipe._push_end(4010, front=True)
                    return
                await self.paired(session, "a", peer, None)
        except ProtocolError as error:
            await self.fail_now(error)

    async def paired(self, session: str, role: str, peer: str | None, connector: Connector | None) -> None:
        """This socket is one end of a pair (C{role} C{c}: the connector, C{a}: the acceptor)."""
        self.phase = "paired"
        self.pipe = pipe = Pipe(self.relay, self, session, role)
        if connector is not None:
            registry = self.relay.registry
            assert registry is not None
            pipe.on_end = lambda: registry.unpair(connector)
        await self.send_text(encode_paired(peer, _announced(self.relay.config.limits)))
        await pipe.start()

    async def _disconnected(self, code: int) -> None:
        self.closed = True
        if self.pipe is not None:
            await self.pipe.client_closed(code)
        self._forget()

    def _forget(self) -> None:
        """Unregister what this socket stands for (idempotent)."""
        relay = self.relay
        if self.listener is not None:
            relay.remove_listener(self)
            self.listener = None
        if self.connector is not None and self.connector.state is not ConnectorState.PAIRED:
            assert relay.registry is not None
            relay.registry.remove_connector(self.connector)


# -- the ASGI application ---------------------------------------------------------


@dataclass
class RelayApp:
    """
    The ASGI application: C{GET /health} and the relay WebSocket (any other
    path of a WebSocket upgrade is served too: behind Vercel's rewrite the
    function may see C{/api/relay}).
    """

    config: RelayConfig | None
    error: str | None = None
    relay: Relay | None = field(default=None, init=False)

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> RelayApp:
        try:
            return cls(RelayConfig.from_env(environ))
        except ConfigError as error:
            log.error("relay not configured: %s", error)
            return cls(None, str(error))

    def __post_init__(self) -> None:
        if self.config is not None:
            self.relay = Relay(self.config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if self.relay is not None:
                    try:
                        await self.relay.ensure_started()
                    except Exception as error:
                        log.warning("start failed: %r", error)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.relay is not None:
                    await self.relay.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "/")
        if path.rstrip("/").endswith("/health") or path == "/health":
            relay = self.relay
            if relay is not None:
                try:
                    await relay.ensure_started()
                except Exception as error:
                    log.warning("start failed: %r", error)
            ready = relay is not None and relay.ready
            body: dict[str, Any] = {
                "status": "ok" if ready else "degraded",
                "version": __version__,
                "uptime": round(time.monotonic() - relay.started_at, 3) if relay else 0.0,
                "ready": ready,
                "checks": {"redis": bool(relay and relay.redis_ok), "config": relay is not None},
                **(relay.stats() if relay else {"connections": 0, "listeners": 0, "sessions": 0, "pending": 0}),
            }
            if self.error:
                body["detail"] = self.error
            query = scope.get("query_string", b"").decode("latin-1")
            probe = any(
                part.split("=", 1)[0] == "ready" and part.split("=", 1)[-1].lower() not in ("0", "false", "no")
                for part in query.split("&")
                if part
            )
            status = 503 if probe and not ready else 200
            await _respond(
                send, status, _dumps(body).encode(), [(b"cache-control", b"no-store")], scope["method"] == "HEAD"
            )
            return
        await _respond(
            send,
            426,
            _dumps({"error": "this is a pluresync relay: open a WebSocket with the subprotocol pluresync.v1"}).encode(),
            [(b"upgrade", b"websocket")],
            scope.get("method") == "HEAD",
        )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        relay = self.relay
        if relay is None:
            await _refuse(scope, send, 503, "relay not configured")
            return
        try:
            await relay.ensure_started()
        except Exception as error:
            log.warning("start failed: %r", error)
        limits = relay.config.limits
        if relay.shutting_down or not relay.redis_ok:
            await _refuse(scope, send, 503, "relay unavailable", [(b"retry-after", b"1")])
            return
        if limits.max_connections and len(relay.sockets) >= limits.max_connections:
            await _refuse(scope, send, 503, "too many connections", [(b"retry-after", b"1")])
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        result = relay.config.auth.check(headers.get("authorization"), time.time())
        if not result.ok:
            await _refuse(
                scope,
                send,
                401,
                f"{UNAUTHORIZED_REASON} ({result.reason})",
                [(b"www-authenticate", b'Bearer realm="pluresync-relay"')],
            )
            return
        if SUBPROTOCOL not in scope.get("subprotocols", ()):
            await _refuse(scope, send, 400, f"the WebSocket subprotocol {SUBPROTOCOL} is required")
            return
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
        socket = RelaySocket(relay, receive, send)
        relay.sockets.add(socket)
        try:
            await socket.run()
        finally:
            relay.sockets.discard(socket)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]], head: bool = False
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": b"" if head else body})


async def _refuse(scope: Scope, send: Send, status: int, text: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    """Refuse an upgrade with an HTTP status (ASGI's C{websocket.http.response}), else a 403."""
    if "websocket.http.response" in scope.get("extensions", {}):
        body = _dumps({"error": text}).encode()
        await send(
            {
                "type": "websocket.http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})


def create_app(environ: dict[str, str] | None = None) -> RelayApp:
    """The relay application configured from C{environ} (default: C{os.environ})."""
    return RelayApp.from_env(environ)
