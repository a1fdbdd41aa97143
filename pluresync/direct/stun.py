"""
STUN Binding messages (RFC 8489, which obsoletes RFC 5389), sans I/O.

The direct path needs one fact from outside the NAT: the public address and
port a UDP socket is seen from (its I{mapped address}).  A STUN Binding
request asks any STUN server for it (the relay host's own, see
L{pluresync.direct.stunserver}, or a public one), so this module speaks the
standard format rather than a private echo.  Only what that use needs is
here: encoding Binding requests and responses, and decoding any STUN
message strictly; no credentials, no TURN, no RFC 5780 behaviour tests.

Demultiplexing.  The hole-punching socket carries three protocols: STUN,
the direct path's own probes, and QUIC.  They are told apart by the first
byte of a datagram (the scheme of RFC 7983 and RFC 9443):

  - C{0x00}-C{0x3F}: STUN (a STUN message starts with two zero bits and
    has the magic cookie C{0x2112A442} at bytes 4-7; L{is_stun});
  - C{0x40} bit set: QUIC (every QUIC v1 packet has the fixed bit C{0x40});
  - C{0x80}-C{0xBF}: the direct path's probes.  Probes MUST start with a
    byte in this range (first bit set, C{0x40} bit clear), never with a byte
    below C{0x40}, or a probe could be taken for STUN and a STUN answer for a
    probe.

Decoding never trusts the network: L{decode} raises L{StunFormatError}
(with a reason for a debug log) for anything malformed, and the protocols
built on it catch that, so a foreign datagram is dropped, never an exception
in the reactor.
"""

from __future__ import annotations

import ipaddress
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

from pluresync.errors import StunFormatError

#: The magic cookie (RFC 8489 section 5): tells STUN from RFC 3489's format
#: and from other protocols on the same port; XOR-MAPPED-ADDRESS is masked
#: with it.
MAGIC_COOKIE = 0x2112A442
_COOKIE = MAGIC_COOKIE.to_bytes(4, "big")
HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12

#: The Binding method, the only one pluresync uses.
BINDING = 0x001

# Attribute types (RFC 8489 section 18.3, RFC 5780 section 7).
MAPPED_ADDRESS = 0x0001
USERNAME = 0x0006
MESSAGE_INTEGRITY = 0x0008
ERROR_CODE = 0x0009
UNKNOWN_ATTRIBUTES = 0x000A
REALM = 0x0014
NONCE = 0x0015
MESSAGE_INTEGRITY_SHA256 = 0x001C
PASSWORD_ALGORITHM = 0x001D
USERHASH = 0x001E
XOR_MAPPED_ADDRESS = 0x0020
SOFTWARE = 0x8022
FINGERPRINT = 0x8028

#: The comprehension-required attributes (type < 0x8000) this codec knows.
#: The credential attributes are known but unused: STUN for NAT discovery
#: (RFC 8489 section 13) runs without authentication, and a 401 answer is
#: reported as such rather than as an unknown attribute.  Everything else
#: below 0x8000 (e.g. RFC 5780's CHANGE-REQUEST and RESPONSE-PORT, which
#: ask a server to answer from or to another port) is unknown: a request
#: carrying one gets a 420, a response carrying one fails its transaction.
KNOWN_REQUIRED = frozenset(
    {
        MAPPED_ADDRESS,
        USERNAME,
        MESSAGE_INTEGRITY,
        ERROR_CODE,
        UNKNOWN_ATTRIBUTES,
        REALM,
        NONCE,
        MESSAGE_INTEGRITY_SHA256,
        PASSWORD_ALGORITHM,
        USERHASH,
        XOR_MAPPED_ADDRESS,
    }
)

_FINGERPRINT_XOR = 0x5354554E
_FAMILY_IPV4 = 0x01
_FAMILY_IPV6 = 0x02
_HEADER = struct.Struct("!HHI12s")
_ATTRIBUTE = struct.Struct("!HH")


class MessageClass(IntEnum):
    """The class bits of a STUN message type."""

    REQUEST = 0b00
    INDICATION = 0b01
    SUCCESS = 0b10
    ERROR = 0b11


class UdpAddress(NamedTuple):
    """
    A UDP address as Twisted's C{datagramReceived}/C{write} use it: a
    normalised IP literal and a port.  A tuple, so it can be passed to
    C{transport.write} as is.
    """

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def udp_address(addr: tuple) -> UdpAddress:
    """
    The L{UdpAddress} of a Twisted datagram address (C{(host, port)}, or the
    4-tuple of an IPv6 socket), with an IPv4-mapped IPv6 address (a
    dual-stack socket's view of an IPv4 peer) given as the IPv4 address.

    @raise ValueError: C{host} is not an IP literal, or the port is out of range.
    """
    host, port = addr[0], addr[1]
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port {port!r} out of range")
    return UdpAddress(str(ip), port)


@dataclass(frozen=True, slots=True)
class StunMessage:
    """
    A decoded STUN message.

    @ivar attributes: C{(type, value)} pairs in wire order, padding removed;
        FINGERPRINT (checked by L{decode}) and attributes that RFC 8489 says
        to ignore after MESSAGE-INTEGRITY are left out.
    @ivar fingerprint: whether it carried a (valid) FINGERPRINT.
    """

    method: int
    message_class: MessageClass
    transaction_id: bytes
    attributes: tuple[tuple[int, bytes], ...] = ()
    fingerprint: bool = False

    def get(self, kind: int) -> bytes | None:
        """The value of the first attribute of type C{kind}, or C{None}."""
        for attribute, value in self.attributes:
            if attribute == kind:
                return value
        return None

    @property
    def unknown_required(self) -> tuple[int, ...]:
        """The comprehension-required attribute types this codec does not know, in order, once each."""
        unknown: list[int] = []
        for attribute, _ in self.attributes:
            if attribute < 0x8000 and attribute not in KNOWN_REQUIRED and attribute not in unknown:
                unknown.append(attribute)
        return tuple(unknown)


def new_transaction_id() -> bytes:
    """96 random bits: an off-path sender cannot guess them, so cannot forge an answer."""
    return os.urandom(TRANSACTION_ID_SIZE)


def is_stun(datagram: bytes) -> bool:
    """
    Whether C{datagram} claims to be STUN: at least a header long, the first
    two bits zero, and the magic cookie in place.  This is the
    demultiplexing test for a shared socket (see the module docstring); a
    datagram that passes may still be malformed (L{decode} says why).
    """
    return len(datagram) >= HEADER_SIZE and datagram[0] < 0x40 and datagram[4:8] == _COOKIE


def message_type(method: int, message_class: MessageClass) -> int:
    """The 14-bit message type: the method's bits with the two class bits interleaved (RFC 8489 section 5)."""
    if not 0 <= method <= 0xFFF:
        raise ValueError(f"STUN method {method:#x} out of range")
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((message_class & 1) << 4)
        | ((message_class & 2) << 7)
    )


def _split_type(kind: int) -> tuple[int, MessageClass]:
    method = (kind & 0x000F) | ((kind & 0x00E0) >> 1) | ((kind & 0x3E00) >> 2)
    return method, MessageClass(((kind >> 4) & 1) | ((kind >> 7) & 2))


def _fingerprint(data: bytes) -> int:
    return zlib.crc32(data) ^ _FINGERPRINT_XOR


def encode(
    method: int,
    message_class: MessageClass,
    transaction_id: bytes,
    attributes: Iterable[tuple[int, bytes]] = (),
    *,
    fingerprint: bool = False,
) -> bytes:
    """
    A STUN message: header, attributes (each padded to 4 bytes with zeros)
    and, with C{fingerprint}, a FINGERPRINT attribute last.
    """
    if len(transaction_id) != TRANSACTION_ID_SIZE:
        raise ValueError(f"a STUN transaction id is {TRANSACTION_ID_SIZE} bytes, not {len(transaction_id)}")
    body = bytearray()
    for kind, value in attributes:
        if len(value) > 0xFFFF:
            raise ValueError(f"STUN attribute {kind:#06x} is too long ({len(value)} bytes)")
        body += _ATTRIBUTE.pack(kind, len(value)) + value + bytes(-len(value) % 4)
    length = len(body) + (8 if fingerprint else 0)
    if length > 0xFFFF - HEADER_SIZE:
        raise ValueError(f"STUN message too long ({length} bytes of attributes)")
    message = _HEADER.pack(message_type(method, message_class), length, MAGIC_COOKIE, transaction_id) + body
    if fingerprint:
        message += _ATTRIBUTE.pack(FINGERPRINT, 4) + struct.pack("!I", _fingerprint(message))
    return bytes(message)


def decode(datagram: bytes) -> StunMessage:
    """
    Decode and check one STUN message.

    Checked: the header (two zero bits, the magic cookie, a length that is a
    multiple of 4 and matches the datagram exactly), every attribute inside
    the message, FINGERPRINT (last, and correct) when present.  Unknown
    attributes are kept: whether they matter depends on the message (see
    L{StunMessage.unknown_required}).

    @raise StunFormatError: with the reason, for anything else.
    """
    size = len(datagram)
    if size < HEADER_SIZE:
        raise StunFormatError(f"{size} bytes, shorter than a STUN header")
    kind, length, cookie, transaction_id = _HEADER.unpack_from(datagram)
    if kind & 0xC000:
        raise StunFormatError(f"first byte {datagram[0]:#04x}: not STUN (its first two bits are zero)")
    if cookie != MAGIC_COOKIE:
        raise StunFormatError(f"magic cookie {cookie:#010x}, not {MAGIC_COOKIE:#010x} (RFC 3489 or not STUN)")
    if length % 4:
        raise StunFormatError(f"length {length} is not a multiple of 4")
    if HEADER_SIZE + length != size:
        raise StunFormatError(f"length field says {length} bytes of attributes, the datagram has {size - HEADER_SIZE}")
    method, message_class = _split_type(kind)
    attributes: list[tuple[int, bytes]] = []
    fingerprint = False
    integrity = 0  # 0: none yet; MESSAGE_INTEGRITY or MESSAGE_INTEGRITY_SHA256: the last one seen
    offset = HEADER_SIZE
    while offset < size:
        if fingerprint:
            raise StunFormatError("an attribute follows FINGERPRINT (it must be last)")
        # The length is a multiple of 4 and so is every padded attribute, so
        # a whole attribute header is always there.
        attribute, value_length = _ATTRIBUTE.unpack_from(datagram, offset)
        start = offset + 4
        end = start + value_length
        offset = end + (-value_length % 4)
        if offset > size:
            raise StunFormatError(
                f"attribute {attribute:#06x} ({value_length} bytes at byte {start}) overruns the message"
            )
        if attribute == FINGERPRINT:
            if value_length != 4:
                raise StunFormatError(f"FINGERPRINT of {value_length} bytes (it is 4)")
            (value,) = struct.unpack_from("!I", datagram, start)
            if value != _fingerprint(datagram[: start - 4]):
                raise StunFormatError("FINGERPRINT does not match (corrupted, or not STUN)")
            fingerprint = True
            continue
        # RFC 8489 section 14.5/14.6: after MESSAGE-INTEGRITY only
        # MESSAGE-INTEGRITY-SHA256 and FINGERPRINT count; after
        # MESSAGE-INTEGRITY-SHA256 only FINGERPRINT.
        if integrity == MESSAGE_INTEGRITY_SHA256 or (integrity and attribute != MESSAGE_INTEGRITY_SHA256):
            continue
        if attribute in (MESSAGE_INTEGRITY, MESSAGE_INTEGRITY_SHA256):
            integrity = attribute
        attributes.append((attribute, bytes(datagram[start:end])))
    return StunMessage(method, message_class, bytes(transaction_id), tuple(attributes), fingerprint)


def encode_address(address: tuple[str, int], transaction_id: bytes, *, xor: bool = True) -> bytes:
    """
    The value of an XOR-MAPPED-ADDRESS (or, with C{xor=False}, a
    MAPPED-ADDRESS) attribute for C{address}.  The XOR keeps NAT devices
    that rewrite addresses they recognise in payloads (ALGs) from
    "correcting" the answer.
    """
    ip = ipaddress.ip_address(address[0])
    port = address[1]
    packed = ip.packed
    family = _FAMILY_IPV4 if ip.version == 4 else _FAMILY_IPV6
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE + transaction_id
        packed = bytes(a ^ b for a, b in zip(packed, mask, strict=False))
    return struct.pack("!BBH", 0, family, port) + packed


def decode_address(value: bytes, transaction_id: bytes, *, xor: bool = True) -> UdpAddress:
    """
    The address in an XOR-MAPPED-ADDRESS (or, with C{xor=False}, a
    MAPPED-ADDRESS) value.

    @raise StunFormatError: a wrong length or an unknown address family.
    """
    if len(value) < 4:
        raise StunFormatError(f"address attribute of {len(value)} bytes")
    family = value[1]
    port = int.from_bytes(value[2:4], "big")
    packed = value[4:]
    expected = {_FAMILY_IPV4: 4, _FAMILY_IPV6: 16}.get(family)
    if expected is None:
        raise StunFormatError(f"address family {family:#04x} (known: 0x01 IPv4, 0x02 IPv6)")
    if len(packed) != expected:
        raise StunFormatError(f"IPv{4 if family == _FAMILY_IPV4 else 6} address of {len(packed)} bytes")
    if xor:
        port ^= MAGIC_COOKIE >> 16
        mask = _COOKIE + transaction_id
        packed = bytes(a ^ b for a, b in zip(packed, mask, strict=False))
    return UdpAddress(str(ipaddress.ip_address(packed)), port)


def mapped_address(message: StunMessage) -> UdpAddress | None:
    """
    The mapped address a Binding success response carries: its
    XOR-MAPPED-ADDRESS, or failing that its MAPPED-ADDRESS (what servers
    older than RFC 5389 send); C{None} if it has neither.

    @raise StunFormatError: the attribute is malformed.
    """
    value = message.get(XOR_MAPPED_ADDRESS)
    if value is not None:
        return decode_address(value, message.transaction_id, xor=True)
    value = message.get(MAPPED_ADDRESS)
    if value is not None:
        return decode_address(value, message.transaction_id, xor=False)
    return None


def encode_error_code(code: int, reason: str) -> bytes:
    """The value of an ERROR-CODE attribute (code 300-699, a short reason phrase)."""
    if not 300 <= code <= 699:
        raise ValueError(f"STUN error code {code} out of range 300-699")
    return struct.pack("!HBB", 0, code // 100, code % 100) + reason.encode("utf-8")[:763]


def decode_error_code(value: bytes) -> tuple[int, str]:
    """
    The code and reason phrase of an ERROR-CODE value.  The phrase comes
    from the network: it is decoded leniently and cut to 128 printable
    characters, so it is safe to log.

    @raise StunFormatError: shorter than 4 bytes, or a class outside 3-6.
    """
    if len(value) < 4:
        raise StunFormatError(f"ERROR-CODE of {len(value)} bytes")
    error_class, number = value[2] & 0x07, value[3]
    if not 3 <= error_class <= 6 or number > 99:
        raise StunFormatError(f"ERROR-CODE class {error_class} number {number}")
    phrase = value[4:].decode("utf-8", errors="replace")
    phrase = "".join(c if c.isprintable() else "?" for c in phrase[:128])
    return error_class * 100 + number, phrase


def encode_binding_request(transaction_id: bytes, *, fingerprint: bool = True) -> bytes:
    """
    A Binding request with no attributes but FINGERPRINT (28 bytes; 20
    without).  FINGERPRINT lets a socket that also carries other protocols
    recognise the answer beyond doubt (RFC 8489 section 7); servers that do
    not use it ignore it.
    """
    return encode(BINDING, MessageClass.REQUEST, transaction_id, fingerprint=fingerprint)


def encode_binding_success(transaction_id: bytes, mapped: tuple[str, int], *, fingerprint: bool = False) -> bytes:
    """A Binding success response carrying only C{mapped} as XOR-MAPPED-ADDRESS (and FINGERPRINT if asked)."""
    value = encode_address(mapped, transaction_id)
    return encode(BINDING, MessageClass.SUCCESS, transaction_id, [(XOR_MAPPED_ADDRESS, value)], fingerprint=fingerprint)


def encode_binding_error(
    transaction_id: bytes, code: int, reason: str, *, unknown: Iterable[int] = (), fingerprint: bool = False
) -> bytes:
    """A Binding error response: ERROR-CODE, and UNKNOWN-ATTRIBUTES when C{unknown} is not empty (a 420)."""
    attributes = [(ERROR_CODE, encode_error_code(code, reason))]
    unknown = tuple(unknown)
    if unknown:
        attributes.append((UNKNOWN_ATTRIBUTES, struct.pack(f"!{len(unknown)}H", *unknown)))
    return encode(BINDING, MessageClass.ERROR, transaction_id, attributes, fingerprint=fingerprint)
