"""
UDP hole punching: two peers send authenticated probes to each other's
addresses at the same time, until one path carries them both ways.

Each side's NAT lets a datagram in only from an address it has sent to,
so both send at once (simultaneous open), each to every address of the
other's it knows: its LAN ("host") addresses and the public address its
NAT maps ("reflexive", from STUN).  How depends on the two NATs' classes,
as L{pluresync.direct.nat} reports them (hyperdht's table, with its
birthday search; an C{unknown} NAT is punched as a cone):

============  ============  ===========================================
this side     the peer      what this side does
============  ============  ===========================================
open, cone,   open, cone,   probe every address of the peer's, every
unknown       unknown       C{interval} ("simultaneous")
symmetric     open, cone    also open C{birthday_sockets} more sockets,
                            each probing the peer's public address: its
                            NAT gives each a new public port ("birthday")
open, cone    symmetric     also probe random ports of the peer's public
                            IP, bounded in count and rate, until one hits
                            a port the peer's birthday sockets opened
                            ("spray")
symmetric     symmetric     hopeless beyond a LAN: probe the host
either        blocked       addresses only, for C{lan_timeout} ("lan")
============  ============  ===========================================

Host addresses are always probed: two peers behind one NAT meet only there.

A probe proves nothing until answered: the initiator takes the first path
on which the responder answered one of its probes, names it (CHOSEN), and
both are done once the responder answers that.  So both ends agree on one
path, even when several work.  Every message is sealed with the punch key
(L{pluresync.direct.probes}): a stranger's datagram, a replayed probe and
our own probe reflected back are ignored, and an answer counts only if it
came back from the address, to the socket, that its probe used.

The socket owner demultiplexes: L{HolePunch} is an L{IDatagramHandler} on
the UDP socket it was given, and takes the datagrams for which L{is_probe}
is true; STUN and QUIC stay the owner's.  The birthday sockets are the
puncher's, read through the reactor, and closed when the punch ends,
except a winner, which is handed to the caller.
"""

from __future__ import annotations

import ipaddress
import random as _random
import socket as _socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.automata import Transitions
from pluresync.direct.probes import Kind, ProbeCodec, ReplayWindow, Role, is_probe
from pluresync.direct.signal import Candidate, CandidateKind, NatClass
from pluresync.errors import DirectPathError
from pluresync.interfaces import IDatagramHandler

__all__ = [
    "BLOCKED",
    "CONE",
    "OPEN",
    "SYMMETRIC",
    "UNKNOWN",
    "HolePunch",
    "PunchedPath",
    "UdpSockets",
    "is_probe",
]

Address = tuple[str, int]

#: NAT classes, as L{pluresync.direct.nat} reports them (or their
#: L{NatClass} in a signal): no NAT; one public port per socket; one per
#: destination; no UDP at all; cannot tell (punched as a cone).
OPEN, CONE, SYMMETRIC, BLOCKED, UNKNOWN = "open", "cone", "symmetric", "blocked", "unknown"
NAT_CLASSES = frozenset((OPEN, CONE, SYMMETRIC, BLOCKED, UNKNOWN))
#: Strategies (L{HolePunch.strategy}).
SIMULTANEOUS, BIRTHDAY, SPRAY, LAN = "simultaneous", "birthday", "spray", "lan"

#: At most this many of the peer's candidates are used (a longer list is cut).
MAX_CANDIDATES = 16
#: Paths learned from the peer's probes (a port its NAT picked) probed each round, at most.
MAX_LEARNED = 16
#: Our messages remembered so an answer can be matched to the path its probe took.
MAX_REMEMBERED = 4096
#: The ports a symmetric NAT picks from (Linux's default range for masquerade).
SPRAY_PORTS = range(1024, 65536)
#: Datagrams read from one birthday socket per reactor turn, at most.
_READS_PER_TURN = 64


@dataclass(frozen=True, slots=True)
class PunchedPath:
    """
    A path proven both ways: where the peer answers, and the local socket
    that reaches it.

    @ivar peer: the peer's address as this side sees it (its NAT's mapping).
    @ivar socket: the socket given to L{HolePunch}, or, when C{new_socket}, a
        birthday socket (a non-blocking C{socket.socket}) that is now the
        caller's: adopt it into the reactor, and close it in the end.
    @ivar strategy: how it was found (L{SIMULTANEOUS}, L{BIRTHDAY}, L{SPRAY}, L{LAN}).
    @ivar seconds: from L{HolePunch.start} until both ends agreed.
    """

    peer: Address
    socket: Any
    new_socket: bool
    strategy: str
    seconds: float


@dataclass(slots=True)
class PunchStats:
    """What a punch sent and dropped (for logs, benchmarks and tests)."""

    sent: int = 0
    send_errors: int = 0
    #: datagrams that were not the peer's messages (strangers, tampering, our own reflected)
    ignored: int = 0
    #: the peer's messages seen before (replays)
    replayed: int = 0
    #: answers or nominations that named a path their probe did not take
    mismatched: int = 0
    sockets_opened: int = 0


class DatagramSender(Protocol):
    """What L{HolePunch} needs of the socket it is given: a C{socket.socket} is one."""

    def sendto(self, data: bytes, address: Address, /) -> Any: ...


class PunchSocket(DatagramSender, Protocol):
    """A socket the puncher opened (a birthday socket)."""

    def close(self) -> None:
        "Stop reading and close the socket."

    def release(self) -> Any:
        "Stop reading; the OS socket, still open, becomes the caller's (returned)."


class SocketFactory(Protocol):
    """Opens birthday sockets: each hands what it reads to C{receive(socket, datagram, address)}."""

    def open(self, receive: Callable[[PunchSocket, bytes, Address], None]) -> PunchSocket: ...


# -- the plan: what to probe, from the two NAT classes -------------------------


@dataclass(frozen=True, slots=True)
class _Plan:
    strategy: str
    #: probed from the given socket every round
    targets: tuple[Address, ...]
    #: what every birthday socket probes (the peer's public address)
    birthday_target: Address | None = None
    #: the peer's public IP, whose ports are sprayed
    spray_host: str | None = None
    #: why only the LAN is left, as (reason code, sentence), for L{LAN}
    hopeless: tuple[str, str] | None = None


def _plan(local_nat: str, peer_nat: str, candidates: list[Candidate]) -> _Plan | DirectPathError:
    hosts = tuple((c.host, c.port) for c in candidates if c.kind is CandidateKind.HOST)
    mapped = tuple((c.host, c.port) for c in candidates if c.kind is CandidateKind.REFLEXIVE)
    hopeless = None
    if local_nat == BLOCKED:
        hopeless = ("udp-blocked", "UDP is blocked on this network (the public address lookup got no answer)")
    elif peer_nat == BLOCKED:
        hopeless = ("udp-blocked", "UDP is blocked on the peer's network (its public address lookup got no answer)")
    elif local_nat == SYMMETRIC and peer_nat == SYMMETRIC:
        hopeless = (
            "both-symmetric",
            "both peers are behind symmetric NATs (a new public port for every destination), "
            "so neither can learn where to send",
        )
    if hopeless is not None:
        if not hosts:
            why = f"no direct path: {hopeless[1]}, and the peer has no LAN address{_RELAY}"
            return DirectPathError(why, hopeless[0])
        return _Plan(LAN, hosts, hopeless=hopeless)
    targets = tuple(dict.fromkeys(hosts + mapped))
    if not targets:
        return DirectPathError(f"no direct path: the peer gave no address to punch to{_RELAY}", "no-candidates")
    public = next((a for a in mapped if ipaddress.ip_address(a[0]).version == 4), None)
    if public is not None and local_nat == SYMMETRIC:
        return _Plan(BIRTHDAY, targets, birthday_target=public)
    if public is not None and peer_nat == SYMMETRIC:
        return _Plan(SPRAY, targets, spray_host=public[0])
    return _Plan(SIMULTANEOUS, targets)


_RELAY = " (the relay keeps carrying the stream)"


def _nat_name(nat: str | NatClass) -> str:
    """A NAT class by its name, whether L{pluresync.direct.nat}'s string or a signal's L{NatClass}."""
    name = nat.name.lower() if isinstance(nat, NatClass) else nat
    if name not in NAT_CLASSES:
        raise ValueError(f"a NAT class is one of {', '.join(sorted(NAT_CLASSES))}, not {nat!r}")
    return name


def _usable(candidates: Iterable[Candidate], log: Logger) -> list[Candidate]:
    """
    The peer's candidates worth a datagram: UDP ones (host and reflexive; a
    LAN TCP port is for L{pluresync.direct.lan}) at real unicast addresses,
    each once, at most L{MAX_CANDIDATES}.
    """
    usable: dict[Address, Candidate] = {}
    dropped = 0
    for candidate in candidates:
        if candidate.kind is CandidateKind.LAN_TCP:
            continue
        try:
            ip = ipaddress.ip_address(candidate.host)
            port = int(candidate.port)
        except (ValueError, TypeError, AttributeError):
            dropped += 1
            continue
        if (
            candidate.kind not in (CandidateKind.HOST, CandidateKind.REFLEXIVE)
            or not 0 < port < 65536
            or ip.is_multicast
            or ip.is_unspecified
            or ip == ipaddress.IPv4Address("255.255.255.255")
        ):
            dropped += 1
            continue
        address = (str(ip), port)
        if address not in usable and len(usable) < MAX_CANDIDATES:
            usable[address] = Candidate(CandidateKind(candidate.kind), *address)
        elif address not in usable:
            dropped += 1
    if dropped:
        log.info("ignoring {count} of the peer's punch candidates (malformed, not unicast, or too many)", count=dropped)
    return list(usable.values())


# -- the machine ----------------------------------------------------------------


class _Inputs(Protocol):
    """Everything that moves a punch along (the inputs of its machine)."""

    def start(self) -> Deferred:
        "L{HolePunch.start} with a plan that can work: begin probing."

    def refuse(self, error: DirectPathError) -> Deferred:
        "L{HolePunch.start} with a plan that cannot: fail at once."

    def proven(self, via: Any, address: Address, answer: int) -> None:
        "The initiator's probe on this path was answered (by the responder's message C{answer})."

    def nominated(self, via: Any, address: Address) -> None:
        "The responder got the initiator's choice of this path."

    def confirmed(self, via: Any, address: Address) -> None:
        "The initiator's choice was answered: both ends use this path."

    def give_up(self, error: DirectPathError) -> None:
        "The time ran out, or no datagram could be sent at all."

    def stop(self) -> None:
        "The caller ends it: cancels a punch, or ends the keepalive of a punched path."


@dataclass(eq=False)
class _PunchCore:
    """A punch's state and handles; the machine's transitions call its methods."""

    reactor: Any
    main: DatagramSender
    codec: ProbeCodec
    initiator: bool
    plan: _Plan
    sockets: Callable[[], SocketFactory]
    rng: _random.Random
    log: Logger
    timeout: float
    interval: float
    keepalive: float | None
    lan_timeout: float
    birthday_sockets: int
    birthday_rate: float
    spray_limit: int
    spray_rate: float
    stats: PunchStats = field(default_factory=PunchStats)
    inputs: Any = field(default=None, repr=False)
    window: ReplayWindow = field(default_factory=ReplayWindow, repr=False)
    result: Deferred | None = field(default=None, repr=False)
    outcomes: list[tuple[Deferred, Any]] = field(default_factory=list, repr=False)
    depth: int = 0
    started_at: float = 0.0
    rounds: int = 0
    heard: bool = False
    answering: bool = False
    #: counter -> (kind, socket, address) of our recent messages, oldest first
    sent: dict[int, tuple[Kind, Any, Address]] = field(default_factory=dict, repr=False)
    learned: dict[tuple[int, Address], tuple[Any, Address]] = field(default_factory=dict, repr=False)
    birthday: list[PunchSocket] = field(default_factory=list, repr=False)
    birthday_next: int = 0
    spray: list[int] = field(default_factory=list, repr=False)
    spray_next: int = 0
    errors: dict[str, int] = field(default_factory=dict, repr=False)
    chosen: tuple[Any, Address, int] | None = None
    winner: tuple[Any, Address] | None = None
    tick_call: Any = field(default=None, repr=False)
    deadline_call: Any = field(default=None, repr=False)
    resend_call: Any = field(default=None, repr=False)
    keepalive_call: Any = field(default=None, repr=False)

    # Every way in from outside (the caller, the reactor's timers and
    # sockets) goes through run(), so the caller's callbacks on the result
    # run once the machine has settled, never inside a transition.

    def run(self, action: Callable[..., Any], *args: Any) -> Any:
        self.depth += 1
        try:
            return action(*args)
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.notify()

    def notify(self) -> None:
        while self.outcomes:
            d, outcome = self.outcomes.pop(0)
            if d.called:  # cancelled meanwhile
                continue
            if isinstance(outcome, Failure):
                d.errback(outcome)
            else:
                d.callback(outcome)

    @property
    def deadline(self) -> float:
        return min(self.timeout, self.lan_timeout) if self.plan.strategy == LAN else self.timeout

    # -- sending

    def send(self, via: Any, address: Address, kind: Kind, echo: int = 0) -> bool:
        counter, datagram = self.codec.seal(kind, echo)
        try:
            via.sendto(datagram, address)
        except OSError as e:
            # No route, a local firewall, a socket its owner closed: counted,
            # and fatal only if nothing at all can be sent (tick()).
            self.stats.send_errors += 1
            what = e.strerror or type(e).__name__
            if what in self.errors or len(self.errors) < 8:
                self.errors[what] = self.errors.get(what, 0) + 1
            return False
        self.stats.sent += 1
        if kind is not Kind.KEEPALIVE:
            sent = self.sent
            sent[counter] = (kind, via, address)
            if len(sent) > MAX_REMEMBERED:
                del sent[next(iter(sent))]
        return True

    def tick(self) -> None:
        """One round of probes: every target, the learned paths, a batch of birthday sockets and of spray."""
        self.tick_call = None
        self.rounds += 1
        for address in self.plan.targets:
            self.send(self.main, address, Kind.PROBE)
        for via, address in list(self.learned.values()):
            self.send(via, address, Kind.PROBE)
        if self.birthday and self.plan.birthday_target is not None:
            # The first round opens every birthday socket's mapping at once; then they take turns.
            count = len(self.birthday) if self.rounds == 1 else max(1, round(self.birthday_rate * self.interval))
            for _ in range(min(count, len(self.birthday))):
                via = self.birthday[self.birthday_next % len(self.birthday)]
                self.birthday_next += 1
                self.send(via, self.plan.birthday_target, Kind.PROBE)
        if self.plan.spray_host is not None:
            batch = self.spray[self.spray_next : self.spray_next + max(1, round(self.spray_rate * self.interval))]
            self.spray_next += len(batch)
            for port in batch:
                self.send(self.main, (self.plan.spray_host, port), Kind.PROBE)
        if self.rounds >= 3 and self.stats.sent == 0:
            self.inputs.give_up(self.unreachable())
            return
        self.tick_call = self.reactor.callLater(self.interval, self.run, self.tick)

    # -- receiving

    def receive(self, via: Any, datagram: bytes, address: Address) -> None:
        probe = self.codec.open(datagram)
        if probe is None:
            self.stats.ignored += 1
            return
        if not self.window.accept(probe.counter):
            self.stats.replayed += 1
            return
        self.heard = True
        address = (address[0], address[1])
        kind = probe.kind
        if kind is Kind.PROBE:
            if self.may_answer(via, address):
                self.send(via, address, Kind.ANSWER, probe.counter)
                self.learn(via, address)
        elif kind is Kind.ANSWER:
            took = self.took(probe.echo, via, address)
            if took is Kind.PROBE and self.initiator:
                self.inputs.proven(via, address, probe.counter)
            elif took is Kind.CHOSEN:
                self.inputs.confirmed(via, address)
        elif kind is Kind.CHOSEN and not self.initiator:
            if self.took(probe.echo, via, address) is Kind.ANSWER and self.may_answer(via, address):
                self.send(via, address, Kind.ANSWER, probe.counter)
                self.inputs.nominated(via, address)

    def took(self, echo: int, via: Any, address: Address) -> Kind | None:
        """
        The kind of our message C{echo}, if it went from C{via} to
        C{address}: an answer proves the path only the way its probe went.
        """
        record = self.sent.get(echo)
        if record is None or record[1] is not via or record[2] != address:
            self.stats.mismatched += 1
            return None
        return record[0]

    def may_answer(self, via: Any, address: Address) -> bool:
        """While punching, any path; once punched, only the winner's (a late CHOSEN is answered there)."""
        if not self.answering:
            return False
        return self.winner is None or (via is self.winner[0] and address == self.winner[1])

    def learn(self, via: Any, address: Address) -> None:
        """
        The peer's probe came from C{address} to C{via}: probe it back at
        once (its NAT picked that port, so it may be on no list) and every
        round after, so the peer's side of this path gets its answer soon.
        """
        if self.tick_call is None or self.winner is not None:
            return
        key = (id(via), address)
        if key not in self.learned and len(self.learned) < MAX_LEARNED:
            self.learned[key] = (via, address)
            self.send(via, address, Kind.PROBE)

    # -- the transitions' work

    def begin(self) -> Deferred:
        self.result = Deferred(lambda d: self.run(self.inputs.stop))
        self.started_at = self.reactor.seconds()
        self.answering = True
        if self.plan.strategy == BIRTHDAY:
            self.open_birthday_sockets()
        if self.plan.spray_host is not None:
            self.spray = self.rng.sample(SPRAY_PORTS, min(self.spray_limit, len(SPRAY_PORTS)))
        self.log.debug(
            "punching ({strategy}, {role}) to {count} address(es) for {deadline:g} s",
            strategy=self.plan.strategy,
            role="initiator" if self.initiator else "responder",
            count=len(self.plan.targets),
            deadline=self.deadline,
        )
        self.deadline_call = self.reactor.callLater(self.deadline, self.run, self.expire)
        self.tick_call = self.reactor.callLater(0, self.run, self.tick)
        return self.result

    def open_birthday_sockets(self) -> None:
        factory = self.sockets()
        for _ in range(self.birthday_sockets):
            try:
                opened = factory.open(self.receive_birthday)
            except OSError as e:
                self.log.info(
                    "opened only {count} birthday sockets of {wanted} ({why})",
                    count=len(self.birthday),
                    wanted=self.birthday_sockets,
                    why=e.strerror or e,
                )
                break
            self.birthday.append(opened)
        self.stats.sockets_opened = len(self.birthday)

    def receive_birthday(self, via: PunchSocket, datagram: bytes, address: Address) -> None:
        if is_probe(datagram):
            self.run(self.receive, via, datagram, address)

    def refused(self, error: DirectPathError) -> Deferred:
        self.log.info("{why}", why=str(error))
        return fail(error)

    def nominate(self, via: Any, address: Address, answer: int) -> None:
        self.stop_probing(keep=via)
        self.chosen = (via, address, answer)
        self.resend_chosen()

    def resend_chosen(self) -> None:
        """The initiator names its path until the responder answers (or the time runs out)."""
        self.resend_call = None
        via, address, answer = self.chosen
        self.send(via, address, Kind.CHOSEN, answer)
        self.resend_call = self.reactor.callLater(self.interval, self.run, self.resend_chosen)

    def connect(self, via: Any, address: Address) -> None:
        self.stop_probing(keep=via)
        self.cancel("resend_call", "deadline_call")
        self.winner = (via, address)
        if via is self.main:
            sock, new = self.main, False
        else:
            self.birthday.remove(via)
            sock, new = via.release(), True
        seconds = self.reactor.seconds() - self.started_at
        self.log.info(
            "punched a direct path to {peer} in {seconds:.3f} s ({strategy}, {socket})",
            peer=f"{address[0]}:{address[1]}",
            seconds=seconds,
            strategy=self.plan.strategy,
            socket="a birthday socket" if new else "the given socket",
        )
        self.outcomes.append((self.result, PunchedPath(address, sock, new, self.plan.strategy, seconds)))
        if self.keepalive:
            self.keepalive_call = self.reactor.callLater(self.keepalive, self.run, self.keep_alive)

    def keep_alive(self) -> None:
        """Refresh both NATs' mappings of the punched path; ends when the socket is closed."""
        self.keepalive_call = None
        via, address = self.winner
        if self.send(via, address, Kind.KEEPALIVE):
            self.keepalive_call = self.reactor.callLater(self.keepalive, self.run, self.keep_alive)
        else:
            self.log.debug("keepalive of the punched path ended: its socket no longer sends")

    def expire(self) -> None:
        self.deadline_call = None
        self.inputs.give_up(self.expired())

    def fail(self, reason: DirectPathError | CancelledError) -> None:
        self.stop_probing(keep=None)
        self.cancel("resend_call", "deadline_call")
        self.answering = False
        if isinstance(reason, DirectPathError):
            self.log.info("{why}", why=str(reason))
        self.outcomes.append((self.result, Failure(reason)))

    def end(self) -> None:
        self.cancel("keepalive_call")
        self.answering = False

    def stop_probing(self, keep: Any) -> None:
        """Stop the rounds and close every birthday socket but C{keep}."""
        self.cancel("tick_call")
        self.learned.clear()
        self.spray = []
        for opened in self.birthday:
            if opened is not keep:
                opened.close()
        self.birthday = [keep] if keep is not None and keep in self.birthday else []

    def cancel(self, *names: str) -> None:
        for name in names:
            call = getattr(self, name)
            setattr(self, name, None)
            if call is not None and call.active():
                call.cancel()

    # -- why it failed, in words the user can act on

    def expired(self) -> DirectPathError:
        seconds = f"{self.deadline:g} s"
        if self.plan.hopeless is not None:
            code, why = self.plan.hopeless
            return DirectPathError(
                f"no direct path: {why}, and the peer's LAN addresses did not answer within {seconds}{_RELAY}", code
            )
        count = len(self.plan.targets)
        hint = ""
        if self.plan.strategy in (BIRTHDAY, SPRAY):
            hint = "; a symmetric NAT's port was searched for and not found"
        if not self.heard:
            return DirectPathError(
                f"no direct path: no answer from the peer within {seconds} on any of its {count} address(es)"
                f"{hint}: a firewall on either side may drop UDP, or the peer stopped punching{_RELAY}",
                "no-answer",
            )
        return DirectPathError(
            f"no direct path: the peer's probes arrived but no path carried ours back within {seconds}"
            f"{hint}: a firewall may let UDP through one way only{_RELAY}",
            "one-way",
        )

    def unreachable(self) -> DirectPathError:
        errors = ", ".join(sorted(self.errors)) or "no datagram sent"
        return DirectPathError(
            f"no direct path: every one of the peer's {len(self.plan.targets)} address(es) failed, "
            f"no datagram could be sent ({errors}): this host has no UDP route to them{_RELAY}",
            "unreachable",
        )


_punch = TypeMachineBuilder(_Inputs, _PunchCore)
_IDLE = _punch.state("idle")
_PUNCHING = _punch.state("punching")
_NOMINATING = _punch.state("nominating")
_CONNECTED = _punch.state("connected")
_DONE = _punch.state("done")
_transitions = Transitions(_Inputs)
_on = _transitions.upon


@_on(_IDLE, _Inputs.start).to(_PUNCHING)
def _start(inputs: _Inputs, core: _PunchCore) -> Deferred:
    return core.begin()


@_on(_IDLE, _Inputs.refuse).to(_DONE)
def _refuse(inputs: _Inputs, core: _PunchCore, error: DirectPathError) -> Deferred:
    return core.refused(error)


@_on(_PUNCHING, _Inputs.proven).to(_NOMINATING)
def _nominate(inputs: _Inputs, core: _PunchCore, via: Any, address: Address, answer: int) -> None:
    core.nominate(via, address, answer)


@_on(_PUNCHING, _Inputs.nominated).to(_CONNECTED)
@_on(_NOMINATING, _Inputs.confirmed).to(_CONNECTED)
def _connect(inputs: _Inputs, core: _PunchCore, via: Any, address: Address) -> None:
    core.connect(via, address)


@_on(_PUNCHING, _Inputs.give_up).to(_DONE)
@_on(_NOMINATING, _Inputs.give_up).to(_DONE)
def _give_up(inputs: _Inputs, core: _PunchCore, error: DirectPathError) -> None:
    core.fail(error)


@_on(_PUNCHING, _Inputs.stop).to(_DONE)
@_on(_NOMINATING, _Inputs.stop).to(_DONE)
def _cancel(inputs: _Inputs, core: _PunchCore) -> None:
    core.fail(CancelledError())


@_on(_CONNECTED, _Inputs.stop).to(_DONE)
def _end(inputs: _Inputs, core: _PunchCore) -> None:
    core.end()


@_on(_IDLE, _Inputs.stop).to(_DONE)
def _never_started(inputs: _Inputs, core: _PunchCore) -> None:
    pass


# An answer that lost a race with the first one, a nomination repeated
# after the path was taken, a deadline or a stop after the end: nothing
# changes.  (start and refuse are fed once, in idle, by HolePunch.start.)
_transitions.ignore_the_rest(
    (_IDLE, _PUNCHING, _NOMINATING, _CONNECTED, _DONE),
    ("proven", "nominated", "confirmed", "give_up", "stop"),
)

_PunchMachine = _punch.build()


@implementer(IDatagramHandler)
class HolePunch:
    """
    One attempt to punch a direct UDP path to a peer, and, once punched,
    the keepalive that holds the NATs' mappings open.

    Both peers create one at the same moment (signaled through the relay),
    with the same punch key and opposite C{initiator} flags, and call
    L{start}.  Its life::

        idle --start--> punching --initiator: a probe answered--> nominating
                           |  responder: the initiator's choice        | its answer
                           v                                           v
                        connected <------------------------------------+
        punching, nominating --time out, cancel or stop--> done
        connected --stop--> done (the keepalive ends)

    @param reactor: provides C{callLater} and C{seconds}; and, if birthday
        sockets are needed without a C{sockets} factory, C{addReader}.
    @param socket: the UDP socket whose public address the peer was told;
        its owner reads it and passes probes to L{datagramReceived}.
    @param key: the 32-byte punch key both peers derived from their
        end-to-end session; a fresh one for each attempt.
    @param initiator: whether this side is the session's initiator (the
        other side must pass the opposite): the initiator picks the path.
    @param local_nat: this side's NAT class: L{OPEN}, L{CONE}, L{SYMMETRIC},
        L{BLOCKED} or L{UNKNOWN} (L{pluresync.direct.nat.classify_nat}'s
        string, or a signal's L{NatClass}).
    @param peer_nat: the peer's NAT class, as its offer or answer says.
    @param candidates: the peer's addresses (its signal's L{Candidate}s:
        host and reflexive ones are probed, LAN TCP ones skipped).
    @param timeout: seconds before giving up (L{DirectPathError}).
    @param interval: seconds between rounds of probes.
    @param keepalive: seconds between keepalives once punched (C{None} or 0: none).
    @param lan_timeout: seconds to try the peer's host addresses when only
        they can work (both NATs symmetric, or UDP blocked).
    @param birthday_sockets: how many sockets a symmetric side opens.
    @param birthday_rate: birthday probes per second after the first round.
    @param spray_limit: how many random ports a cone side probes, at most.
    @param spray_rate: spray probes per second.
    @param sockets: opens the birthday sockets (L{UdpSockets} on C{reactor} if not given).
    @param random: the source of the spray's ports.
    """

    _log = Logger()

    def __init__(
        self,
        reactor: Any,
        socket: DatagramSender,
        key: bytes,
        *,
        initiator: bool,
        local_nat: str | NatClass,
        peer_nat: str | NatClass,
        candidates: Iterable[Candidate],
        timeout: float = 10.0,
        interval: float = 0.1,
        keepalive: float | None = 15.0,
        lan_timeout: float = 1.0,
        birthday_sockets: int = 256,
        birthday_rate: float = 250.0,
        spray_limit: int = 2000,
        spray_rate: float = 500.0,
        sockets: SocketFactory | None = None,
        random: _random.Random | None = None,
        log: Logger | None = None,
    ) -> None:
        local_nat, peer_nat = _nat_name(local_nat), _nat_name(peer_nat)
        for name, value in (("timeout", timeout), ("interval", interval), ("lan_timeout", lan_timeout)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, not {value!r}")
        if not 0 <= birthday_sockets <= 1024 or not 0 <= spray_limit <= len(SPRAY_PORTS):
            raise ValueError("birthday_sockets must be in 0..1024 and spray_limit in 0..64512")
        log = log if log is not None else self._log
        codec = ProbeCodec(key, Role.INITIATOR if initiator else Role.RESPONDER)
        plan = _plan(local_nat, peer_nat, _usable(candidates, log))
        self._refusal = plan if isinstance(plan, DirectPathError) else None
        core = _PunchCore(
            reactor,
            socket,
            codec,
            initiator,
            plan if isinstance(plan, _Plan) else _Plan(LAN, ()),
            (lambda: sockets) if sockets is not None else (lambda: UdpSockets(reactor)),
            random if random is not None else _random.Random(),
            log,
            timeout,
            interval,
            keepalive,
            lan_timeout,
            birthday_sockets if isinstance(plan, _Plan) and plan.strategy == BIRTHDAY else 0,
            birthday_rate,
            spray_limit,
            spray_rate,
        )
        self._core = core
        self._machine = _PunchMachine(core)
        core.inputs = self._machine
        self._started = False
        self._stopped = False

    @property
    def strategy(self) -> str | None:
        """How this punch goes about it (L{SIMULTANEOUS}, L{BIRTHDAY}, L{SPRAY}, L{LAN}); C{None} if it cannot."""
        return None if self._refusal is not None else self._core.plan.strategy

    @property
    def stats(self) -> PunchStats:
        """Counts of what was sent, dropped and opened so far."""
        return self._core.stats

    def start(self) -> Deferred[PunchedPath]:
        """
        Begin probing; fires with the L{PunchedPath} both ends agreed on, or
        fails with L{DirectPathError} (why) or C{CancelledError} (the
        Deferred was cancelled, or L{stop} was called).  Call it once.
        """
        if self._started:
            raise RuntimeError("a HolePunch runs once: make a new one (with a new key) to try again")
        self._started = True
        if self._stopped:
            return fail(CancelledError())
        if self._refusal is not None:
            return self._core.run(self._machine.refuse, self._refusal)
        return self._core.run(self._machine.start)

    def datagramReceived(self, datagram: bytes, addr: Address) -> bool:
        """
        A datagram the owner read from the socket given to this punch (once
        punched: from the punched path's socket, L{PunchedPath.socket},
        which may be a birthday socket).  Keep offering them after the
        punch: the peer may repeat its choice until it hears our answer.

        @return: whether it is a probe (L{is_probe}): taken, or dropped as
            not the peer's; C{False} for anything else (STUN, QUIC).
        """
        if not is_probe(datagram):
            return False
        core = self._core
        via = core.main if core.winner is None else core.winner[0]
        core.run(core.receive, via, datagram, addr)
        return True

    def stop(self) -> None:
        """
        End it: a punch under way fails with C{CancelledError} and closes
        its sockets; a punched path's keepalive stops; one not started yet
        never will.  Idempotent.
        """
        self._stopped = True
        self._core.run(self._machine.stop)


# -- birthday sockets on a real reactor ------------------------------------------


class UdpSockets:
    """
    Opens birthday sockets: IPv4 UDP sockets on ports the system picks,
    non-blocking and read by C{reactor} (an C{IReactorFDSet}) directly, so
    256 of them cost no Twisted port objects and no log lines.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor

    def open(self, receive: Callable[[PunchSocket, bytes, Address], None]) -> _ReadingSocket:
        sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.bind(("0.0.0.0", 0))
        except OSError:
            sock.close()
            raise
        reading = _ReadingSocket(self._reactor, sock, receive)
        self._reactor.addReader(reading)
        return reading


@implementer(IReadDescriptor)
class _ReadingSocket:
    """A birthday socket: read by the reactor until closed or released to the caller."""

    def __init__(self, reactor: Any, sock: _socket.socket, receive: Callable[..., None]) -> None:
        self._reactor = reactor
        self._sock = sock
        self._receive = receive
        self._reading = True

    def fileno(self) -> int:
        return self._sock.fileno()

    def logPrefix(self) -> str:
        return "HolePunch"

    def doRead(self) -> None:
        for _ in range(_READS_PER_TURN):
            if not self._reading:
                return
            try:
                datagram, address = self._sock.recvfrom(2048)
            except OSError:
                # Nothing left (EAGAIN), or an ICMP error for an earlier
                # probe (ECONNREFUSED): neither is news to a punch.
                return
            self._receive(self, datagram, address[:2])

    def connectionLost(self, reason: Failure) -> None:
        self._stop_reading()

    def sendto(self, data: bytes, address: Address) -> int:
        return self._sock.sendto(data, address)

    def getsockname(self) -> Address:
        return self._sock.getsockname()

    def close(self) -> None:
        self._stop_reading()
        self._sock.close()

    def release(self) -> _socket.socket:
        self._stop_reading()
        return self._sock

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self)
