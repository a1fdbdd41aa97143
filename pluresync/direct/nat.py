"""
What kind of NAT stands between a UDP socket and the internet.

Hole punching needs to know whether the public address a STUN server sees
is the one a peer will see too.  A socket asks two (or more) STUN server
addresses, from the same socket, and compares the answers:

  - C{"open"}: the servers see the socket's own address: no NAT;
  - C{"cone"}: every server sees the same public address: the NAT keeps one
    mapping per socket whatever the destination (endpoint-independent
    mapping, RFC 4787), so the address a STUN server saw is the one a
    peer's packets reach;
  - C{"symmetric"}: the servers see different addresses: the NAT maps per
    destination, so a peer sees yet another port (punching then needs many
    tries, or the relay);
  - C{"blocked"}: no server answered at all: UDP is blocked (or every
    server is down);
  - C{"unknown"}: answers, but not enough to tell (only one server
    answered with a translated address, or the servers answered with errors).

Two ports of one server (the relay's C{--udp-port} N and N+1) tell a cone
NAT from one that maps per destination port, the common symmetric kind; a
NAT that maps per destination I{address} only looks like a cone to them,
and needs two servers on different addresses to be seen.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from pluresync.direct.stun import UdpAddress, udp_address
from pluresync.direct.stunclient import StunClient, StunProtocol
from pluresync.errors import ConfigurationError, StunUnreachableError

#: The NAT classes L{classify} gives.
NAT_CLASSES = ("open", "cone", "symmetric", "blocked", "unknown")


@dataclass(frozen=True)
class NatSample:
    """
    One server's answer.

    @ivar server: the server as given (C{host:port}).
    @ivar mapped: the address it saw, or C{None}.
    @ivar error: why there is no address, or C{None}.
    @ivar unreachable: no answer came back (a timeout, a send that failed),
        as opposed to an answer that could not be used.
    """

    server: str
    mapped: UdpAddress | None
    error: str | None = None
    unreachable: bool = False


@dataclass(frozen=True)
class NatReport:
    """
    What L{classify_nat} found.

    @ivar nat: one of L{NAT_CLASSES}.
    @ivar reason: one sentence saying why, for logs and C{pluresync doctor}.
    @ivar local: the socket's own address.
    @ivar samples: one L{NatSample} per server, in the order given.
    """

    nat: str
    reason: str
    local: UdpAddress
    samples: tuple[NatSample, ...]

    @property
    def mapped(self) -> UdpAddress | None:
        """The public address: the first server's answer that has one (C{None} if none has)."""
        return next((s.mapped for s in self.samples if s.mapped is not None), None)


def classify(local: tuple[str, int], samples: Sequence[NatSample], local_hosts: Collection[str]) -> tuple[str, str]:
    """
    The NAT class and the reason, from the answers (pure: no I/O).

    @param local: the socket's own address (its port matters; its host may
        be a wildcard).
    @param local_hosts: this host's addresses the socket sends from; a
        mapped address on one of them, with the socket's port, means no NAT.
    """
    answered = [s for s in samples if s.mapped is not None]
    if not answered:
        errors = "; ".join(f"{s.server}: {s.error}" for s in samples)
        if all(s.unreachable for s in samples):
            return "blocked", f"no STUN server answered: UDP is blocked here, or the servers are down ({errors})"
        return "unknown", f"no STUN server gave an address ({errors})"
    mapped = {s.mapped for s in answered}
    if len(mapped) > 1:
        seen = ", ".join(f"{s.mapped} from {s.server}" for s in answered)
        if len({m.host for m in mapped}) > 1:
            return "symmetric", f"the servers see different public IP addresses ({seen})"
        return "symmetric", f"the NAT gives this socket a different public port for each destination ({seen})"
    (public,) = mapped
    if public.port == local[1] and public.host in _normalised(local_hosts):
        return "open", f"the servers see this socket's own address {public}: no NAT (a firewall may still filter)"
    if len(answered) > 1:
        return "cone", f"every server sees {public}: the NAT keeps one mapping for this socket whatever the destination"
    missing = "; ".join(f"{s.server}: {s.error}" for s in samples if s.mapped is None)
    return "unknown", (
        f"only {answered[0].server} answered ({public}); a second server address is needed to tell a cone NAT "
        "from a symmetric one" + (f" ({missing})" if missing else "")
    )


def _normalised(hosts: Collection[str]) -> set[str]:
    """C{hosts} as L{udp_address} writes them (anything that is not an IP literal left out)."""
    found = set()
    for host in hosts:
        try:
            found.add(udp_address((host, 0)).host)
        except ValueError:
            pass
    return found


def route_source(ip: str) -> str | None:
    """
    The local address this host sends from to reach C{ip} (a UDP
    C{connect}, which sends nothing), or C{None} if there is no route.
    """
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((ip, 9))
            return udp_address(probe.getsockname()).host
    except (OSError, ValueError):
        return None


def _resolve(reactor: Any, host: str, deadline: float) -> Deferred[str]:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return reactor.resolve(host).addTimeout(deadline, reactor)
    return succeed(host)


def _sample(server: str, outcome: tuple[bool, Any]) -> NatSample:
    ok, value = outcome
    if ok:
        return NatSample(server, value)
    error = value.value
    return NatSample(server, None, str(error) or type(error).__name__, isinstance(error, StunUnreachableError))


def classify_nat(
    reactor: IReactorTime,
    client: StunClient,
    servers: Sequence[tuple[str, int]],
    local: tuple[str, int],
    *,
    deadline: float = 5.0,
    local_hosts: Collection[str] | None = None,
) -> Deferred[NatReport]:
    """
    Ask every server in C{servers} at once, through C{client} (so from its
    socket), and classify the NAT (see L{classify}).

    @param reactor: times the deadline, and resolves server names
        (C{IReactorCore.resolve}: IPv4).
    @param servers: C{(host, port)} of at least one STUN server; two
        distinct ones are needed to tell cone from symmetric (e.g. the
        relay's N and N+1).
    @param local: the socket's own address (C{port.getHost()}'s host and port).
    @param deadline: seconds for resolving names, then for the queries.
    @param local_hosts: this host's source addresses; by default the
        socket's own host, or, for a wildcard socket, the address the
        routing table picks towards each server.
    @return: a Deferred firing with a L{NatReport} (network trouble is what
        the report is about, not a failure); it fails with
        L{ConfigurationError} on bad arguments.  Cancelling it stops every
        query.
    """
    try:
        me = udp_address(local)
        if not servers:
            raise ConfigurationError("classify_nat needs at least one STUN server address")
        names = [str(UdpAddress(host, port)) for host, port in servers]
    except (ValueError, TypeError) as error:
        return fail(ConfigurationError(f"classify_nat: {error}"))
    pending: list[Deferred[Any]] = []
    cancelled: list[bool] = []

    def cancel(_: Deferred[NatReport]) -> None:
        # Flag first: cancelling a query fires the DeferredList at once,
        # which resumes run() inside this call.
        cancelled.append(True)
        for waiting in list(pending):
            waiting.cancel()

    result: Deferred[NatReport] = Deferred(cancel)

    async def run() -> NatReport | None:
        pending[:] = [_resolve(reactor, host, deadline) for host, _ in servers]
        resolved = await DeferredList(pending, consumeErrors=True)
        if cancelled:
            return None
        targets = [(ip, port) if ok else None for (ok, ip), (_, port) in zip(resolved, servers, strict=True)]
        known = [t for t in targets if t is not None]
        if len(set(known)) < len(known):
            raise ConfigurationError(f"classify_nat was given the same STUN server twice: {', '.join(names)}")
        pending[:] = [
            client.query(target, deadline=deadline) if target is not None else fail(outcome[1])
            for target, outcome in zip(targets, resolved, strict=True)
        ]
        answers = await DeferredList(pending, consumeErrors=True)
        if cancelled:
            return None
        samples = tuple(_sample(name, outcome) for name, outcome in zip(names, answers, strict=True))
        if local_hosts is not None:
            hosts = set(local_hosts)
        elif ipaddress.ip_address(me.host).is_unspecified:
            hosts = {source for target in known if (source := route_source(target[0])) is not None}
        else:
            hosts = {me.host}
        nat, reason = classify(me, samples, hosts)
        return NatReport(nat, reason, me, samples)

    def deliver(outcome: Any) -> None:
        if cancelled:
            return
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)

    Deferred.fromCoroutine(run()).addBoth(deliver)
    return result


def discover_nat(
    reactor: Any,
    servers: Sequence[tuple[str, int]],
    *,
    interface: str = "",
    deadline: float = 5.0,
) -> Deferred[NatReport]:
    """
    L{classify_nat} from a new UDP socket of its own (an ephemeral port on
    C{interface}), closed at the end: for C{pluresync doctor} and tests.
    Hole punching must ask from its own socket instead (another socket gets
    another mapping).

    @param reactor: an C{IReactorUDP} and C{IReactorTime} (and
        C{IReactorCore} for server names).
    """
    protocol = StunProtocol(reactor)
    try:
        port = reactor.listenUDP(0, protocol, interface=interface)
    except Exception as error:
        return fail(StunUnreachableError(f"cannot open a UDP socket on {interface or 'every interface'}: {error}"))
    host = port.getHost()

    async def run() -> NatReport:
        try:
            return await classify_nat(reactor, protocol.client, servers, (host.host, host.port), deadline=deadline)
        finally:
            await maybeDeferred(port.stopListening)

    return Deferred.fromCoroutine(run())
