"""
docs/protocol.md's end-to-end rules that need a real relay: a raw peer,
written from the text (its own WebSocket client, the Noise handshake and
records sealed by hand), against a pluresync listener, through a relay
process.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from pluresync.keys import PeerIdentity, SyncKey
from pluresync.secure.frames import SEQ, FrameDecoder, RecordType, frame, split_record
from pluresync.secure.handshake import Handshake
from pluresync.session import wire
from pluresync.session.wire import Hello, Intent, parse_ready

from .relayclient import connect as relay_socket
from .relayprocess import start_relay

MIB = 1024 * 1024


class _Counter(Protocol):
    """Fires C{done} once C{expected} bytes arrived; fails it if the connection ends first."""

    def __init__(self, expected: int, done: Deferred) -> None:
        self.expected = expected
        self.done = done
        self.data = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.expected and not self.done.called:
            self.done.callback(bytes(self.data))

    def connectionLost(self, reason=None) -> None:
        if not self.done.called:
            self.done.errback(reason)


class RawPeer:
    """An initiator that follows docs/protocol.md by hand over a relay test socket."""

    def __init__(self, socket, key: SyncKey) -> None:
        self.socket = socket
        self.decoder = FrameDecoder()
        self.handshake = Handshake(
            True,
            PeerIdentity.generate(),
            key.topic(),
            payload=lambda: Hello(Intent.NEW, bytes(16), 0, 16 * MIB).encode(),
        )

    async def next_body(self) -> bytes:
        for _ in range(100):
            body = self.decoder.next()
            if body is not None:
                return body
            payload, binary = await self.socket.next_message()
            assert binary, payload
            self.decoder.feed(payload)
        raise AssertionError("no frame")

    async def handshake_done(self) -> None:
        (frame1,) = self.handshake.start()
        self.socket.send_bytes(frame(frame1))
        out, _ = self.handshake.receive(await self.next_body())
        self.socket.send_bytes(b"".join(frame(body) for body in out))
        keys = self.handshake.pending()
        self.send, self.receive = keys.send, keys.receive
        seq, ciphertext = split_record(await self.next_body())
        plaintext = self.receive.decrypt(b"", ciphertext)
        assert plaintext[0] == RecordType.READY and parse_ready(plaintext[1:]).status == 0, plaintext

    def seal(self, plaintext: bytes) -> bytes:
        seq = self.send.nonce
        return frame(SEQ.pack(seq) + self.send.encrypt(b"", plaintext))


class MessageSizeTests(TestCase):
    """ "Message size": a peer accepts every message up to the max_message its relay announced."""

    timeout = 60

    async def send_through(self, total: int, record: int = 65_000) -> None:
        """
        A raw peer sends USE, START(0) and C{total} bytes of DATA records in
        one WebSocket message; the listener's protocol must get them all.
        """
        relay = await start_relay(self, ["--max-message", str(MIB)])
        key = SyncKey.generate()
        payload = os.urandom(total)
        done: Deferred = Deferred()
        url = relay.url.replace(":", "\\:")
        built: list[_Counter] = []

        def build() -> _Counter:
            built.append(_Counter(len(payload), done))
            return built[-1]

        port = await serverFromString(reactor, f"relay:url={url}:key={key.to_text()}").listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(port.stopListening)
        socket = relay_socket(reactor, relay.port)
        await socket.opened
        self.addCleanup(socket.abort)
        socket.closed.addCallback(
            lambda closed: done.called or done.errback(AssertionError(f"the relay closed the raw peer: {closed}"))
        )
        socket.send_json({"v": 1, "op": "connect", "rdv": key.topic().rendezvous_id.hex(), "wait": 20})
        paired = await socket.next_json()
        self.assertEqual((paired["op"], paired["limits"]["max_message"]), ("paired", MIB))
        peer = RawPeer(socket, key)
        await peer.handshake_done()
        records = [peer.seal(bytes([RecordType.USE])), peer.seal(wire.start_record(0))]
        for start in range(0, len(payload), record):
            records.append(peer.seal(wire.data_record(RecordType.DATA, 0, payload[start : start + record])))
        message = b"".join(records)
        self.assertLessEqual(len(message), MIB)
        socket.send_bytes(message)
        try:
            self.assertEqual(await done, payload)
        finally:
            for protocol in built:  # end the listener's session now, not at its resume limit
                if protocol.transport is not None:
                    protocol.transport.abortConnection()

    async def test_records_joined_in_one_message(self):
        """A raw peer written from the text, joining 4 records in one 200 KB message, is understood."""
        await self.send_through(3 * 65_000)

    async def test_one_mebibyte_message_through_a_relay_announcing_it(self):
        """A message of 1,040,000+ bytes (16 records) through a relay that announced max_message 1 MiB."""
        await self.send_through(16 * 65_000)


class CarrierEndTests(TestCase):
    """ "Ending a carrier", seen through a real relay by a raw peer."""

    timeout = 60

    async def raw_pair(self, listener_key: SyncKey, peer_key: SyncKey):
        """A pluresync listener, and a raw initiator paired with it through a relay process."""
        relay = await start_relay(self)
        url = relay.url.replace(":", "\\:")
        self.built: list[_Counter] = []

        def build() -> _Counter:
            self.built.append(_Counter(1, Deferred()))
            self.built[-1].done.addErrback(lambda _: None)
            return self.built[-1]

        port = await serverFromString(reactor, f"relay:url={url}:key={listener_key.to_text()}").listen(
            Factory.forProtocol(build)
        )
        self.addCleanup(port.stopListening)
        self.addCleanup(self.abort_built)
        socket = relay_socket(reactor, relay.port)
        await socket.opened
        self.addCleanup(socket.abort)
        socket.send_json({"v": 1, "op": "connect", "rdv": listener_key.topic().rendezvous_id.hex(), "wait": 20})
        self.assertEqual((await socket.next_json())["op"], "paired")
        return socket, RawPeer(socket, peer_key)

    def abort_built(self) -> None:
        for protocol in self.built:  # end the listener's session now, not at its resume limit
            if protocol.transport is not None:
                protocol.transport.abortConnection()

    async def test_notice_then_close_1000(self):
        """A wrong key: the listener's notice 0x01 arrives, then the relay's 1000 (the listener closed, not aborted)."""
        listener_key = SyncKey.generate()
        socket, peer = await self.raw_pair(listener_key, SyncKey.generate())
        # Paired on the listener's rendezvous id, the raw peer's psk is another key's.
        (frame1,) = peer.handshake.start()
        socket.send_bytes(frame(frame1))
        out, _ = peer.handshake.receive(await peer.next_body())
        socket.send_bytes(b"".join(frame(body) for body in out))
        self.assertEqual(await peer.next_body(), b"\x01")
        _, code, _ = await socket.closed
        self.assertEqual(code, 1000)

    async def test_record_error_aborts(self):
        """A record that fails authentication on a link in use: the listener aborts, the relay says 4010."""
        key = SyncKey.generate()
        socket, peer = await self.raw_pair(key, key)
        await peer.handshake_done()
        socket.send_bytes(peer.seal(bytes([RecordType.USE])) + peer.seal(wire.start_record(0)))
        tampered = bytearray(peer.seal(wire.data_record(RecordType.DATA, 0, b"x")))
        tampered[-1] ^= 1
        socket.send_bytes(bytes(tampered))
        _, code, reason = await socket.closed
        self.assertEqual((code, reason), (4010, "peer-gone"))
