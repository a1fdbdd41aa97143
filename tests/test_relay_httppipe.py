"""
The Twisted relay's HTTP pipe (relay/server/httppipe.py) on fakes: the
relay's site on a L{MemoryReactorClock}, each HTTP connection a
L{StringTransport}, and the bytes checked against docs/protocol.md "HTTP pipe".
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from pluresync.interfaces import IPairEnd
from pluresync.relay.core import httpwire as w
from pluresync.relay.core.auth import AuthResult
from pluresync.relay.core.limits import RelayLimits
from pluresync.relay.core.ratelimit import RateLimits
from pluresync.relay.core.wire import encode_listen
from pluresync.relay.server.site import build_site

RDV = "ab" * 32
PEER = "cd" * 32


class Connection:
    """One HTTP/1.1 connection to the site."""

    def __init__(self, site) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
        self.channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def response(self) -> tuple[int, dict[bytes, bytes], bytes, bool]:
        """The status, headers, body (de-chunked) so far, and whether the chunked body ended."""
        raw = self.transport.value()
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"transfer-encoding") != b"chunked":
            return status, headers, rest, True
        body = b""
        ended = False
        while rest:
            size_line, sep, rest = rest.partition(b"\r\n")
            if not sep:
                break
            size = int(size_line, 16)
            if size == 0:
                ended = True
                break
            body += rest[:size]
            rest = rest[size + 2 :]
        return status, headers, body, ended


def frames(body: bytes) -> list[tuple[int, bytes]]:
    got = []
    w.FrameReader(lambda fin, kind, payload: got.append((kind, payload)), 1 << 20, w.DOWNSTREAM_KINDS).feed(body)
    return got


def downstream_request() -> bytes:
    return b"POST /pipe HTTP/1.1\r\nHost: relay\r\nContent-Length: 0\r\n\r\n"


def upstream_head(token: str, seq: int, length: int | None = None) -> bytes:
    framing = b"Transfer-Encoding: chunked" if length is None else b"Content-Length: %d" % length
    return b"POST /pipe HTTP/1.1\r\nHost: relay\r\nPluresync-Pipe: %s\r\nPluresync-Seq: %d\r\n%s\r\n\r\n" % (
        token.encode(),
        seq,
        framing,
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class RefuseAll:
    mode = "tokens"

    def check(self, authorization_header, now):
        return AuthResult.refuse("missing")


class HttpPipeResourceTests(TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.site, self.factory = build_site(self.clock, RelayLimits(ping_interval=5, ping_timeout=2))

    def open(self) -> tuple[Connection, str]:
        down = Connection(self.site)
        down.send(downstream_request())
        status, headers, body, ended = down.response()
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-type"], w.CONTENT_TYPE)
        self.assertIn(b"no-store", headers[b"cache-control"])
        [(kind, payload)] = frames(body)
        self.assertEqual(kind, w.OPEN)
        opened = w.parse_open(payload)
        self.assertEqual((opened.max_post, opened.ping), (w.DEFAULT_MAX_POST, 5.0))
        self.assertFalse(ended)
        return down, opened.pipe

    def listen(self) -> tuple[Connection, Connection, str]:
        down, token = self.open()
        up = Connection(self.site)
        up.send(upstream_head(token, 0) + chunk(w.frame(w.TEXT, encode_listen(RDV, PEER))))
        return down, up, token

    def test_listen_answers_ready_on_the_downstream(self):
        """A hello in a streaming upstream is answered on the downstream; the pipe is a relay socket."""
        down, up, token = self.listen()
        _, _, body, _ = down.response()
        kinds = frames(body)
        self.assertEqual(kinds[1][0], w.TEXT)
        self.assertIn(b'"op":"ready"', kinds[1][1])
        self.assertEqual(up.transport.value(), b"")  # the streaming upstream is not answered while it streams
        pipe = self.site.pipes.find(token)
        verifyObject(IPairEnd, pipe)
        self.assertIn(pipe, self.factory.sockets)
        self.assertEqual(self.factory.registry.listener_count, 1)

    def test_ping_and_liveness(self):
        """The relay pings every interval; a pipe silent for longer than interval + timeout is dropped."""
        down, up, token = self.listen()
        self.clock.advance(5)
        self.assertEqual(frames(down.response()[2])[-1], (w.PING, b""))
        up.send(chunk(w.frame(w.PONG)))
        self.clock.advance(5)
        self.assertIsNotNone(self.site.pipes.find(token))
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertIsNone(self.site.pipes.find(token))
        self.assertTrue(down.transport.disconnecting)
        self.assertEqual(self.factory.registry.listener_count, 0)
        self.assertEqual(self.factory.sockets, set())

    def test_hello_timeout(self):
        """No hello within the hello timeout: an error and close 4008 on the downstream, which ends."""
        self.site, self.factory = build_site(self.clock, RelayLimits(hello_timeout=3, ping_interval=5))
        down, token = self.open()
        self.clock.advance(3)
        _, _, body, ended = down.response()
        got = frames(body)
        self.assertIn(b'"code":"timeout"', got[1][1])
        self.assertEqual(got[2], (w.CLOSE, w.encode_close(4008, "timeout")[5:]))
        self.assertTrue(ended)
        self.assertIsNone(self.site.pipes.find(token))

    def test_unknown_pipe(self):
        """An upstream for no pipe is answered 404 at once, and its connection closed."""
        up = Connection(self.site)
        up.send(upstream_head("A" * 43, 0))
        self.assertTrue(up.transport.value().startswith(b"HTTP/1.1 404 "))
        self.assertTrue(up.transport.disconnecting)

    def test_out_of_order(self):
        """An upstream whose number is not the next one: 409, and the pipe ends with bad-request (4000)."""
        down, token = self.open()
        up = Connection(self.site)
        up.send(upstream_head(token, 1))
        self.assertTrue(up.transport.value().startswith(b"HTTP/1.1 409 "))
        _, _, body, ended = down.response()
        self.assertEqual(frames(body)[-1], (w.CLOSE, w.encode_close(4000, "bad-request")[5:]))
        self.assertTrue(ended)

    def test_retried_upstream_is_dropped(self):
        """A proxy's retry of the last completed upstream is answered 204 and changes nothing."""
        down, token = self.open()
        hello = w.frame(w.TEXT, encode_listen(RDV, PEER))
        up = Connection(self.site)
        up.send(upstream_head(token, 0, len(hello)) + hello)
        self.assertTrue(up.transport.value().startswith(b"HTTP/1.1 204 "))
        again = Connection(self.site)
        again.send(upstream_head(token, 0, len(hello)) + hello)
        self.assertTrue(again.transport.value().startswith(b"HTTP/1.1 204 "))
        self.assertEqual(self.factory.registry.listener_count, 1)
        self.assertEqual(len(frames(down.response()[2])), 2)  # open, ready: no error for a second hello

    def test_too_large_body(self):
        """A bounded upstream over max_post: 413, and the pipe ends with too-large (4009)."""
        down, token = self.open()
        up = Connection(self.site)
        up.send(upstream_head(token, 0, w.DEFAULT_MAX_POST + 1))
        self.assertTrue(up.transport.value().startswith(b"HTTP/1.1 413 "))
        self.assertEqual(frames(down.response()[2])[-1][1][:2], b"\x0f\xa9")

    def test_frame_breach_drops_the_pipe(self):
        """A frame that breaks the rules ends the pipe without a close frame (as a WebSocket's 1006)."""
        down, token = self.open()
        up = Connection(self.site)
        up.send(upstream_head(token, 0) + chunk(b"\xc1\x00\x00\x00\x00"))
        self.assertTrue(down.transport.disconnecting)
        self.assertNotIn(w.CLOSE, [kind for kind, _ in frames(down.response()[2])])
        self.assertIsNone(self.site.pipes.find(token))

    def test_client_close(self):
        """The client's close is echoed on the downstream, which ends; the upstream still gets its 204."""
        down, up, token = self.listen()
        up.send(chunk(w.encode_close(1000)) + b"0\r\n\r\n")
        _, _, body, ended = down.response()
        self.assertEqual(frames(body)[-1], (w.CLOSE, b"\x03\xe8"))
        self.assertTrue(ended)
        self.assertTrue(up.transport.value().startswith(b"HTTP/1.1 204 "))
        self.assertEqual(self.factory.registry.listener_count, 0)

    def test_refused_without_token(self):
        """A relay that requires a token refuses the downstream with 401, as it refuses an upgrade."""
        self.factory.authenticator = RefuseAll()
        down = Connection(self.site)
        down.send(downstream_request())
        status, headers, _, _ = down.response()
        self.assertEqual(status, 401)
        self.assertEqual(headers[b"www-authenticate"], b'Bearer realm="pluresync-relay"')
        self.assertIn(b"(missing)", down.transport.value().split(b"\r\n")[0])
        self.assertEqual(len(self.site.pipes), 0)

    def test_shutdown(self):
        """At shutdown a pipe gets 1001 going away, like every WebSocket."""
        down, up, token = self.listen()
        self.factory.close_all()
        _, _, body, ended = down.response()
        self.assertEqual(frames(body)[-1], (w.CLOSE, w.encode_close(1001, "going away")[5:]))
        self.assertTrue(ended)

    def test_per_address_limit(self):
        """
        A pipe counts against the per-address limit as a WebSocket does (its
        downstream is the connection counted): 429 with Retry-After, and the
        slot is free again once the pipe ends.
        """
        limits = RelayLimits(ping_interval=5, rate=RateLimits(connections_per_address=1))
        self.site, self.factory = build_site(self.clock, limits)
        down, token = self.open()
        second = Connection(self.site)
        second.send(downstream_request())
        status, headers, _, _ = second.response()
        self.assertEqual(status, 429)
        self.assertIn(b"retry-after", headers)
        self.assertEqual(len(self.site.pipes), 1)
        down.channel.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(self.site.pipes.find(token))
        self.open()
