"""
A STUN server: tells each UDP client the address its datagrams come from.

The relay host runs it (C{twist pluresync-relay --udp-port N}) so a peer
behind a NAT learns its public address without depending on a third party;
any RFC 8489 client can use it.  It answers Binding requests only, with
nothing but what the client asked (XOR-MAPPED-ADDRESS, FINGERPRINT if the
request had one), so a spoofed request makes it send one small datagram,
never several or a large one.  It keeps no state per client: memory does
not grow with traffic.
"""

from __future__ import annotations

from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from pluresync.direct.stun import (
    BINDING,
    MessageClass,
    decode,
    encode_binding_error,
    encode_binding_success,
    is_stun,
    udp_address,
)
from pluresync.errors import StunFormatError

log = Logger(namespace="pluresync.direct.stunserver")

#: Larger datagrams are not parsed: a Binding request is 20 to a few hundred
#: bytes, and 1280 (IPv6's minimum MTU) bounds the work one datagram costs.
MAX_REQUEST = 1280


def binding_reply(datagram: bytes, source: tuple) -> bytes | None:
    """
    What a STUN server sends back for C{datagram} from C{source}, or
    C{None} to stay silent.

     - a well-formed Binding request: a success response with C{source} as
       XOR-MAPPED-ADDRESS (FINGERPRINT if the request carried one);
     - one with comprehension-required attributes this server does not
       know (e.g. RFC 5780's CHANGE-REQUEST or RESPONSE-PORT): a 420 error
       listing them, as RFC 8489 section 6.3.1 requires;
     - anything else (not STUN, malformed, indications, responses, other
       methods, oversized): nothing.
    """
    if len(datagram) > MAX_REQUEST or not is_stun(datagram):
        return None
    try:
        message = decode(datagram)
        address = udp_address(source)
    except (StunFormatError, ValueError):
        return None
    if message.method != BINDING or message.message_class != MessageClass.REQUEST:
        return None
    unknown = message.unknown_required
    if unknown:
        return encode_binding_error(
            message.transaction_id, 420, "Unknown Attribute", unknown=unknown, fingerprint=message.fingerprint
        )
    return encode_binding_success(message.transaction_id, address, fingerprint=message.fingerprint)


class StunServer(DatagramProtocol):
    """
    L{binding_reply} on a UDP port.  No log line per datagram (a flood
    would become a log flood); the counters say what it did.

    @ivar answered: datagrams answered.
    @ivar ignored: datagrams dropped without an answer.
    @ivar unsent: answers the socket refused (its buffer full, no route).
    """

    noisy = False

    def __init__(self) -> None:
        self.answered = 0
        self.ignored = 0
        self.unsent = 0

    def datagramReceived(self, datagram: bytes, addr: tuple) -> None:
        try:
            reply = binding_reply(datagram, addr)
        except Exception:  # a bug must not stop the port; say so once per datagram
            log.failure("STUN server: unexpected error on a datagram")
            reply = None
        if reply is None:
            self.ignored += 1
            return
        try:
            self.transport.write(reply, addr)
        except Exception:
            self.unsent += 1
            return
        self.answered += 1
