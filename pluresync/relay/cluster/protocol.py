"""
The cluster protocol through Redis, shared by both relay fronts: key names,
pub/sub messages and the rules of one instance's side, without any I/O.

Several relay instances behave as one through Redis.  Each keeps its own
L{pluresync.relay.core.pairing.Registry}, authoritative for the peers
connected to it; Redis only tells instances about each other.  Keys (C{P} is
the prefix, L{ClusterKeys}):

 - C{P inst:ID}: instance ID is alive (TTL, refreshed by its heartbeat);
   its value is what the front needs to reach it (the Twisted relay: its
   cluster link address);
 - C{P lst:RDV}: hash of C{"INSTANCE PEER"} fields: the listeners of a
   rendezvous on each instance (refreshed with the heartbeat; fields of dead
   instances are deleted by whoever reads them);
 - C{P ses:S}: the instance owning the connector offered in session S (TTL:
   the accept timeout + a margin);
 - channel C{P i:ID}: messages for one instance; channel C{P listeners}:
   every new listener, so instances with connectors waiting for that
   rendezvous offer them at once.

Messages are JSON objects with an C{"op"} (L{encode}, L{parse}).  L{parse}
validates every field and answers C{None} for anything malformed: a message
from Redis is never trusted to be well-formed, and a bad one is ignored.

The rules (L{ClusterNode}): a connector with no local listener is looked up
in Redis (L{look_up}: C{HKEYS} then C{MGET} of the instances, dead fields
deleted); each live listener found elsewhere is represented in the local
registry by a stand-in (L{RemoteListener}: registered, offered the waiting
connectors, retired at once) whose offer the front publishes to the
listener's instance; a connector that will not wait waits for the look-up
only, then gets C{no-listener}; an offer for a listener that left is
answered with C{gone}.

The two fronts carry a pair's bytes differently: the Twisted relay
(L{pluresync.relay.cluster.service}) opens a TCP cluster link from the
acceptor's instance to the connector's, the Vercel function
(L{pluresync.relay.asgi}) cannot reach other instances and moves bytes
through Redis lists (its C{accept}/C{answer} messages).  B{A Twisted
instance and an ASGI instance cannot share one key prefix}: they would find
each other's listeners and offer each other connectors whose bytes neither
could carry.  Their default prefixes differ (C{pluresync:DB:} and
C{pluresync:vercel:}), so both may use one Redis server side by side, as two
separate clusters that never pair with each other.

Pure Python: no Twisted, no asyncio.  Redis commands are tuples the front
sends with its own client (L{run_steps} drives a sequence of them with any
awaitable C{execute}).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pluresync.relay.core.pairing import Connector, ConnectorState, Registry, no_listener_message
from pluresync.relay.core.wire import ErrorCode, ProtocolError

Command = tuple[Any, ...]
T = TypeVar("T")
Item = TypeVar("Item")

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_SESSION = re.compile(r"[0-9a-f]{32}\Z")
_ID = re.compile(r"[0-9a-f]{16}\Z")


def new_instance_id() -> str:
    """A fresh instance (or request) id: 16 hex characters."""
    return os.urandom(8).hex()


class ClusterKeys:
    """The Redis key and channel names under one prefix (see the module docstring)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def key(self, *parts: str) -> str:
        """C{prefix + "a:b:c"}: every name of the cluster has this shape."""
        return self.prefix + ":".join(parts)

    def instance(self, instance: str) -> str:
        return self.key("inst", instance)

    def listeners(self, rdv: str) -> str:
        return self.key("lst", rdv)

    def session(self, session: str) -> str:
        return self.key("ses", session)

    def channel(self, instance: str) -> str:
        return self.key("i", instance)

    @property
    def announcements(self) -> str:
        return self.key("listeners")

    def subscriptions(self, instance: str) -> list[str]:
        """The channels instance C{instance} subscribes to."""
        return [self.channel(instance), self.announcements]


def listener_field(instance: str, peer: str) -> str:
    """The field of a listener in C{P lst:RDV}."""
    return f"{instance} {peer}"


def text(value: Any) -> str:
    """A Redis reply as text (redis-py answers bytes, txredisapi str)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- messages ----------------------------------------------------------------


@dataclass(frozen=True)
class ListenerAnnounced:
    """A listener of C{rdv} with peer id C{peer} registered on C{instance} (channel C{P listeners})."""

    instance: str
    rdv: str
    peer: str


@dataclass(frozen=True)
class Offer:
    """
    Connector C{from_} of instance C{owner} is offered, in C{session}, to the
    listener C{(rdv, peer)} of the receiving instance.
    """

    rdv: str
    peer: str
    session: str
    from_: str | None
    owner: str


@dataclass(frozen=True)
class Gone:
    """The listener offered C{session} is gone: the connector gets C{no-listener}."""

    session: str


@dataclass(frozen=True)
class AcceptRequest:
    """(ASGI) Pair the connector of C{session}; answer to instance C{reply} quoting C{req}."""

    session: str
    req: str
    reply: str


@dataclass(frozen=True)
class AcceptAnswer:
    """(ASGI) The answer to request C{req}: paired (C{error} None, C{peer}), or refused."""

    req: str
    peer: str | None = None
    error: ErrorCode | None = None
    message: str = ""


ClusterMessage = ListenerAnnounced | Offer | Gone | AcceptRequest | AcceptAnswer


def encode(message: ClusterMessage) -> str:
    """The JSON text of C{message}."""
    if isinstance(message, ListenerAnnounced):
        body: dict[str, Any] = {
            "op": "listener",
            "instance": message.instance,
            "rdv": message.rdv,
            "peer": message.peer,
        }
    elif isinstance(message, Offer):
        body = {
            "op": "incoming",
            "rdv": message.rdv,
            "peer": message.peer,
            "session": message.session,
            "from": message.from_,
            "owner": message.owner,
        }
    elif isinstance(message, Gone):
        body = {"op": "gone", "session": message.session}
    elif isinstance(message, AcceptRequest):
        body = {"op": "accept", "session": message.session, "req": message.req, "reply": message.reply}
    elif message.error is None:
        body = {"op": "answer", "req": message.req, "ok": True, "peer": message.peer}
    else:
        body = {
            "op": "answer",
            "req": message.req,
            "ok": False,
            "code": message.error.value,
            "message": message.message,
        }
    return json.dumps(body, separators=(",", ":"))


def _field(body: dict[str, Any], name: str, pattern: re.Pattern[str], optional: bool = False) -> Any:
    value = body.get(name)
    if value is None and optional:
        return None
    if not isinstance(value, str) or not pattern.match(value):
        raise ValueError(name)
    return value


def parse(data: str | bytes) -> ClusterMessage | None:
    """The message in C{data}, or C{None} when it is malformed in any way."""
    try:
        body = json.loads(data)
        if not isinstance(body, dict):
            return None
        op = body.get("op")
        if op == "listener":
            return ListenerAnnounced(
                _field(body, "instance", _ID), _field(body, "rdv", _HEX64), _field(body, "peer", _HEX64)
            )
        if op == "incoming":
            return Offer(
                _field(body, "rdv", _HEX64),
                _field(body, "peer", _HEX64),
                _field(body, "session", _SESSION),
                _field(body, "from", _HEX64, optional=True),
                _field(body, "owner", _ID),
            )
        if op == "gone":
            return Gone(_field(body, "session", _SESSION))
        if op == "accept":
            return AcceptRequest(
                _field(body, "session", _SESSION), _field(body, "req", _ID), _field(body, "reply", _ID)
            )
        if op == "answer":
            req = _field(body, "req", _ID)
            if body.get("ok") is True:
                return AcceptAnswer(req, peer=_field(body, "peer", _HEX64, optional=True))
            message = body.get("message")
            try:
                error = ErrorCode(body.get("code"))
            except ValueError:
                # A refusal whose code we do not know is still a refusal: answer at once.
                error = ErrorCode.NO_SESSION
            return AcceptAnswer(req, error=error, message=str(message or ""))
    except (ValueError, TypeError, RecursionError):
        return None
    return None


# -- rules ---------------------------------------------------------------------


def look_up(
    keys: ClusterKeys, rdv: str, own: str, skip: Callable[[str], bool] = lambda instance: False
) -> Generator[Command, Any, list[tuple[str, str]]]:
    """
    The steps of looking up the live listeners of C{rdv} on other instances
    (not C{own}, nor those C{skip} names): C{(instance, peer)} pairs.  Fields
    of instances whose C{inst} key expired are deleted on the way.
    """
    fields = yield ("HKEYS", keys.listeners(rdv))
    entries = []
    for field in fields or ():
        instance, _, peer = text(field).partition(" ")
        if instance != own and peer and not skip(instance):
            entries.append((instance, peer))
    if not entries:
        return []
    instances = sorted({instance for instance, _ in entries})
    alive = yield ("MGET", *[keys.instance(i) for i in instances])
    dead = {i for i, value in zip(instances, alive or [None] * len(instances), strict=True) if value is None}
    if dead:
        yield ("HDEL", keys.listeners(rdv), *[listener_field(i, p) for i, p in entries if i in dead])
    return [(i, p) for i, p in entries if i not in dead]


async def run_steps(steps: Generator[Command, Any, T], execute: Callable[..., Awaitable[Any]]) -> T:
    """Drive C{steps}: each command goes to C{execute(*command)}, its reply back in."""
    reply = None
    while True:
        try:
            command = steps.send(reply)
        except StopIteration as done:
            return done.value
        reply = await execute(*command)


#: Offers from other instances one listener remembers (to offer again, or
#: answer C{gone}, when it leaves).
MAX_REMOTE_OFFERS = 1024


class RemoteListener:
    """The registry channel of a stand-in for a listener on another instance."""

    def __init__(self, instance: str, rdv: str, peer: str, offer: Callable[[Offer, str], None]) -> None:
        self.instance = instance
        self.rdv = rdv
        self.peer = peer
        self._offer = offer

    def incoming(self, session: str, peer: str | None) -> None:
        # The offer is published by the front (owner filled in by the node).
        self._offer(Offer(self.rdv, self.peer, session, peer, ""), self.instance)


class LocalListeners(Generic[Item]):
    """This instance's listeners by rendezvous and peer id, in round-robin order."""

    def __init__(self) -> None:
        self._by: dict[tuple[str, str], list[Item]] = {}

    def add(self, rdv: str, peer: str, item: Item) -> bool:
        """Record C{item}; whether it is the first of C{(rdv, peer)} (then announce it)."""
        same = self._by.setdefault((rdv, peer), [])
        same.append(item)
        return len(same) == 1

    def remove(self, rdv: str, peer: str, item: Item) -> bool:
        """Forget C{item}; whether it was the last of C{(rdv, peer)} (then delete its field)."""
        same = self._by.get((rdv, peer), [])
        if item not in same:
            return False
        same.remove(item)
        if same:
            return False
        del self._by[(rdv, peer)]
        return True

    def pick(self, rdv: str, peer: str) -> Item | None:
        """The next listener of C{(rdv, peer)} (round-robin), or C{None}."""
        same = self._by.get((rdv, peer))
        if not same:
            return None
        same.append(same.pop(0))
        return same[-1]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(list(self._by))


@dataclass(eq=False)
class PendingLookUp:
    """A connector registered while its rendezvous is looked up in Redis."""

    connector: Connector
    rdv: str
    #: the connector will not wait: C{no-listener} unless the look-up finds one
    immediate: bool


class ClusterNode(Generic[Item]):
    """
    One instance's side of the cluster protocol, over its local registry.

    The front does the I/O: it runs L{look_up} for each L{PendingLookUp},
    executes the commands these methods return, publishes what C{publish}
    is given, and hands every pub/sub message to L{received}.

    @param publish: C{publish(channel, text)}, fire and forget.
    @param offer: a waiting connector is offered to a listener of instance
        C{instance}: C{offer(message, instance)} records the session's owner
        and publishes C{message}.
    @param deliver: an offer reached local listener C{item}.
    @param seen: instance C{instance} announced a listener (so it is alive).
    """

    def __init__(
        self,
        instance: str,
        keys: ClusterKeys,
        registry: Registry,
        *,
        publish: Callable[[str, str], None],
        offer: Callable[[Offer, str], None],
        deliver: Callable[[Item, Offer], None],
        seen: Callable[[str], object] = lambda instance: None,
        shuffle: Callable[[list[Any]], None] = random.shuffle,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.instance = instance
        self.keys = keys
        self.registry = registry
        self.listeners: LocalListeners[Item] = LocalListeners()
        self._publish = publish
        self._offer = offer
        self._deliver = deliver
        self._seen = seen
        self._shuffle = shuffle
        self._clock = clock
        #: per local listener, the offers of other instances it got: session -> (offer, when)
        self._remote_offers: dict[Item, dict[str, tuple[Offer, float]]] = {}

    # -- what goes to Redis ------------------------------------------------------

    def heartbeat(self, ttl: int, value: str) -> list[Command]:
        """The commands that keep this instance (value C{value}) and its listeners alive for C{ttl} s."""
        commands: list[Command] = [("SET", self.keys.instance(self.instance), value, "EX", ttl)]
        for rdv, peer in self.listeners:
            commands += self._registration(rdv, peer, ttl)
        return commands

    def _registration(self, rdv: str, peer: str, ttl: int) -> list[Command]:
        key = self.keys.listeners(rdv)
        return [("HSET", key, listener_field(self.instance, peer), "1"), ("EXPIRE", key, ttl)]

    def announcement(self, rdv: str, peer: str, ttl: int) -> list[Command]:
        """Register listener C{(rdv, peer)} in Redis and tell every instance."""
        message = encode(ListenerAnnounced(self.instance, rdv, peer))
        return [*self._registration(rdv, peer, ttl), ("PUBLISH", self.keys.announcements, message)]

    def withdrawal(self, rdv: str, peer: str) -> Command:
        """Unregister listener C{(rdv, peer)} in Redis."""
        return ("HDEL", self.keys.listeners(rdv), listener_field(self.instance, peer))

    def offer_commands(self, message: Offer, instance: str, owner_value: str, ttl: int) -> list[Command]:
        """Record the owner of C{message.session} (value C{owner_value}), then publish the offer."""
        message = Offer(message.rdv, message.peer, message.session, message.from_, self.instance)
        return [
            ("SET", self.keys.session(message.session), owner_value, "EX", ttl),
            ("PUBLISH", self.keys.channel(instance), encode(message)),
        ]

    # -- listeners -----------------------------------------------------------------

    def listener_added(self, rdv: str, peer: str, item: Item) -> bool:
        """A local listener registered; whether to announce it (the first of its kind)."""
        return self.listeners.add(rdv, peer, item)

    def listener_removed(self, rdv: str, peer: str, item: Item) -> bool:
        """
        A local listener left; whether to withdraw it from Redis (the last of
        its kind).  The offers it got from other instances within the accept
        timeout go, in the same session, to another local listener of its
        kind if there is one, as the registry does for local connectors (a
        listener renewing its registration has its next one registered
        before it closes the first; an accept already on its way from the
        one that left still pairs).  Otherwise their owners are told
        C{gone}, so their connectors get C{no-listener} at once instead of
        waiting for the accept timeout (for an offer already accepted a
        C{gone} changes nothing).
        """
        offers = self._remote_offers.pop(item, {})
        last = self.listeners.remove(rdv, peer, item)
        recent = self._clock() - self.registry.accept_timeout
        for session, (offer, when) in offers.items():
            other = None if last or when < recent else self.listeners.pick(rdv, peer)
            if other is None:
                self.gone(session, offer.owner)
            else:
                self._delivered(other, offer, when)
        return last

    def _delivered(self, item: Item, offer: Offer, when: float) -> None:
        offers = self._remote_offers.setdefault(item, {})
        offers[offer.session] = (offer, when)
        # Bounded: the oldest are long accepted or expired.
        while len(offers) > MAX_REMOTE_OFFERS:
            del offers[next(iter(offers))]
        self._deliver(item, offer)

    # -- connectors ----------------------------------------------------------------

    def connect(
        self,
        rdv: str,
        peer: str | None,
        from_: str | None,
        wait: float | None,
        channel: Any,
        *,
        clustered: bool,
        lookup_timeout: float,
    ) -> tuple[Connector, PendingLookUp | None]:
        """
        Register a connector; when no local listener matches (and Redis is
        usable) also a look-up to run.  A connector that will not wait
        waits for the look-up only (C{lookup_timeout}).

        @raise ProtocolError: as L{Registry.connect}.
        """
        registry = self.registry
        if not clustered or registry.has_listener(rdv, peer):
            return registry.connect(rdv, peer, from_, wait, channel), None
        immediate = wait is not None and wait <= 0
        connector = registry.connect(rdv, peer, from_, lookup_timeout if immediate else wait, channel)
        if connector.state is not ConnectorState.WAITING:
            return connector, None
        return connector, PendingLookUp(connector, rdv, immediate)

    def looked_up(self, pending: PendingLookUp, found: list[tuple[str, str]]) -> None:
        """The look-up of C{pending} found C{found}: offer; a connector that will not wait gives up."""
        self.offer_remote(pending.rdv, found)
        connector = pending.connector
        if pending.immediate and connector.state is ConnectorState.WAITING:
            self.registry.remove_connector(connector)
            connector.channel.failed(ProtocolError(ErrorCode.NO_LISTENER, no_listener_message(connector.peer)))

    def offer_remote(self, rdv: str, found: list[tuple[str, str]]) -> None:
        """Offer the connectors waiting for C{rdv} to listeners C{found} on other instances."""
        found = list(found)
        self._shuffle(found)
        for instance, peer in found:
            if not any(c.peer in (None, peer) for c in self.registry.waiting_for(rdv)):
                continue
            stand_in = self.registry.listen(rdv, peer, RemoteListener(instance, rdv, peer, self._offer))
            self.registry.retire_listener(stand_in)

    def waiting_rendezvous(self) -> list[str]:
        """The rendezvous some connector still waits for (to look up again when Redis is back)."""
        return [rdv for rdv in self.registry.waiting_rendezvous() if self.registry.waiting_for(rdv)]

    # -- messages ------------------------------------------------------------------

    def received(self, data: str | bytes) -> AcceptRequest | AcceptAnswer | None:
        """
        Handle one pub/sub message; the ones only the front understands
        (C{accept}, C{answer}) are returned.  Malformed ones are ignored.
        """
        message = parse(data)
        if isinstance(message, ListenerAnnounced):
            if message.instance != self.instance:
                self._seen(message.instance)
                if self.registry.waiting_for(message.rdv):
                    self.offer_remote(message.rdv, [(message.instance, message.peer)])
        elif isinstance(message, Offer):
            item = self.listeners.pick(message.rdv, message.peer)
            if item is None:
                self._publish(self.keys.channel(message.owner), encode(Gone(message.session)))
            else:
                self._delivered(item, message, self._clock())
        elif isinstance(message, Gone):
            self.registry.cancel_session(
                message.session, ErrorCode.NO_LISTENER, "the listener went away before accepting"
            )
        else:
            return message
        return None

    def gone(self, session: str, owner: str) -> None:
        """A local listener offered C{session} by instance C{owner} left before accepting."""
        self._publish(self.keys.channel(owner), encode(Gone(session)))
