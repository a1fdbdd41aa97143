"""
The owner of one UDP socket that several users share (L{IDatagramSocket}).

The direct path sends STUN requests, hole-punch probes and then QUIC from
one local port, because a NAT's mapping belongs to that port: whoever reads
the socket must hand each datagram to the user it is for.  L{UDPSocket}
does it by the first byte (RFC 9443): QUIC packets have the fixed bit
C{0x40} set and go to the attached QUIC receivers; anything else goes to
C{other} (the punching code's handler), or is counted and dropped.

It writes through the socket itself rather than C{udp.Port.write}, which
checks and re-parses the address of every datagram: on QUIC's hot path
(tens of thousands of datagrams a second) that check is a measurable share
of the CPU (bench/quicpipe.py prints both).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence

from twisted.internet.protocol import DatagramProtocol
from zope.interface import implementer

from pluresync.interfaces import IDatagramReceiver, IDatagramSocket

#: A peer's address as Twisted reports it: C{(host, port)}.
Address = tuple[str, int]

#: Kernel buffer sizes asked for: a burst of QUIC datagrams at loopback or
#: LAN speed overflows the default (about 200 KiB) before the reactor reads.
SOCKET_BUFFER = 8 * 1024 * 1024
#: The QUIC fixed bit (RFC 9000 17.2, 17.3), which RFC 9443 demultiplexes on.
QUIC_FIXED_BIT = 0x40


def is_quic(data: bytes) -> bool:
    """Whether a datagram read from a shared socket is for QUIC (RFC 9443's first-byte rule)."""
    return bool(data) and bool(data[0] & QUIC_FIXED_BIT)


@implementer(IDatagramSocket)
class UDPSocket(DatagramProtocol):
    """
    Reads one UDP port and shares it: QUIC datagrams to the attached
    receivers, the rest to C{other}.

    Listen with C{reactor.listenUDP(port, UDPSocket(...), interface=...)};
    a port of its own (tests, a LAN candidate) or the one the punching code
    punched with.

    @ivar unclaimed: datagrams nobody took (no receiver attached, or not QUIC
        and no C{other}).
    @ivar refused: datagrams the kernel would not send (full buffer, an ICMP
        error reported on the socket); QUIC resends what it needs.
    """

    def __init__(self, other: Callable[[bytes, Address], None] | None = None) -> None:
        self._other = other
        self._receivers: list[IDatagramReceiver] = []
        self._sendto: Callable[[bytes, Address], int] | None = None
        self.unclaimed = 0
        self.refused = 0

    def startProtocol(self) -> None:
        handle = self.transport.getHandle()
        for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                handle.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:  # capped by the system: the default still works, only slower
                pass
        self._sendto = handle.sendto

    def stopProtocol(self) -> None:
        self._sendto = None

    def datagramReceived(self, data: bytes, addr: Address) -> None:
        if data and data[0] & QUIC_FIXED_BIT:
            if not self._receivers:
                self.unclaimed += 1
            elif len(self._receivers) == 1:
                self._receivers[0].datagramReceived(data, addr)
            else:
                for receiver in tuple(self._receivers):
                    receiver.datagramReceived(data, addr)
        elif self._other is not None:
            self._other(data, addr)
        else:
            self.unclaimed += 1

    # IDatagramSocket

    def sendDatagrams(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        sendto = self._sendto
        if sendto is None:  # not listening (yet, or any more): the network lost them
            return
        for index, (data, addr) in enumerate(datagrams):
            try:
                sendto(data, addr)
            except BlockingIOError:
                # The kernel's buffer is full: the rest of this batch would
                # fail the same way; QUIC counts them lost and slows down.
                self.refused += len(datagrams) - index
                return
            except OSError:
                self.refused += 1

    def attach(self, receiver: IDatagramReceiver) -> None:
        if receiver not in self._receivers:
            self._receivers.append(receiver)

    def detach(self, receiver: IDatagramReceiver) -> None:
        if receiver in self._receivers:
            self._receivers.remove(receiver)
