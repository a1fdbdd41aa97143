"""
The owner of one UDP socket that several users share (L{IDatagramSocket}).

The direct path sends STUN requests, hole-punch probes and then QUIC from
one local port, because a NAT's mapping belongs to that port: whoever reads
the socket must hand each datagram to the user it is for.  L{UDPSocket}
does it by the first byte (RFC 9443): QUIC packets have the fixed bit
C{0x40} set and go to the attached QUIC receivers; anything else goes to
C{other} (the punching code's handler), or is counted and dropped.

It writes through the socket itself rather than C{udp.Port.write}, which
checks the address of every datagram, and, where the kernel offers UDP
segmentation offload (Linux's C{UDP_SEGMENT}, "GSO"), sends each run of
equal-sized datagrams to one address in one system call: QUIC sends tens
of thousands of datagrams a second, and the system call is most of their
cost (bench/quicpipe.py times each way).  Where GSO is refused, it falls
back to one C{sendto} a datagram, for good.
"""

from __future__ import annotations

import errno
import socket
import struct
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
#: Linux's UDP_SEGMENT socket option (linux/udp.h), for the kernels whose
#: Python does not name it.
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)
#: Most segments in one GSO send (the kernel's limit is 64, and 64 KiB in all).
MAX_SEGMENTS = 64
MAX_GSO_BYTES = 65000
#: What a kernel or device without GSO answers.
_NO_GSO = {errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP}
_SEGMENT_SIZE = struct.Struct("=H")


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
    @ivar gso: whether runs of datagrams go out in one system call (until
        the kernel refuses it once).
    """

    def __init__(self, other: Callable[[bytes, Address], None] | None = None, *, gso: bool = True) -> None:
        self._other = other
        self._receivers: list[IDatagramReceiver] = []
        self._sendto: Callable[[bytes, Address], int] | None = None
        self._sendmsg: Callable[..., int] | None = None
        self.gso = gso and hasattr(socket.socket, "sendmsg")
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
        self._sendmsg = handle.sendmsg if self.gso else None

    def stopProtocol(self) -> None:
        self._sendto = None
        self._sendmsg = None

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
        if self._sendto is None:  # not listening (yet, or any more): the network lost them
            return
        if self._sendmsg is not None and len(datagrams) > 1:
            self._sendSegmented(datagrams)
        else:
            self._sendEach(datagrams)

    def _sendSegmented(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        """Each run of equal-sized datagrams to one address (a shorter last one may end it) in one sendmsg."""
        sendmsg, count, start = self._sendmsg, len(datagrams), 0
        while start < count:
            data, addr = datagrams[start]
            size = len(data)
            limit = min(count, start + MAX_SEGMENTS, start + MAX_GSO_BYTES // max(size, 1))
            end = start + 1
            while end < limit and datagrams[end][1] == addr and len(datagrams[end][0]) == size:
                end += 1
            if end < limit and datagrams[end][1] == addr and len(datagrams[end][0]) < size:
                end += 1
            try:
                if end - start == 1:
                    self._sendto(data, addr)
                else:
                    segments = [(socket.SOL_UDP, UDP_SEGMENT, _SEGMENT_SIZE.pack(size))]
                    sendmsg([b"".join([d for d, _ in datagrams[start:end]])], segments, 0, addr)
            except BlockingIOError:
                self.refused += count - start
                return
            except OSError as e:
                if e.errno in _NO_GSO and end - start > 1:
                    # This kernel or device cannot: one datagram at a time from now on.
                    self._sendmsg = None
                    self.gso = False
                    self._sendEach(datagrams[start:])
                    return
                self.refused += end - start
            start = end

    def _sendEach(self, datagrams: Sequence[tuple[bytes, Address]]) -> None:
        sendto = self._sendto
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
