"""
STUN for the public address (issue 10): the codec against RFC 5769's test
vectors and malformed input, the server's answers, the client's
retransmission on a fake clock, NAT classification on a fake NAT, and real
UDP sockets on 127.0.0.1 (in process, through makeService, and through a
real C{twist pluresync-relay --udp-port} process).
"""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
import struct
import zlib
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from pluresync.direct import stunserver
from pluresync.direct.nat import NatReport, NatSample, classify, classify_nat, discover_nat
from pluresync.direct.stun import (
    BINDING,
    ERROR_CODE,
    FINGERPRINT,
    MAGIC_COOKIE,
    MAPPED_ADDRESS,
    MESSAGE_INTEGRITY,
    SOFTWARE,
    UNKNOWN_ATTRIBUTES,
    XOR_MAPPED_ADDRESS,
    MessageClass,
    UdpAddress,
    decode,
    decode_address,
    decode_error_code,
    encode,
    encode_address,
    encode_binding_error,
    encode_binding_request,
    encode_binding_success,
    is_stun,
    mapped_address,
    message_type,
    new_transaction_id,
    udp_address,
)
from pluresync.direct.stunclient import Retransmission, StunClient, StunProtocol
from pluresync.direct.stunserver import MAX_REQUEST, StunServer, binding_reply
from pluresync.errors import (
    ConfigurationError,
    StunError,
    StunErrorResponse,
    StunFormatError,
    StunTimeoutError,
    StunUnreachableError,
)
from pluresync.interfaces import IDatagramHandler
from pluresync.relay.server.service import Options, RelayService, makeService, stun_interface

from .relayprocess import free_port, start_relay

# -- RFC 5769 test vectors ---------------------------------------------------
#
# Sections 2.1-2.3 of RFC 5769, byte for byte.  Each carries a FINGERPRINT
# (checked by decode) and a MESSAGE-INTEGRITY under the short-term password
# below (checked here by check_integrity), so a mistyped byte fails the test.

RFC5769_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
RFC5769_TRANSACTION = bytes.fromhex("b7e7a701bc34d686fa87dfae")

#: 2.1 Sample Request (a Binding request as ICE sends it).
RFC5769_REQUEST = bytes.fromhex(
    "000100582112a442b7e7a701bc34d686fa87dfae"
    "80220010"
    "5354554e2074657374"
    "20636c69656e74"  # SOFTWARE "STUN test client"
    "00240004"
    "6e0001ff"  # PRIORITY
    "80290008"
    "932ff9b151263b36"  # ICE-CONTROLLED
    "00060009"
    "6576746a3a68367659202020"  # USERNAME "evtj:h6vY" + padding
    "00080014"
    "9aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a2"  # MESSAGE-INTEGRITY
    "80280004"
    "e57a3bcf"  # FINGERPRINT
)

#: 2.2 Sample IPv4 Response: XOR-MAPPED-ADDRESS 192.0.2.1 port 32853.
RFC5769_IPV4_RESPONSE = bytes.fromhex(
    "0101003c2112a442b7e7a701bc34d686fa87dfae"
    "8022000b"
    "7465737420766563746f7220"  # SOFTWARE "test vector" + padding
    "00200008"
    "0001a147e112a643"  # XOR-MAPPED-ADDRESS
    "00080014"
    "2b91f599fd9e90c38c7489f92af9ba53f06be7d7"  # MESSAGE-INTEGRITY
    "80280004"
    "c07d4c96"  # FINGERPRINT
)

#: 2.3 Sample IPv6 Response: XOR-MAPPED-ADDRESS 2001:db8:1234:5678:11:2233:4455:6677 port 32853.
RFC5769_IPV6_RESPONSE = bytes.fromhex(
    "010100482112a442b7e7a701bc34d686fa87dfae"
    "8022000b"
    "7465737420766563746f7220"
    "00200014"
    "0002a1470113a9faa5d3f179bc25f4b5bed2b9d9"
    "00080014"
    "a382954e4be67bf11784c97c8292c275bfe3ed41"
    "80280004"
    "c8fb0b4c"
)


def check_integrity(message: bytes, password: bytes) -> bool:
    """RFC 8489 section 14.5: HMAC-SHA1 over the message up to MESSAGE-INTEGRITY, length adjusted to end after it."""
    offset = 20
    while offset < len(message):
        kind, length = struct.unpack_from("!HH", message, offset)
        if kind == MESSAGE_INTEGRITY:
            header = message[:2] + struct.pack("!H", offset + 24 - 20) + message[4:offset]
            return hmac.compare_digest(
                hmac.new(password, header, hashlib.sha1).digest(), message[offset + 4 : offset + 24]
            )
        offset += 4 + length + (-length % 4)
    return False


def stun_message(kind: int, attributes: bytes, *, length: int | None = None, cookie: int = MAGIC_COOKIE) -> bytes:
    """A raw STUN message (no checks), for malformed input."""
    length = len(attributes) if length is None else length
    return struct.pack("!HHI", kind, length, cookie) + bytes(12) + attributes


def attribute(kind: int, value: bytes, *, length: int | None = None) -> bytes:
    length = len(value) if length is None else length
    return struct.pack("!HH", kind, length) + value + bytes(-len(value) % 4)


class VectorTests(unittest.SynchronousTestCase):
    """RFC 5769's sample messages."""

    def test_vectors_are_exact(self) -> None:
        """The three messages carry a valid FINGERPRINT and MESSAGE-INTEGRITY: the bytes are RFC 5769's."""
        for message in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE):
            self.assertTrue(check_integrity(message, RFC5769_PASSWORD))
            self.assertTrue(decode(message).fingerprint)

    def test_ipv4_response(self) -> None:
        """2.2: a Binding success response whose XOR-MAPPED-ADDRESS is 192.0.2.1:32853."""
        message = decode(RFC5769_IPV4_RESPONSE)
        self.assertEqual((message.method, message.message_class), (BINDING, MessageClass.SUCCESS))
        self.assertEqual(message.transaction_id, RFC5769_TRANSACTION)
        self.assertEqual(message.get(SOFTWARE), b"test vector")
        self.assertEqual(message.unknown_required, ())
        self.assertEqual(mapped_address(message), UdpAddress("192.0.2.1", 32853))

    def test_ipv6_response(self) -> None:
        """2.3: the same, with 2001:db8:1234:5678:11:2233:4455:6677 port 32853."""
        message = decode(RFC5769_IPV6_RESPONSE)
        self.assertEqual((message.method, message.message_class), (BINDING, MessageClass.SUCCESS))
        self.assertEqual(mapped_address(message), UdpAddress("2001:db8:1234:5678:11:2233:4455:6677", 32853))
        self.assertEqual(str(mapped_address(message)), "[2001:db8:1234:5678:11:2233:4455:6677]:32853")

    def test_encoding_matches_the_vectors(self) -> None:
        """encode_address gives the vectors' XOR-MAPPED-ADDRESS values byte for byte."""
        for vector, host in (
            (RFC5769_IPV4_RESPONSE, "192.0.2.1"),
            (RFC5769_IPV6_RESPONSE, "2001:db8:1234:5678:11:2233:4455:6677"),
        ):
            value = decode(vector).get(XOR_MAPPED_ADDRESS)
            self.assertEqual(encode_address((host, 32853), RFC5769_TRANSACTION), value)

    def test_request(self) -> None:
        """
        2.1: a Binding request with ICE's PRIORITY (0x0024, comprehension-
        required and not STUN-for-NAT-discovery's): the server answers 420
        naming it, and ignores ICE-CONTROLLED (0x8029, optional).
        """
        message = decode(RFC5769_REQUEST)
        self.assertEqual((message.method, message.message_class), (BINDING, MessageClass.REQUEST))
        self.assertEqual(message.get(SOFTWARE), b"STUN test client")
        self.assertEqual(message.unknown_required, (0x0024,))
        reply = decode(binding_reply(RFC5769_REQUEST, ("192.0.2.1", 32853)))
        self.assertEqual(reply.message_class, MessageClass.ERROR)
        self.assertEqual(reply.transaction_id, RFC5769_TRANSACTION)
        self.assertEqual(decode_error_code(reply.get(ERROR_CODE)), (420, "Unknown Attribute"))
        self.assertEqual(reply.get(UNKNOWN_ATTRIBUTES), b"\x00\x24")
        self.assertTrue(reply.fingerprint, "a request with FINGERPRINT gets one back")


class CodecTests(unittest.SynchronousTestCase):
    """Encoding, decoding, and the demultiplexing test."""

    def test_message_types(self) -> None:
        """Binding's four classes have RFC 8489's types; every method and class round-trips."""
        self.assertEqual(
            [message_type(BINDING, c) for c in MessageClass],
            [0x0001, 0x0011, 0x0101, 0x0111],
        )
        tid = new_transaction_id()
        for method in (0x000, 0x001, 0x003, 0x07F, 0x080, 0xABC, 0xFFF):
            for message_class in MessageClass:
                message = decode(encode(method, message_class, tid))
                self.assertEqual((message.method, message.message_class), (method, message_class))
        self.assertRaises(ValueError, message_type, 0x1000, MessageClass.REQUEST)

    def test_binding_request(self) -> None:
        """A request is 28 bytes with FINGERPRINT, 20 without; it decodes back."""
        tid = new_transaction_id()
        request = encode_binding_request(tid)
        self.assertEqual(len(request), 28)
        self.assertEqual(request[:2], b"\x00\x01")
        message = decode(request)
        self.assertEqual((message.method, message.message_class, message.transaction_id), (BINDING, 0, tid))
        self.assertTrue(message.fingerprint)
        self.assertEqual(message.attributes, ())
        bare = encode_binding_request(tid, fingerprint=False)
        self.assertEqual(bare, request[:2] + b"\x00\x00" + request[4:20])
        self.assertFalse(decode(bare).fingerprint)

    def test_transaction_ids(self) -> None:
        """Transaction ids are 96 bits and differ."""
        ids = {new_transaction_id() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        self.assertEqual({len(i) for i in ids}, {12})
        self.assertRaises(ValueError, encode_binding_request, b"short")

    def test_success_round_trip(self) -> None:
        """XOR-MAPPED-ADDRESS round-trips for IPv4 and IPv6; MAPPED-ADDRESS is the fallback."""
        tid = new_transaction_id()
        for host in ("203.0.113.7", "2001:db8::1", "::ffff:0:1"):
            message = decode(encode_binding_success(tid, (host, 4242)))
            self.assertEqual(mapped_address(message), (host, 4242))
            old = encode(
                BINDING, MessageClass.SUCCESS, tid, [(MAPPED_ADDRESS, encode_address((host, 4242), tid, xor=False))]
            )
            self.assertEqual(mapped_address(decode(old)), (host, 4242))
        self.assertIsNone(mapped_address(decode(encode(BINDING, MessageClass.SUCCESS, tid))))
        both = encode(
            BINDING,
            MessageClass.SUCCESS,
            tid,
            [
                (MAPPED_ADDRESS, encode_address(("10.0.0.1", 1), tid, xor=False)),
                (XOR_MAPPED_ADDRESS, encode_address(("198.51.100.1", 2), tid)),
            ],
        )
        self.assertEqual(mapped_address(decode(both)), ("198.51.100.1", 2), "XOR-MAPPED-ADDRESS wins")

    def test_error_round_trip(self) -> None:
        """An error response carries its code, phrase and unknown attributes."""
        tid = new_transaction_id()
        message = decode(encode_binding_error(tid, 420, "Unknown Attribute", unknown=[0x0003, 0x7FFF]))
        self.assertEqual(message.message_class, MessageClass.ERROR)
        self.assertEqual(decode_error_code(message.get(ERROR_CODE)), (420, "Unknown Attribute"))
        self.assertEqual(message.get(UNKNOWN_ATTRIBUTES), b"\x00\x03\x7f\xff")
        self.assertRaises(ValueError, encode_binding_error, tid, 200, "OK")

    def test_error_code_is_safe_to_log(self) -> None:
        """A hostile reason phrase is cut and made printable."""
        code, phrase = decode_error_code(b"\x00\x00\x04\x01" + b"\x1b[31m\xff" + b"x" * 500)
        self.assertEqual(code, 401)
        self.assertEqual(len(phrase), 128)
        self.assertTrue(phrase.isprintable())
        for bad in (b"\x00\x00\x04", b"\x00\x00\x07\x00", b"\x00\x00\x02\x00", b"\x00\x00\x04\x64"):
            self.assertRaises(StunFormatError, decode_error_code, bad)

    def test_bad_addresses(self) -> None:
        """Wrong lengths and unknown families are format errors."""
        tid = bytes(12)
        for value, reason in (
            (b"\x00\x01\x00", "3 bytes"),
            (b"\x00\x03\x00\x01" + bytes(4), "family 0x03"),
            (b"\x00\x01\x00\x01" + bytes(16), "IPv4 address of 16 bytes"),
            (b"\x00\x02\x00\x01" + bytes(4), "IPv6 address of 4 bytes"),
        ):
            with self.assertRaises(StunFormatError) as caught:
                decode_address(value, tid)
            self.assertIn(reason, caught.exception.reason)

    def test_is_stun(self) -> None:
        """
        The demultiplexing test: STUN's two zero bits and cookie; the
        direct path's probes (0x80-0xBF) and QUIC (the 0x40 bit) are not STUN.
        """
        request = encode_binding_request(new_transaction_id())
        self.assertTrue(is_stun(request))
        self.assertTrue(is_stun(RFC5769_IPV6_RESPONSE))
        self.assertTrue(is_stun(stun_message(0x0001, b"", length=3)), "malformed, but STUN's to drop")
        for first in (0x40, 0x7F, 0x80, 0xBF, 0xC0, 0xFF):
            self.assertFalse(is_stun(bytes([first]) + request[1:]), hex(first))
        self.assertFalse(is_stun(request[:19]))
        self.assertFalse(is_stun(request[:4] + b"\x21\x12\xa4\x43" + request[8:]))
        self.assertFalse(is_stun(b""))

    def test_udp_address(self) -> None:
        """Twisted's datagram addresses become normalised UdpAddresses."""
        self.assertEqual(udp_address(("127.0.0.1", 5)), ("127.0.0.1", 5))
        self.assertEqual(udp_address(("::ffff:192.0.2.1", 5, 0, 0)), ("192.0.2.1", 5))
        self.assertEqual(udp_address(("2001:DB8:0::1", 5)), ("2001:db8::1", 5))
        self.assertEqual(str(udp_address(("2001:db8::1", 5))), "[2001:db8::1]:5")
        for bad in (("example.com", 5), ("1.2.3.4", 70000), ("1.2.3.4", -1)):
            self.assertRaises(ValueError, udp_address, bad)


class MalformedTests(unittest.SynchronousTestCase):
    """decode rejects every malformed message with a reason, and only with StunFormatError."""

    def assertRejected(self, datagram: bytes, reason: str) -> None:
        with self.assertRaises(StunFormatError) as caught:
            decode(datagram)
        self.assertIn(reason, caught.exception.reason)
        self.assertIsNone(binding_reply(datagram, ("192.0.2.1", 1)), "the server stays silent")

    def test_short(self) -> None:
        self.assertRejected(encode_binding_request(bytes(12))[:19], "shorter than a STUN header")
        self.assertRejected(b"", "0 bytes")

    def test_not_stun(self) -> None:
        self.assertRejected(stun_message(0xC001, b""), "not STUN")

    def test_wrong_cookie(self) -> None:
        self.assertRejected(stun_message(0x0001, b"", cookie=0x2112A443), "magic cookie")

    def test_bad_length(self) -> None:
        body = attribute(SOFTWARE, b"abcd")
        self.assertRejected(stun_message(0x0001, body, length=6), "multiple of 4")
        self.assertRejected(stun_message(0x0001, body, length=4), "length field says 4")
        self.assertRejected(stun_message(0x0001, body, length=12), "length field says 12")

    def test_attribute_overrun(self) -> None:
        """A value longer than what is left, or whose padding is, overruns."""
        self.assertRejected(stun_message(0x0001, struct.pack("!HH", SOFTWARE, 8) + b"abcd"), "overruns")
        self.assertRejected(stun_message(0x0001, struct.pack("!HH", SOFTWARE, 5) + b"abcd"), "overruns")
        self.assertRejected(stun_message(0x0001, struct.pack("!HH", SOFTWARE, 0xFFFF) + b"abcd"), "overruns")

    def test_fingerprint(self) -> None:
        """A FINGERPRINT must be right, 4 bytes long, and last."""
        request = bytearray(encode_binding_request(new_transaction_id()))
        request[-1] ^= 1
        self.assertRejected(bytes(request), "FINGERPRINT does not match")
        header = struct.pack("!HHI", 0x0001, 16, MAGIC_COOKIE) + bytes(12)
        crc = zlib.crc32(header) ^ 0x5354554E
        after = header + attribute(FINGERPRINT, struct.pack("!I", crc)) + attribute(SOFTWARE, b"late")
        self.assertRejected(after, "follows FINGERPRINT")
        self.assertRejected(stun_message(0x0001, attribute(FINGERPRINT, b"\x00" * 8)), "FINGERPRINT of 8 bytes")

    def test_corrupted_vectors(self) -> None:
        """
        Any bit flipped in an RFC 5769 message is caught by its FINGERPRINT
        (or the header checks), except in FINGERPRINT's own type: that makes
        it an unknown optional attribute, which RFC 8489 says to ignore.
        """
        for vector in (RFC5769_REQUEST, RFC5769_IPV4_RESPONSE):
            for index in [*range(len(vector) - 8), *range(len(vector) - 6, len(vector))]:
                corrupted = bytearray(vector)
                corrupted[index] ^= 0x10
                self.assertRaises(StunFormatError, decode, bytes(corrupted))

    def test_unknown_required_attributes(self) -> None:
        """Unknown comprehension-required types are listed once, optional ones never."""
        tid = new_transaction_id()
        message = decode(
            encode(
                BINDING,
                MessageClass.REQUEST,
                tid,
                [(0x0003, bytes(4)), (0x8FFF, b"x"), (0x7FFF, b""), (0x0003, bytes(4)), (SOFTWARE, b"y")],
            )
        )
        self.assertEqual(message.unknown_required, (0x0003, 0x7FFF))

    def test_after_message_integrity(self) -> None:
        """Attributes after MESSAGE-INTEGRITY (but FINGERPRINT) are ignored, as RFC 8489 says."""
        message = decode(
            encode(
                BINDING,
                MessageClass.SUCCESS,
                new_transaction_id(),
                [(MESSAGE_INTEGRITY, bytes(20)), (0x7FFF, b"ignored"), (SOFTWARE, b"ignored")],
                fingerprint=True,
            )
        )
        self.assertEqual([kind for kind, _ in message.attributes], [MESSAGE_INTEGRITY])
        self.assertEqual(message.unknown_required, ())

    def test_fuzz(self) -> None:
        """Random and mutated datagrams: decode and the server raise nothing but StunFormatError."""
        rng = random.Random(10)
        seeds = [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE, encode_binding_request(bytes(12))]
        for _ in range(3000):
            datagram = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                choice = rng.random()
                if choice < 0.4 and datagram:
                    datagram[rng.randrange(len(datagram))] = rng.randrange(256)
                elif choice < 0.7:
                    del datagram[rng.randrange(len(datagram) + 1) :]
                else:
                    datagram += bytes(rng.randrange(256) for _ in range(rng.randint(1, 12)))
            if rng.random() < 0.5 and len(datagram) >= 4:  # keep the header's length right, to reach the attributes
                datagram[2:4] = struct.pack("!H", max(0, len(datagram) - 20) & 0xFFFF)
            try:
                decode(bytes(datagram))
            except StunFormatError:
                pass
            binding_reply(bytes(datagram), ("192.0.2.1", 1))


class ServerTests(unittest.SynchronousTestCase):
    """binding_reply and the StunServer protocol."""

    def test_answers_binding_requests(self) -> None:
        """The answer is the source as XOR-MAPPED-ADDRESS, with the request's transaction id."""
        tid = new_transaction_id()
        for source, expected, size in (
            (("198.51.100.9", 40000), ("198.51.100.9", 40000), 32),
            (("2001:db8::9", 40000), ("2001:db8::9", 40000), 44),
            (("::ffff:198.51.100.9", 40000), ("198.51.100.9", 40000), 32),
        ):
            reply = binding_reply(encode_binding_request(tid, fingerprint=False), source)
            self.assertEqual(len(reply), size, "nothing but XOR-MAPPED-ADDRESS")
            message = decode(reply)
            self.assertEqual((message.method, message.message_class), (BINDING, MessageClass.SUCCESS))
            self.assertEqual(message.transaction_id, tid)
            self.assertEqual([k for k, _ in message.attributes], [XOR_MAPPED_ADDRESS])
            self.assertEqual(mapped_address(message), expected)
            self.assertFalse(message.fingerprint)
        with_fingerprint = binding_reply(encode_binding_request(tid), ("198.51.100.9", 1))
        self.assertEqual(len(with_fingerprint), 40)
        self.assertTrue(decode(with_fingerprint).fingerprint)

    def test_silent(self) -> None:
        """No answer to anything but a well-formed Binding request."""
        tid = new_transaction_id()
        source = ("198.51.100.9", 1)
        for datagram in (
            b"",
            b"\x80" + bytes(30),  # a probe
            b"\xc0" + bytes(1200),  # QUIC
            encode(BINDING, MessageClass.INDICATION, tid),  # a keepalive
            encode_binding_success(tid, source),
            encode_binding_error(tid, 400, "Bad Request"),
            encode(0x003, MessageClass.REQUEST, tid),  # TURN Allocate
            encode(BINDING, MessageClass.REQUEST, tid, [(0x8FFF, bytes(MAX_REQUEST))]),  # oversized
        ):
            self.assertIsNone(binding_reply(datagram, source), datagram[:4])
        self.assertIsNone(binding_reply(encode_binding_request(tid), ("not-an-ip", 1)))

    def test_never_amplifies_much(self) -> None:
        """
        One datagram per request, at most 32 bytes more than the request
        (a bare 20-byte request's IPv6 answer is 44 bytes; a 420 lists each
        unknown attribute in 2 bytes where the request spent at least 4).
        """
        tid = new_transaction_id()
        requests = [encode_binding_request(tid, fingerprint=False), encode_binding_request(tid)]
        for count in (1, 2, 7, 100):
            unknown = [(0x7F00 + n, b"") for n in range(count)]
            requests.append(encode(BINDING, MessageClass.REQUEST, tid, unknown))
        for request in requests:
            for source in (("198.51.100.9", 1), ("2001:db8::9", 1)):
                reply = binding_reply(request, source)
                self.assertLessEqual(len(reply), len(request) + 32)

    def test_unknown_attributes_get_420(self) -> None:
        """RFC 5780's CHANGE-REQUEST and RESPONSE-PORT are not honoured: 420, never an answer elsewhere."""
        tid = new_transaction_id()
        request = encode(
            BINDING, MessageClass.REQUEST, tid, [(0x0003, b"\x00\x00\x00\x06"), (0x0027, b"\x00\x07\x00\x00")]
        )
        message = decode(binding_reply(request, ("198.51.100.9", 1)))
        self.assertEqual(decode_error_code(message.get(ERROR_CODE))[0], 420)
        self.assertEqual(message.get(UNKNOWN_ATTRIBUTES), b"\x00\x03\x00\x27")

    def test_protocol(self) -> None:
        """StunServer writes the answer to the source and counts what it did."""
        server = StunServer()
        transport = FakeDatagramTransport()
        server.makeConnection(transport)
        tid = new_transaction_id()
        server.datagramReceived(encode_binding_request(tid), ("198.51.100.9", 7))
        server.datagramReceived(b"\x80probe", ("198.51.100.9", 7))
        self.assertEqual(len(transport.written), 1)
        reply, addr = transport.written[0]
        self.assertEqual(addr, ("198.51.100.9", 7))
        self.assertEqual(mapped_address(decode(reply)), ("198.51.100.9", 7))
        self.assertEqual((server.answered, server.ignored, server.unsent), (1, 1, 0))

    def test_protocol_never_raises(self) -> None:
        """A socket that refuses a write, or a bug, does not escape into the reactor."""
        server = StunServer()
        transport = FakeDatagramTransport(fail=OSError(11, "Resource temporarily unavailable"))
        server.makeConnection(transport)
        server.datagramReceived(encode_binding_request(new_transaction_id()), ("198.51.100.9", 7))
        self.assertEqual(server.unsent, 1)

        def bug(datagram: bytes, source: tuple) -> None:
            raise ZeroDivisionError()

        self.patch(stunserver, "binding_reply", bug)
        server.datagramReceived(encode_binding_request(new_transaction_id()), ("198.51.100.9", 7))
        self.assertEqual(server.ignored, 1)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class FakeDatagramTransport:
    """What a DatagramProtocol writes with, recorded."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.written: list[tuple[bytes, tuple]] = []
        self.fail = fail

    def write(self, datagram: bytes, addr: tuple) -> None:
        if self.fail is not None:
            raise self.fail
        self.written.append((datagram, addr))


SERVER = ("192.0.2.10", 3478)


class ClientTests(unittest.SynchronousTestCase):
    """StunClient on a Clock, with a recording send."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[float, bytes, tuple]] = []
        self.client = StunClient(self.clock, self.send)

    def send(self, datagram: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((self.clock.seconds(), datagram, addr))

    def answer(self, mapped: tuple[str, int], *, source: tuple = SERVER, tid: bytes | None = None) -> bool:
        """Deliver the server's success response to the last request."""
        tid = decode(self.sent[-1][1]).transaction_id if tid is None else tid
        return self.client.datagramReceived(encode_binding_success(tid, mapped), source)

    def advance_to(self, until: float) -> None:
        """Advance the clock to C{until}, stopping exactly at each timer on the way."""
        for _ in range(1000):
            due = [call.getTime() for call in self.clock.getDelayedCalls() if call.getTime() <= until]
            if not due:
                break
            self.clock.advance(min(due) - self.clock.seconds())
        self.clock.advance(max(0.0, until - self.clock.seconds()))

    def test_interface(self) -> None:
        verifyObject(IDatagramHandler, self.client)

    def test_request(self) -> None:
        """The request is a Binding request with FINGERPRINT, to the server; each query has its own id."""
        queries = [self.client.query(SERVER), self.client.query(("2001:db8::10", 3478))]
        (_, first, addr), (_, second, addr6) = self.sent
        self.assertEqual((addr, addr6), (SERVER, ("2001:db8::10", 3478)))
        for datagram in (first, second):
            message = decode(datagram)
            self.assertEqual((message.method, message.message_class), (BINDING, MessageClass.REQUEST))
            self.assertTrue(message.fingerprint)
        self.assertNotEqual(decode(first).transaction_id, decode(second).transaction_id)
        self.assertEqual(self.client.pending, 2)
        for d in queries:
            d.cancel()
            self.failureResultOf(d, CancelledError)

    def test_answer(self) -> None:
        """The answer fires the Deferred with the mapped address and stops retransmitting."""
        d = self.client.query(SERVER)
        self.clock.advance(0.6)
        self.assertTrue(self.answer(("203.0.113.5", 61000)))
        self.assertEqual(self.successResultOf(d), ("203.0.113.5", 61000))
        self.assertEqual(self.client.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance_to(40)
        self.assertEqual(len(self.sent), 2)

    def test_retransmission_schedule(self) -> None:
        """
        RFC 8489: sent at 0, 0.5, 1.5, 3.5, 7.5, 15.5 and 31.5 s (the same
        request each time), failing at 39.5 s.
        """
        self.assertEqual(Retransmission().times(), (0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5))
        self.assertEqual(Retransmission().timeout, 39.5)
        d = self.client.query(SERVER)
        self.advance_to(39.45)
        self.assertNoResult(d)
        self.assertEqual([round(t, 2) for t, _, _ in self.sent], [0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        self.assertEqual(len({datagram for _, datagram, _ in self.sent}), 1)
        self.advance_to(39.5)
        failure = self.failureResultOf(d, StunTimeoutError)
        self.assertIsInstance(failure.value, StunUnreachableError)
        self.assertIn("no answer from the STUN server at 192.0.2.10:3478 to 7 requests in 39.5 s", str(failure.value))
        self.assertIn("blocked", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline(self) -> None:
        """A deadline cuts the schedule short: 4 sends in 5 s, failing at 5 s."""
        d = self.client.query(SERVER, deadline=5)
        self.advance_to(4.95)
        self.assertNoResult(d)
        self.advance_to(5)
        self.failureResultOf(d, StunTimeoutError)
        self.assertEqual([round(t, 2) for t, _, _ in self.sent], [0, 0.5, 1.5, 3.5])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_custom_retransmission(self) -> None:
        """The schedule is configurable; nonsense is refused."""
        client = StunClient(
            self.clock, self.send, retransmission=Retransmission(rto=0.1, transmissions=2, final_wait=3)
        )
        self.assertEqual(Retransmission(rto=0.1, transmissions=2, final_wait=3).times(), (0, 0.1))
        d = client.query(SERVER)
        self.advance_to(0.39)
        self.assertNoResult(d)
        self.advance_to(0.4)
        self.failureResultOf(d, StunTimeoutError)
        self.assertEqual([round(t, 2) for t, _, _ in self.sent], [0, 0.1])
        self.assertRaises(ConfigurationError, Retransmission, rto=0)
        self.assertRaises(ConfigurationError, Retransmission, transmissions=0)

    def test_cancel(self) -> None:
        """Cancelling stops the retransmissions and forgets the transaction."""
        d = self.client.query(SERVER)
        self.clock.advance(0.5)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.client.pending, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.advance_to(40)
        self.assertEqual(len(self.sent), 2)
        self.assertTrue(self.answer(("203.0.113.5", 1)), "a late answer is still STUN, and dropped")

    def test_stranger_transaction_ignored(self) -> None:
        """An answer with another transaction id, or from another address, changes nothing."""
        d = self.client.query(SERVER)
        self.assertTrue(self.answer(("203.0.113.66", 1), tid=new_transaction_id()))
        self.assertTrue(self.answer(("203.0.113.66", 1), source=("192.0.2.11", 3478)))
        self.assertTrue(self.answer(("203.0.113.66", 1), source=(SERVER[0], 3479)))
        self.assertNoResult(d)
        self.clock.advance(0.5)
        self.assertEqual(len(self.sent), 2, "still retransmitting")
        self.assertTrue(self.answer(("203.0.113.5", 2)))
        self.assertEqual(self.successResultOf(d), ("203.0.113.5", 2))

    def test_requests_and_garbage_ignored(self) -> None:
        """A STUN request with a pending id, a malformed message: consumed, nothing fires."""
        d = self.client.query(SERVER)
        tid = decode(self.sent[-1][1]).transaction_id
        self.assertTrue(self.client.datagramReceived(encode_binding_request(tid), SERVER))
        self.assertTrue(self.client.datagramReceived(stun_message(0x0101, b"", length=4), SERVER))
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d, CancelledError)

    def test_not_stun(self) -> None:
        """Datagrams that are not STUN are left to the owner (False)."""
        for datagram in (b"", b"\x80probe" + bytes(30), b"\xc3" + bytes(40), b"\x41" + bytes(40)):
            self.assertFalse(self.client.datagramReceived(datagram, SERVER))

    def test_ipv4_mapped_source(self) -> None:
        """On a dual-stack socket, an IPv4 server's answer comes from ::ffff:a.b.c.d; it matches."""
        d = self.client.query(SERVER)
        self.assertTrue(self.answer(("203.0.113.5", 2), source=("::ffff:192.0.2.10", 3478)))
        self.successResultOf(d)

    def test_error_response(self) -> None:
        """An error answer fails the query with its code; 401 says to use another server."""
        d = self.client.query(SERVER)
        tid = decode(self.sent[-1][1]).transaction_id
        self.client.datagramReceived(encode_binding_error(tid, 401, "Unauthorized"), SERVER)
        failure = self.failureResultOf(d, StunErrorResponse)
        self.assertEqual((failure.value.code, failure.value.reason), (401, "Unauthorized"))
        self.assertIn("answered error 401 (Unauthorized); it wants credentials", str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unusable_answers(self) -> None:
        """Answers without an address, with unknown required attributes or a broken error: StunError."""
        for attributes, cls, reason in (
            (lambda tid: [], MessageClass.SUCCESS, "without a usable mapped address"),
            (lambda tid: [(XOR_MAPPED_ADDRESS, b"\x00\x01\x00\x00")], MessageClass.SUCCESS, "malformed address"),
            (
                lambda tid: [(XOR_MAPPED_ADDRESS, encode_address(("1.2.3.4", 0), tid))],
                MessageClass.SUCCESS,
                "without a usable mapped address",
            ),
            (lambda tid: [(0x7FFF, b"")], MessageClass.SUCCESS, "does not know (0x7fff)"),
            (lambda tid: [], MessageClass.ERROR, "no ERROR-CODE"),
            (lambda tid: [(ERROR_CODE, b"\x00")], MessageClass.ERROR, "malformed error"),
        ):
            d = self.client.query(SERVER)
            tid = decode(self.sent[-1][1]).transaction_id
            self.client.datagramReceived(encode(BINDING, cls, tid, attributes(tid)), SERVER)
            failure = self.failureResultOf(d, StunError)
            self.assertIn(reason, str(failure.value))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_mapped_address_fallback(self) -> None:
        """A pre-RFC 5389 style answer (MAPPED-ADDRESS only) is used."""
        d = self.client.query(SERVER)
        tid = decode(self.sent[-1][1]).transaction_id
        answer = encode(
            BINDING, MessageClass.SUCCESS, tid, [(MAPPED_ADDRESS, encode_address(("203.0.113.5", 9), tid, xor=False))]
        )
        self.client.datagramReceived(answer, SERVER)
        self.assertEqual(self.successResultOf(d), ("203.0.113.5", 9))

    def test_send_failure(self) -> None:
        """A send that raises fails the query at once (unreachable), with no timer left."""

        def refuse(datagram: bytes, addr: tuple) -> None:
            raise OSError(101, "Network is unreachable")

        client = StunClient(self.clock, refuse)
        failure = self.failureResultOf(client.query(SERVER), StunUnreachableError)
        self.assertIn("could not send a STUN request to 192.0.2.10:3478", str(failure.value))
        self.assertEqual((client.pending, self.clock.getDelayedCalls()), (0, []))

    def test_answer_while_sending(self) -> None:
        """An owner that answers synchronously inside send (a fake network) leaves no timer behind."""
        client: StunClient

        def loopback(datagram: bytes, addr: tuple) -> None:
            client.datagramReceived(binding_reply(datagram, ("203.0.113.5", 9)), addr)

        client = StunClient(self.clock, loopback)
        self.assertEqual(self.successResultOf(client.query(SERVER)), ("203.0.113.5", 9))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_bad_arguments(self) -> None:
        """Names, port 0 and a bad deadline fail the Deferred (never raise)."""
        for server in (("stun.example.net", 3478), ("192.0.2.1", 0), ("192.0.2.1",), None):
            self.failureResultOf(self.client.query(server), ConfigurationError)
        self.failureResultOf(self.client.query(SERVER, deadline=0), ConfigurationError)
        self.assertEqual(self.sent, [])

    def test_bounded(self) -> None:
        """At most max_pending queries in flight."""
        client = StunClient(self.clock, self.send, max_pending=3)
        queries = [client.query(SERVER) for _ in range(3)]
        failure = self.failureResultOf(client.query(SERVER), StunError)
        self.assertIn("3 STUN queries already in flight", str(failure.value))
        for d in queries:
            d.cancel()
            self.failureResultOf(d, CancelledError)
        self.assertEqual(client.pending, 0)

    def test_stop(self) -> None:
        """stop() fails every query in flight and leaves no timer."""
        queries = [self.client.query(SERVER), self.client.query(("192.0.2.11", 3478))]
        self.client.stop()
        for d in queries:
            self.assertIn("its UDP socket closed", str(self.failureResultOf(d, StunError).value))
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FakeNat:
    """
    A NAT between a StunClient and STUN servers, on a Clock: it maps the
    client's socket to a public port (one for all destinations: cone; one
    per destination: symmetric), answers through the real binding_reply
    10 ms later, or drops everything (blocked).
    """

    def __init__(self, clock: Clock, kind: str, public_ip: str = "203.0.113.5") -> None:
        self.clock = clock
        self.kind = kind
        self.public_ip = public_ip
        self.ports: dict[tuple, int] = {}
        self.client = StunClient(clock, self.send)

    def send(self, datagram: bytes, addr: tuple[str, int]) -> None:
        if self.kind == "blocked":
            return
        if self.kind == "open":
            source = ("192.168.1.2", 5000)
        else:
            key = "all" if self.kind == "cone" else addr
            source = (self.public_ip, self.ports.setdefault(key, 40000 + len(self.ports)))
        reply = binding_reply(datagram, source)
        if reply is not None:
            self.clock.callLater(0.01, self.client.datagramReceived, reply, addr)


class ClassifyTests(unittest.SynchronousTestCase):
    """classify (pure) and classify_nat on a fake NAT."""

    LOCAL = ("192.168.1.2", 5000)
    SERVERS = [("192.0.2.10", 3478), ("192.0.2.10", 3479)]

    def test_classify(self) -> None:
        """Each class, from samples."""
        a = UdpAddress("203.0.113.5", 40000)
        own = UdpAddress("192.168.1.2", 5000)
        timeout = NatSample("s2", None, "no answer", unreachable=True)
        cases = [
            ([NatSample("s1", own), NatSample("s2", own)], "open", "own address 192.168.1.2:5000"),
            ([NatSample("s1", own), timeout], "open", "no NAT"),
            ([NatSample("s1", a), NatSample("s2", a)], "cone", "every server sees 203.0.113.5:40000"),
            (
                [NatSample("s1", a), NatSample("s2", a._replace(port=40001))],
                "symmetric",
                "different public port for each destination",
            ),
            (
                [NatSample("s1", a), NatSample("s2", a._replace(host="203.0.113.6"))],
                "symmetric",
                "different public IP addresses",
            ),
            ([NatSample("s1", None, "no answer", True), timeout], "blocked", "UDP is blocked"),
            ([NatSample("s1", a), timeout], "unknown", "a second server address is needed"),
            ([NatSample("s1", a)], "unknown", "a second server address is needed"),
            ([NatSample("s1", None, "error 401", False), timeout], "unknown", "s1: error 401"),
        ]
        for samples, nat, reason in cases:
            got, why = classify(self.LOCAL, samples, {"192.168.1.2"})
            self.assertEqual(got, nat, samples)
            self.assertIn(reason, why)
        both = [NatSample("s1", own), NatSample("s2", own)]
        self.assertEqual(classify(self.LOCAL, both, {"::ffff:192.168.1.2", "not-an-ip"})[0], "open")
        self.assertEqual(classify(self.LOCAL, both, {"192.168.1.3"})[0], "cone", "own port, another host: a NAT")

    def classified(self, kind: str, servers: list | None = None, **kwargs: Any) -> NatReport:
        clock = Clock()
        nat = FakeNat(clock, kind)
        d = classify_nat(clock, nat.client, servers or self.SERVERS, self.LOCAL, **kwargs)
        for _ in range(200):
            if d.called:
                break
            clock.advance(0.05)
        report = self.successResultOf(d)
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(nat.client.pending, 0)
        return report

    def test_cone(self) -> None:
        report = self.classified("cone")
        self.assertEqual(report.nat, "cone")
        self.assertEqual(report.mapped, ("203.0.113.5", 40000))
        self.assertEqual([s.mapped for s in report.samples], [("203.0.113.5", 40000)] * 2)
        self.assertEqual(report.local, self.LOCAL)

    def test_symmetric(self) -> None:
        report = self.classified("symmetric")
        self.assertEqual(report.nat, "symmetric")
        self.assertEqual([s.mapped.port for s in report.samples], [40000, 40001])
        self.assertEqual([s.server for s in report.samples], ["192.0.2.10:3478", "192.0.2.10:3479"])

    def test_open(self) -> None:
        self.assertEqual(self.classified("open").nat, "open")

    def test_blocked(self) -> None:
        """No answer within the deadline: blocked, each server's timeout in the reason."""
        report = self.classified("blocked", deadline=2)
        self.assertEqual(report.nat, "blocked")
        self.assertIsNone(report.mapped)
        self.assertTrue(all(s.unreachable for s in report.samples))
        self.assertIn("192.0.2.10:3479: no answer from the STUN server at 192.0.2.10:3479", report.reason)

    def test_names_resolved(self) -> None:
        """Server names go through the reactor's resolver; a failed lookup is in the report."""

        class Resolving(Clock):
            def resolve(self, name: str, timeout: Any = None) -> Deferred[str]:
                if name == "stun.example.net":
                    return succeed("192.0.2.10")
                return Deferred.fromCoroutine(self.fail(name))

            async def fail(self, name: str) -> str:
                raise DNSLookupError(name)

        clock = Resolving()
        nat = FakeNat(clock, "cone")
        d = classify_nat(clock, nat.client, [("stun.example.net", 3478), ("nowhere.invalid", 3478)], self.LOCAL)
        clock.advance(0.05)
        report = self.successResultOf(d)
        self.assertEqual(report.nat, "unknown")
        self.assertEqual(report.samples[0].mapped, ("203.0.113.5", 40000))
        self.assertIn("nowhere.invalid", report.samples[1].error)
        self.assertFalse(report.samples[1].unreachable)

    def test_cancel(self) -> None:
        """Cancelling stops every query: no timer, nothing pending."""
        clock = Clock()
        nat = FakeNat(clock, "blocked")
        d = classify_nat(clock, nat.client, self.SERVERS, self.LOCAL)
        clock.advance(1)
        self.assertEqual(nat.client.pending, 2)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual((nat.client.pending, clock.getDelayedCalls()), (0, []))

    def test_bad_arguments(self) -> None:
        """No server, the same server twice, a bad local address: ConfigurationError."""
        clock = Clock()
        client = FakeNat(clock, "cone").client
        for servers, local in (([], self.LOCAL), ([self.SERVERS[0]] * 2, self.LOCAL), (self.SERVERS, ("x", 1))):
            self.failureResultOf(classify_nat(clock, client, servers, local), ConfigurationError)
        self.assertEqual((client.pending, clock.getDelayedCalls()), (0, []))


# -- real sockets on 127.0.0.1 -----------------------------------------------


def free_udp_pair() -> int:
    """A UDP port N on 127.0.0.1 such that N and N+1 were both free a moment ago."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port
    raise AssertionError("no two consecutive free UDP ports on 127.0.0.1")


class LoopbackTests(unittest.TestCase):
    """Real UDP sockets, 127.0.0.1 only."""

    timeout = 30

    def listen(self, protocol: Any, interface: str = "127.0.0.1") -> Any:
        port = reactor.listenUDP(0, protocol, interface=interface)
        self.addCleanup(port.stopListening)
        return port

    async def test_query(self) -> None:
        """A client learns 127.0.0.1 and its own port from a server on another port."""
        server = self.listen(StunServer())
        owner = StunProtocol(reactor)
        port = self.listen(owner)
        mapped = await owner.client.query(("127.0.0.1", server.getHost().port), deadline=5)
        self.assertEqual(mapped, ("127.0.0.1", port.getHost().port))

    async def test_classify_open(self) -> None:
        """
        Two server ports, one client socket: "open".  On loopback there is
        no NAT, so both servers see the socket's own address, which is the
        definition of open (a cone NAT would show a different, public
        address the same to both).
        """
        servers = [self.listen(StunServer()), self.listen(StunServer())]
        owner = StunProtocol(reactor)
        port = self.listen(owner)
        host = port.getHost()
        report = await classify_nat(
            reactor, owner.client, [("127.0.0.1", s.getHost().port) for s in servers], (host.host, host.port)
        )
        self.assertEqual(report.nat, "open", report.reason)
        self.assertEqual(report.mapped, ("127.0.0.1", host.port))
        self.assertEqual([s.protocol.answered for s in servers], [1, 1])

    async def test_discover_wildcard(self) -> None:
        """discover_nat from a socket on every interface (0.0.0.0) still sees "open" (the route picks 127.0.0.1)."""
        servers = [self.listen(StunServer()), self.listen(StunServer())]
        report = await discover_nat(reactor, [("127.0.0.1", s.getHost().port) for s in servers], interface="")
        self.assertEqual(report.nat, "open", report.reason)
        self.assertEqual(report.local.host, "0.0.0.0")
        self.assertEqual(report.mapped.host, "127.0.0.1")

    async def test_blocked(self) -> None:
        """Nothing listening: "blocked" at the deadline (ICMP refusals are not reported on an unconnected socket)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            report = await discover_nat(reactor, [silent.getsockname()], interface="127.0.0.1", deadline=0.6)
        self.assertEqual(report.nat, "blocked", report.reason)

    async def test_cancel(self) -> None:
        """Cancelling discover_nat stops its queries and closes its socket (trial checks the reactor is clean)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
            silent.bind(("127.0.0.1", 0))
            d = discover_nat(reactor, [silent.getsockname()], interface="127.0.0.1")
            d.cancel()
            with self.assertRaises(CancelledError):
                await d

    async def test_ipv6(self) -> None:
        """The same on ::1, where the answer's address is IPv6."""
        try:
            server = self.listen(StunServer(), "::1")
        except Exception as e:
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from None
        owner = StunProtocol(reactor)
        port = self.listen(owner, "::1")
        mapped = await owner.client.query(("::1", server.getHost().port), deadline=5)
        self.assertEqual(mapped, ("::1", port.getHost().port))


class RelayOptionTests(unittest.TestCase):
    """twist pluresync-relay --udp-port."""

    timeout = 60

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(["--auth", "open", *argv])
        return options

    def test_option(self) -> None:
        """Off by default; a port from 1 to 65534."""
        self.assertIsNone(self.parse()["udp-port"])
        self.assertEqual(self.parse("--udp-port", "3478")["udp-port"], 3478)
        for bad in ("0", "65535", "x", "-1"):
            self.assertRaises(usage.UsageError, self.parse, "--udp-port", bad)

    def test_interface(self) -> None:
        """The STUN ports bind where --port listens."""
        for endpoint, interface in (
            ("tcp:8080", ""),
            ("tcp:8080:interface=127.0.0.1", "127.0.0.1"),
            ("tcp6:443", "::"),
            ("tcp6:443:interface=\\:\\:1", "::1"),
            ("ssl:443:interface=10.0.0.5:privateKey=k.pem", "10.0.0.5"),
            ("unix:/run/relay.sock", ""),
        ):
            self.assertEqual(stun_interface(endpoint), interface, endpoint)

    def test_make_service(self) -> None:
        """makeService listens for STUN on N and N+1, on --port's interface; not at all without the option."""
        memory = UdpMemoryReactor()
        service = makeService(
            self.parse("--port", "tcp:1234:interface=127.0.0.1", "--udp-port", "3478"), reactor=memory
        )
        verifyObject(IService, service)
        service.privilegedStartService()
        service.startService()
        self.assertEqual([(p, i) for p, _, i in memory.udpServers], [(3478, "127.0.0.1"), (3479, "127.0.0.1")])
        self.assertEqual([type(proto) for _, proto, _ in memory.udpServers], [StunServer, StunServer])
        self.assertEqual(list(service.stun_servers), [proto for _, proto, _ in memory.udpServers])
        plain = makeService(self.parse("--port", "tcp:1235:interface=127.0.0.1"), reactor=UdpMemoryReactor())
        self.assertEqual(plain.stun_servers, ())
        return service.stopService()

    async def test_make_service_answers(self) -> None:
        """The relay service from makeService, on the real reactor, classifies a loopback client as open."""
        udp = free_udp_pair()
        service = makeService(
            self.parse(
                "--port", f"tcp:{free_port()}:interface=127.0.0.1", "--udp-port", str(udp), "--ping-interval", "0"
            )
        )
        self.assertIsInstance(service, RelayService)
        service.privilegedStartService()
        service.startService()
        try:
            report = await discover_nat(reactor, [("127.0.0.1", udp), ("127.0.0.1", udp + 1)], interface="127.0.0.1")
        finally:
            await service.stopService()
        self.assertEqual(report.nat, "open", report.reason)
        self.assertEqual([s.answered for s in service.stun_servers], [1, 1])

    async def test_relay_process(self) -> None:
        """A real `twist pluresync-relay --udp-port N` answers on N and N+1 and logs it."""
        udp = free_udp_pair()
        relay = await start_relay(self, extra=["--udp-port", str(udp)])
        report = await discover_nat(reactor, [("127.0.0.1", udp), ("127.0.0.1", udp + 1)], interface="127.0.0.1")
        self.assertEqual(report.nat, "open", report.reason)
        self.assertEqual(report.mapped.host, "127.0.0.1")
        self.assertIn(f"STUN on UDP ports {udp} and {udp + 1} (127.0.0.1)", relay.output)


class UdpMemoryReactor(MemoryReactorClock):
    """A MemoryReactorClock that records listenUDP calls too."""

    def __init__(self) -> None:
        super().__init__()
        self.udpServers: list[tuple[int, Any, str]] = []

    def listenUDP(self, port: int, protocol: Any, interface: str = "", maxPacketSize: int = 8192) -> Any:
        self.udpServers.append((port, protocol, interface))
        return FakeUdpPort()


class FakeUdpPort:
    def stopListening(self) -> None:
        return None
