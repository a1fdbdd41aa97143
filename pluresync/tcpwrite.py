"""
Writing to a TCP transport at once, when nothing waits in its buffer.

Twisted's C{write} and C{writeSequence} buffer: the bytes leave in a later
reactor turn, after an C{epoll_ctl} to watch the socket for writing, another
C{epoll_wait}, the C{send} of the buffer joined into one string, and an
C{epoll_ctl} to stop watching.  For a relay forwarding a 64-byte message
that is most of its work and of its latency; for a 64 KiB frame it adds a
copy (the join of header and payload).  When the transport holds nothing
yet, L{send_now} gathers the pieces into one C{sendmsg} in the same turn,
and hands Twisted only what the socket did not take: order, flow control
(a registered producer is paused past C{bufferSize}) and the handling of a
broken connection stay Twisted's.

This reads state Twisted keeps on its C{FileDescriptor} without a public
API (C{dataBuffer}, C{offset}, C{_tempDataLen}, C{_writeDisconnected}),
checked by C{tests/test_tcpwrite.py}; any other transport (TLS, a proxy
wrapper, a test transport) gets a plain C{writeSequence}.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.tcp import Connection

#: At most this many pieces per C{sendmsg} (Linux's C{IOV_MAX} is 1,024);
#: more are joined first (many tiny frames in one read).
MAX_PIECES = 512


def send_now(transport: Any, pieces: list[bytes]) -> None:
    """Write C{pieces} (bytes) to C{transport}: at once if its buffer is empty, else after what it holds."""
    if (
        not isinstance(transport, Connection)
        or transport._tempDataLen
        or transport.offset != len(transport.dataBuffer)
        or not transport.connected
        or transport.disconnecting
        or transport._writeDisconnected
    ):
        transport.writeSequence(pieces)
        return
    if len(pieces) > MAX_PIECES:
        pieces = [b"".join(pieces)]
    try:
        sent = transport.socket.sendmsg(pieces)
    except (BlockingIOError, InterruptedError):
        sent = 0
    except OSError:
        # Broken: Twisted's own write finds it and ends the connection.
        transport.writeSequence(pieces)
        return
    for index, piece in enumerate(pieces):
        if sent < len(piece):
            rest = pieces[index:]
            if sent:
                rest[0] = piece[sent:]
            transport.writeSequence(rest)
            return
        sent -= len(piece)
