"""
Several relay instances behaving as one, through Redis (C{--redis}).

Each instance keeps its own L{pluresync.relay.core.pairing.Registry}: it stays
authoritative for the peers connected to that instance, so two peers that
meet on one instance pair exactly as without Redis (and go on pairing while
Redis is down).  Redis only tells instances about each other, in the cluster
protocol both relay fronts share (L{pluresync.relay.cluster.protocol}: the
keys, the messages, the stand-in listeners and the look-ups); this module
does its I/O with the Twisted Redis client (L{pluresync.relay.cluster.redisstore}).
C{P} is C{pluresync:DB:} (pub/sub channels are not per database); an
instance's C{inst} key holds its cluster link address, a session's C{ses} key
C{"OWNER ADDRESS"}.

What this front adds is how a pair's bytes cross instances: the listener's
C{accept} may land on any instance C; C finds the owner B of the session and
opens a cluster link to it (L{pluresync.relay.cluster.link}), which both
instances pair with their client socket.  The bytes flow connector ↔ B ↔
link ↔ C ↔ acceptor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, serverFromString
from twisted.logger import Logger

from pluresync.relay.cluster.link import LinkClient, LinkClosed, LinkServer, LinkServerFactory
from pluresync.relay.cluster.protocol import ClusterKeys, ClusterNode, Offer, look_up, new_instance_id, run_steps, text
from pluresync.relay.cluster.redisstore import RedisAddress, RedisStore, RedisUnavailable
from pluresync.relay.core.pairing import Connector, Listener, Registry
from pluresync.relay.core.session import CLOSE_REASONS
from pluresync.relay.core.wire import CLOSE_GOING_AWAY, ErrorCode, ProtocolError

log = Logger(namespace="pluresync.relay.cluster.service")

MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class ClusterConfig:
    """
    What C{--redis}, C{--cluster-*} configure.

    @ivar listen: server endpoint of the cluster link port.
    @ivar address: C{host:port} other instances reach that port at.
    @ivar secret_file: the file holding the shared cluster secret.
    @ivar secret: the secret itself (HMAC key of the links), once read
        (L{attach_cluster} reads it: options parsing reads no file).
    """

    redis: RedisAddress
    listen: str
    address: str
    secret_file: str
    secret: bytes = field(default=b"", repr=False)
    heartbeat: float = 2.0
    ttl: float = 6.0
    lookup_timeout: float = 2.0


def read_secret(path: str) -> bytes:
    """
    The cluster secret in C{path} (surrounding whitespace stripped).

    @raise ValueError: unreadable, or shorter than 16 bytes.
    """
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as error:
        raise ValueError(f"cannot read the cluster secret file {path!r}: {error.strerror}") from None
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(
            f"the cluster secret in {path!r} is too short ({len(secret)} bytes; at least {MIN_SECRET_BYTES}): "
            "e.g. `head -c 32 /dev/urandom | base64 > cluster.secret`"
        )
    return secret


def default_address(listen: str) -> str | None:
    """C{host:port} from a C{tcp:PORT:interface=HOST} endpoint with a specific host, else None."""
    parts = listen.split(":")
    if len(parts) < 2 or parts[0] != "tcp" or not parts[1].isdigit():
        return None
    for part in parts[2:]:
        if part.startswith("interface=") and part[len("interface=") :] not in ("", "0.0.0.0", "::"):
            return f"{part[len('interface=') :]}:{parts[1]}"
    return None


class ClusterRegistry:
    """
    The registry the WebSocket adapter sees on a clustered relay: the local
    L{Registry}'s interface, with registrations mirrored to Redis and
    connectors with no local listener looked up there.
    """

    def __init__(self, local: Registry, cluster: Cluster, node: ClusterNode[Listener]) -> None:
        self.local = local
        self._cluster = cluster
        self._node = node

    # -- listeners -------------------------------------------------------------

    def listen(self, rdv: str, peer: str, channel: Any) -> Listener:
        listener = self.local.listen(rdv, peer, channel)
        if self._node.listener_added(rdv, peer, listener):
            self._cluster.listener_added(rdv, peer)
        return listener

    def remove_listener(self, listener: Listener) -> None:
        self.local.remove_listener(listener)
        if self._node.listener_removed(listener.rdv, listener.peer, listener):
            self._cluster.listener_removed(listener.rdv, listener.peer)

    # -- connectors ------------------------------------------------------------

    def connect(self, rdv: str, peer: str | None, from_: str | None, wait: float | None, channel: Any) -> Connector:
        cluster = self._cluster
        connector, pending = self._node.connect(
            rdv, peer, from_, wait, channel, clustered=cluster.up, lookup_timeout=cluster.config.lookup_timeout
        )
        if pending is not None:
            cluster.look_up(rdv).addCallback(lambda found: self._node.looked_up(pending, found))
        return connector

    def waiting_for(self, rdv: str) -> list[Connector]:
        """The connectors still waiting for a listener of C{rdv} (the local registry knows)."""
        return self.local.waiting_for(rdv)

    def remove_connector(self, connector: Connector) -> None:
        self.local.remove_connector(connector)

    def accept(self, session: str) -> Any:
        pairing = self.local.accept(session)
        self._cluster.session_done(session)
        return pairing

    def unpair(self, connector: Connector) -> None:
        self.local.unpair(connector)

    def cancel_session(self, session: str, code: ErrorCode, message: str) -> bool:
        return self.local.cancel_session(session, code, message)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.local, name)


class Cluster(Service):
    """
    The clustering of one relay instance: its Redis store, heartbeats,
    pub/sub handling, link server and link clients.  Attach with
    L{attach_cluster}.
    """

    def __init__(self, reactor: Any, factory: Any, config: ClusterConfig) -> None:
        self.reactor = reactor
        self.factory = factory
        self.config = config
        self.instance = new_instance_id()
        self.keys = ClusterKeys(f"pluresync:{config.redis.db}:")
        self.node: ClusterNode[Listener] = ClusterNode(
            self.instance,
            self.keys,
            factory.registry,
            publish=lambda channel, message: self._quiet(self.store.command("PUBLISH", channel, message)),
            offer=self._offer_remote,
            deliver=lambda listener, offer: listener.channel.incoming(offer.session, offer.from_),
            seen=lambda instance: self._suspects.pop(instance, None),
        )
        self.registry = ClusterRegistry(factory.registry, self, self.node)
        self.store = RedisStore(
            reactor,
            config.redis,
            channels=lambda: self.keys.subscriptions(self.instance),
            on_message=self._message,
            on_up=self._redis_up,
            on_down=self._redis_down,
        )
        self.link_factory = LinkServerFactory(reactor, config.secret, factory.limits.max_message, self._link_accept)
        self.clients: set[LinkClient] = set()
        self._port: Any = None
        self._heartbeat_call: Any = None
        self._suspects: dict[str, float] = {}

    @property
    def up(self) -> bool:
        """Whether Redis is usable (clustering active)."""
        return self.store.up

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        endpoint = serverFromString(self.reactor, self.config.listen)
        endpoint.listen(self.link_factory).addCallbacks(self._listening, self._listen_failed)
        self.store.start()
        log.info(
            "cluster instance {instance} at {address}, Redis {redis}",
            instance=self.instance[:8],
            address=self.config.address,
            redis=str(self.config.redis),
        )

    def _listening(self, port: Any) -> None:
        self._port = port

    def _listen_failed(self, reason: Any) -> None:
        log.error(
            "cannot listen for cluster links on {endpoint}: {reason}", endpoint=self.config.listen, reason=reason.value
        )
        # A relay that cannot take cluster links would silently pair only
        # locally: stop instead, so the operator sees the error.
        if getattr(self.reactor, "running", False):
            self.reactor.stop()

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = None
        waits: list[Deferred[Any]] = []
        # Forget this instance at once (its listeners are going away).
        if self.store.up:
            waits.append(self._quiet(self.store.command("DEL", self.keys.instance(self.instance))))
        for link in list(self.link_factory.links) + list(self.clients):
            link.close(CLOSE_GOING_AWAY, CLOSE_REASONS[CLOSE_GOING_AWAY])
            waits.append(link.lost)
        if self._port is not None:
            waits.append(self._port.stopListening())
        done = gatherResults(waits, consumeErrors=True)
        done.addBoth(lambda _: self.store.stop())
        return done

    @staticmethod
    def _quiet(d: Deferred[Any]) -> Deferred[Any]:
        return d.addErrback(lambda _: None)

    # -- Redis up / down -------------------------------------------------------

    def _redis_up(self) -> None:
        # Redis may have lost everything (restart): publish our state again,
        # announce our listeners, and look up every waiting connector.
        self._heartbeat()
        for rdv, peer in self.node.listeners:
            self._send(self.node.announcement(rdv, peer, self._ttl))
        for rdv in self.node.waiting_rendezvous():
            self.look_up(rdv).addCallback(lambda found, rdv=rdv: self.node.offer_remote(rdv, found))

    def _redis_down(self) -> None:
        if self._heartbeat_call is not None and self._heartbeat_call.active():
            self._heartbeat_call.cancel()
        self._heartbeat_call = None

    @property
    def _ttl(self) -> int:
        return max(1, int(round(self.config.ttl)))

    def _send(self, commands: list[Any]) -> Deferred[list[Any]]:
        """Send C{commands} pipelined; their replies."""
        return gatherResults([self.store.command(*command) for command in commands], consumeErrors=True)

    def _heartbeat(self) -> None:
        self._heartbeat_call = None
        if not self.store.up:
            return
        self._send(self.node.heartbeat(self._ttl, self.config.address)).addErrback(
            lambda f: log.debug("heartbeat failed: {reason}", reason=f.value)
        )
        self._heartbeat_call = self.reactor.callLater(self.config.heartbeat, self._heartbeat)

    # -- listeners -------------------------------------------------------------

    def listener_added(self, rdv: str, peer: str) -> None:
        if self.store.up:
            self._quiet(self._send(self.node.announcement(rdv, peer, self._ttl)))

    def listener_removed(self, rdv: str, peer: str) -> None:
        if self.store.up:
            self._quiet(self.store.command(*self.node.withdrawal(rdv, peer)))

    def look_up(self, rdv: str) -> Deferred[list[tuple[str, str]]]:
        """
        The live listeners of C{rdv} on other instances, as C{(instance,
        peer)}; empty when there are none or Redis fails.
        """
        return Deferred.fromCoroutine(self._look_up(rdv)).addErrback(self._lookup_failed)

    def _lookup_failed(self, failure: Any) -> list[tuple[str, str]]:
        if not failure.check(RedisUnavailable):
            log.debug("cluster lookup failed: {reason}", reason=failure.value)
        return []

    async def _look_up(self, rdv: str) -> list[tuple[str, str]]:
        now = self.reactor.seconds()
        steps = look_up(self.keys, rdv, self.instance, skip=lambda instance: self._suspects.get(instance, 0) > now)
        return await run_steps(steps, self.store.command)

    # -- offers ----------------------------------------------------------------

    def _offer_remote(self, message: Offer, instance: str) -> None:
        """A local connector is offered (in C{message.session}) to a listener on C{instance}."""
        Deferred.fromCoroutine(self._send_offer(message, instance)).addErrback(
            lambda f: self.registry.cancel_session(
                message.session, ErrorCode.NO_LISTENER, "the listener's relay instance could not be reached"
            )
        )

    async def _send_offer(self, message: Offer, instance: str) -> None:
        ttl = max(1, int(self.factory.limits.accept_timeout + self.config.ttl))
        owner = f"{self.instance} {self.config.address}"
        # Pipelined: the session key exists before the offer is delivered.
        stored, published = [
            self.store.command(*command) for command in self.node.offer_commands(message, instance, owner, ttl)
        ]
        await stored
        receivers = await published
        if not receivers:
            # Nobody subscribes to that instance's channel: it is dead (its
            # keys have not expired yet).  Skip it until they have.
            self._suspects[instance] = self.reactor.seconds() + self.config.ttl
            self._quiet(self.store.command("DEL", self.keys.instance(instance)))
            self.registry.cancel_session(
                message.session, ErrorCode.NO_LISTENER, "the listener's relay instance is gone"
            )

    def session_done(self, session: str) -> None:
        if self.store.up:
            self._quiet(self.store.command("DEL", self.keys.session(session)))

    # -- pub/sub ---------------------------------------------------------------

    def _message(self, channel: str, message: str) -> None:
        # Only the ASGI front sends accept/answer messages; not for us.
        self.node.received(message)

    # -- accepts ---------------------------------------------------------------

    def _link_accept(self, session: str, link: LinkServer) -> tuple[Any, Any]:
        """A link from the instance where the accept landed claims C{session}."""
        pairing = self.registry.accept(session)
        other = pairing.connector.channel.front
        if not other.can_pair:
            self.registry.unpair(pairing.connector)
            raise ProtocolError(ErrorCode.PEER_GONE, "the connector went away")
        return other, pairing

    def remote_accept(self, protocol: Any, session: str) -> None:
        """
        C{protocol} (an C{accept} socket) names a session unknown here: if
        Redis knows its owner, pair through a cluster link to it.
        """
        if not self.store.up:
            protocol.session.failed(
                ProtocolError(ErrorCode.NO_SESSION, "no such session (unknown, expired or already accepted)")
            )
            return
        Deferred.fromCoroutine(self._remote_accept(protocol, session)).addErrback(
            lambda f: (
                log.failure("remote accept failed", f),
                protocol.session.failed(ProtocolError(ErrorCode.PEER_GONE, "internal error")),
            )
        )

    async def _remote_accept(self, protocol: Any, session: str) -> None:
        no_session = ProtocolError(ErrorCode.NO_SESSION, "no such session (unknown, expired or already accepted)")
        try:
            owner = await self.store.command("GET", self.keys.session(session))
        except Exception:
            owner = None
        if not owner:
            protocol.session.failed(no_session)
            return
        instance, _, address = text(owner).partition(" ")
        host, _, port = address.rpartition(":")
        if instance == self.instance or not host or not port.isdigit():
            protocol.session.failed(no_session)
            return
        link = LinkClient(self.config.secret, self.reactor, self.factory.limits.max_message, session)
        self.clients.add(link)
        link.lost.addBoth(lambda _: self.clients.discard(link))
        endpoint = TCP4ClientEndpoint(self.reactor, host.strip("[]"), int(port), timeout=5)
        try:
            await connectProtocol(endpoint, link)
            _, peer = await link.result
        except ProtocolError as error:
            protocol.session.failed(error)
            return
        except (LinkClosed, Exception) as error:
            log.warn("cluster link to {instance} failed: {reason}", instance=instance[:8], reason=error)
            protocol.session.failed(ProtocolError(ErrorCode.PEER_GONE, "the connector's relay instance is unreachable"))
            return
        if not protocol.can_pair or not link.is_open:
            # The acceptor left meanwhile (or the link broke).
            link.close(ErrorCode.PEER_GONE.close_code, ErrorCode.PEER_GONE.value)
            protocol.session.failed(ProtocolError(ErrorCode.PEER_GONE, "the connector went away"))
            return
        link.link_to(protocol)
        protocol.pair_remote(link, peer, None, session)
        link.flush()

    # -- health ----------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        return {"cluster_links": len(self.link_factory.links) + len(self.clients)}


def attach_cluster(service: Any, config: ClusterConfig, reactor: Any) -> Cluster:
    """
    Cluster the relay C{service} (a L{pluresync.relay.server.service.RelayService}):
    swap its registry for a L{ClusterRegistry}, add the C{redis} readiness
    check to C{/health}, and run the L{Cluster} as its child service.

    @raise ValueError: the cluster secret file cannot be used.
    """
    if not config.secret:
        from dataclasses import replace

        config = replace(config, secret=read_secret(config.secret_file))
    factory = service.factory
    cluster = Cluster(reactor, factory, config)
    factory.registry = cluster.registry
    factory.cluster = cluster
    health = getattr(service.site, "health", None)
    if health is not None:
        health.checks["redis"] = lambda: cluster.up
    cluster.setServiceParent(service)
    return cluster


def cluster_config(
    redis: str | None, listen: str | None, address: str | None, secret_file: str | None
) -> ClusterConfig | None:
    """
    The L{ClusterConfig} of C{--redis} and the C{--cluster-*} options, or
    C{None} without C{--redis}.

    @raise ValueError: an option is missing, malformed or unusable.
    """
    if redis is None:
        if listen or address or secret_file:
            raise ValueError("--cluster-listen/--cluster-address/--cluster-secret-file need --redis")
        return None
    redis_address = RedisAddress.parse(redis)
    if not secret_file:
        raise ValueError("--redis needs --cluster-secret-file (links between instances must be authenticated)")
    if not listen:
        raise ValueError("--redis needs --cluster-listen (e.g. tcp:9090:interface=10.0.0.5)")
    listen = listen.strip()
    if listen.isdigit():
        listen = f"tcp:{listen}"
    if address is None:
        address = default_address(listen)
        if address is None:
            raise ValueError(
                "--redis needs --cluster-address HOST:PORT (the address other instances reach this one at)"
            )
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--cluster-address must be HOST:PORT, got {address!r}")
    return ClusterConfig(redis=redis_address, listen=listen, address=address, secret_file=secret_file)
