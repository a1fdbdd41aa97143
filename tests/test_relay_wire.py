"""
Relay protocol v1 control messages: parsing, validation and encoding, in
both directions (each encoder against the other side's parser).
"""

from __future__ import annotations

import json

from twisted.trial import unittest

from pluresync.relay.core.wire import (
    MAX_CONTROL_BYTES,
    Accept,
    Connect,
    ErrorCode,
    Incoming,
    Listen,
    Paired,
    ProtocolError,
    Ready,
    RelayErrorMessage,
    RelayMessageError,
    encode_accept,
    encode_connect,
    encode_error,
    encode_incoming,
    encode_listen,
    encode_paired,
    encode_ready,
    parse_control,
    parse_relay_message,
    short_id,
)

RDV = "ab" * 32
PEER = "0f" * 32


def dumps(obj: object) -> bytes:
    return json.dumps(obj).encode("utf-8")


class ParseTests(unittest.TestCase):
    """parse_control accepts the three messages and rejects the rest."""

    def assertRejected(self, payload: bytes, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        error = self.assertRaises(ProtocolError, parse_control, payload)
        self.assertEqual(error.code, code)
        self.assertNotIn(RDV, error.message)

    def test_listen(self) -> None:
        """A listen gives rdv and peer."""
        self.assertEqual(
            parse_control(dumps({"v": 1, "op": "listen", "rdv": RDV, "peer": PEER})),
            Listen(rdv=RDV, peer=PEER),
        )

    def test_listen_needs_peer(self) -> None:
        """A listen without peer is a bad request."""
        self.assertRejected(dumps({"v": 1, "op": "listen", "rdv": RDV}))

    def test_connect_minimal(self) -> None:
        """A connect needs only rdv; the rest defaults to None."""
        self.assertEqual(
            parse_control(dumps({"v": 1, "op": "connect", "rdv": RDV})),
            Connect(rdv=RDV, peer=None, from_=None, wait=None),
        )

    def test_connect_full(self) -> None:
        """A connect carries peer, from and wait."""
        message = {"v": 1, "op": "connect", "rdv": RDV, "peer": PEER, "from": RDV, "wait": 2}
        self.assertEqual(parse_control(dumps(message)), Connect(rdv=RDV, peer=PEER, from_=RDV, wait=2.0))

    def test_null_optional_is_absent(self) -> None:
        """null for an optional field counts as absent."""
        message = {"v": 1, "op": "connect", "rdv": RDV, "peer": None, "from": None, "wait": None}
        self.assertEqual(parse_control(dumps(message)), Connect(RDV, None, None, None))

    def test_accept(self) -> None:
        """An accept gives the session."""
        self.assertEqual(
            parse_control(dumps({"v": 1, "op": "accept", "session": "0123456789abcdef" * 2})),
            Accept(session="0123456789abcdef" * 2),
        )

    def test_unknown_fields_ignored(self) -> None:
        """Unknown extra fields are ignored (forward compatibility)."""
        message = {"v": 1, "op": "listen", "rdv": RDV, "peer": PEER, "future": [1, 2]}
        self.assertEqual(parse_control(dumps(message)), Listen(RDV, PEER))

    def test_not_json(self) -> None:
        """Non-JSON, invalid UTF-8, non-objects and JSON constants are bad requests."""
        for payload in (b"", b"{", b"\xff\xfe", b"[]", b"1", b'"listen"', b"null"):
            self.assertRejected(payload)
        self.assertRejected(b'{"v":1,"op":"connect","rdv":"' + RDV.encode() + b'","wait":NaN}')

    def test_version(self) -> None:
        """v must be the integer 1 (not 2, "1", 1.0, true or missing)."""
        for version in (2, "1", 1.0, True, None):
            self.assertRejected(dumps({"v": version, "op": "listen", "rdv": RDV, "peer": PEER}))
        self.assertRejected(dumps({"op": "listen", "rdv": RDV, "peer": PEER}))

    def test_op(self) -> None:
        """An unknown or non-string op is a bad request."""
        for op in ("dance", "LISTEN", 1, None):
            self.assertRejected(dumps({"v": 1, "op": op, "rdv": RDV, "peer": PEER}))

    def test_hex64(self) -> None:
        """rdv, peer and from must be exactly 64 lowercase hex characters."""
        bad_values = (RDV.upper(), RDV[:-1], RDV + "a", "zz" * 32, 5, ["x"], "")
        for bad in bad_values:
            self.assertRejected(dumps({"v": 1, "op": "connect", "rdv": bad}))
            self.assertRejected(dumps({"v": 1, "op": "connect", "rdv": RDV, "peer": bad}))
            self.assertRejected(dumps({"v": 1, "op": "connect", "rdv": RDV, "from": bad}))
            self.assertRejected(dumps({"v": 1, "op": "listen", "rdv": RDV, "peer": bad}))

    def test_wait(self) -> None:
        """wait must be a finite number >= 0."""
        for bad in (-1, "5", True, [1], 1e400):
            self.assertRejected(dumps({"v": 1, "op": "connect", "rdv": RDV, "wait": bad}))
        message = parse_control(dumps({"v": 1, "op": "connect", "rdv": RDV, "wait": 0.5}))
        assert isinstance(message, Connect)
        self.assertEqual(message.wait, 0.5)

    def test_session(self) -> None:
        """session must be 32 lowercase hex characters."""
        for bad in ("A" * 32, "a" * 31, "a" * 33, 7, None):
            self.assertRejected(dumps({"v": 1, "op": "accept", "session": bad}))

    def test_too_large(self) -> None:
        """A control message above 4096 bytes is too-large."""
        message = {"v": 1, "op": "listen", "rdv": RDV, "peer": PEER}
        message["pad"] = "x" * (MAX_CONTROL_BYTES - len(dumps(message)) - 11)
        self.assertEqual(len(dumps(message)), MAX_CONTROL_BYTES)
        parse_control(dumps(message))
        message["pad"] += "x"
        self.assertRejected(dumps(message), ErrorCode.TOO_LARGE)


class EncodeTests(unittest.TestCase):
    """The relay's messages and the error codes."""

    def test_messages(self) -> None:
        """Each relay message is compact JSON with the documented fields."""
        self.assertEqual(json.loads(encode_ready()), {"op": "ready"})
        self.assertEqual(
            json.loads(encode_incoming("ab" * 16, None)),
            {"op": "incoming", "session": "ab" * 16, "peer": None},
        )
        self.assertEqual(json.loads(encode_paired(PEER)), {"op": "paired", "peer": PEER})
        self.assertEqual(
            json.loads(encode_error(ErrorCode.NO_LISTENER, "none")),
            {"op": "error", "code": "no-listener", "message": "none"},
        )
        self.assertNotIn(b" ", encode_incoming("ab" * 16, PEER))

    def test_close_codes(self) -> None:
        """Every error code has its close code."""
        self.assertEqual(
            {code.value: code.close_code for code in ErrorCode},
            {
                "bad-request": 4000,
                "unauthorized": 4001,
                "no-listener": 4004,
                "no-session": 4005,
                "timeout": 4008,
                "too-large": 4009,
                "peer-gone": 4010,
                "rate-limited": 4029,
            },
        )

    def test_from_close_code(self) -> None:
        """Each error's close code maps back to it; other closes are no error."""
        for code in ErrorCode:
            self.assertIs(ErrorCode.from_close_code(code.close_code), code)
        for other in (1000, 1001, 1006, 4999, None):
            self.assertIsNone(ErrorCode.from_close_code(other))

    def test_short_id(self) -> None:
        """Ids are logged as 8-character prefixes."""
        self.assertEqual(short_id(RDV), "abababab")
        self.assertEqual(short_id(None), "-")


SESSION = "0123456789abcdef" * 2
LIMITS = {"session_bytes_per_second": None, "session_bytes": 10, "session_seconds": None, "max_message": 262144}


class ClientEncodeTests(unittest.TestCase):
    """A client's hellos are exactly what the relay's parser accepts."""

    def test_listen_round_trip(self) -> None:
        """encode_listen parses back to the same Listen."""
        self.assertEqual(parse_control(encode_listen(RDV, PEER)), Listen(rdv=RDV, peer=PEER))

    def test_connect_round_trip(self) -> None:
        """encode_connect parses back to the same Connect, with every optional field given or absent."""
        for peer in (None, PEER):
            for from_ in (None, RDV):
                for wait in (None, 0, 2.5, 30):
                    with self.subTest(peer=peer, from_=from_, wait=wait):
                        self.assertEqual(
                            parse_control(encode_connect(RDV, peer, from_, wait)),
                            Connect(rdv=RDV, peer=peer, from_=from_, wait=wait),
                        )

    def test_connect_leaves_out_absent_fields(self) -> None:
        """Absent optional fields are not sent at all (not even as null)."""
        self.assertEqual(json.loads(encode_connect(RDV, None, None, None)), {"v": 1, "op": "connect", "rdv": RDV})

    def test_accept_round_trip(self) -> None:
        """encode_accept parses back to the same Accept."""
        self.assertEqual(parse_control(encode_accept(SESSION)), Accept(session=SESSION))

    def test_compact(self) -> None:
        """Hellos are compact JSON, well under the relay's 4096-byte limit."""
        hello = encode_connect(RDV, PEER, PEER, 30.0)
        self.assertNotIn(b" ", hello)
        self.assertLess(len(hello), MAX_CONTROL_BYTES)

    def test_refuses_what_the_relay_would(self) -> None:
        """Arguments the relay would refuse fail at once with ValueError, never reaching the wire."""
        for bad in (RDV.upper(), RDV[:-1], "", None, 5):
            self.assertRaises(ValueError, encode_listen, bad, PEER)
            self.assertRaises(ValueError, encode_listen, RDV, bad)
            self.assertRaises(ValueError, encode_connect, bad, None, None, None)
        for bad in (RDV.upper(), RDV[:-1], ""):
            self.assertRaises(ValueError, encode_connect, RDV, bad, None, None)
            self.assertRaises(ValueError, encode_connect, RDV, None, bad, None)
        for bad in (-1, float("nan"), float("inf"), True, "5"):
            self.assertRaises(ValueError, encode_connect, RDV, None, None, bad)
        for bad in (SESSION.upper(), SESSION[:-1], RDV, None):
            self.assertRaises(ValueError, encode_accept, bad)


class RelayMessageTests(unittest.TestCase):
    """parse_relay_message is the inverse of the relay's encoders, and strict."""

    def assertMalformed(self, payload: bytes, *words: str) -> None:
        error = self.assertRaises(RelayMessageError, parse_relay_message, payload)
        for word in words:
            self.assertIn(word, str(error))

    def test_ready_round_trip(self) -> None:
        """ready, with and without limits."""
        self.assertEqual(parse_relay_message(encode_ready()), Ready(limits=None))
        self.assertEqual(parse_relay_message(encode_ready(LIMITS)), Ready(limits=LIMITS))

    def test_incoming_round_trip(self) -> None:
        """incoming, with a declared peer and without."""
        self.assertEqual(parse_relay_message(encode_incoming(SESSION, None)), Incoming(SESSION, None))
        self.assertEqual(parse_relay_message(encode_incoming(SESSION, PEER)), Incoming(SESSION, PEER))

    def test_paired_round_trip(self) -> None:
        """paired, with and without a peer and limits."""
        for peer in (None, PEER):
            for limits in (None, LIMITS):
                with self.subTest(peer=peer, limits=limits):
                    self.assertEqual(parse_relay_message(encode_paired(peer, limits)), Paired(peer, limits))

    def test_error_round_trip(self) -> None:
        """error, for every code, with and without a retry hint."""
        for code in ErrorCode:
            for retry in (None, 7.0):
                with self.subTest(code=code, retry=retry):
                    message = parse_relay_message(encode_error(code, "why", retry))
                    self.assertEqual(message, RelayErrorMessage(code.value, "why", retry))
                    assert isinstance(message, RelayErrorMessage)
                    self.assertIs(message.error_code, code)

    def test_unknown_error_code_kept(self) -> None:
        """A code this client does not know (a newer relay) is kept as text; error_code is None."""
        message = parse_relay_message(dumps({"op": "error", "code": "new-thing", "message": "m"}))
        self.assertEqual(message, RelayErrorMessage("new-thing", "m"))
        assert isinstance(message, RelayErrorMessage)
        self.assertIsNone(message.error_code)

    def test_unknown_fields_and_nulls(self) -> None:
        """Unknown fields are ignored; a null optional field is absent."""
        self.assertEqual(parse_relay_message(dumps({"op": "ready", "limits": None, "x": 1})), Ready())
        self.assertEqual(
            parse_relay_message(dumps({"op": "paired", "v": 1, "extra": [1]})),
            Paired(peer=None, limits=None),
        )
        self.assertEqual(
            parse_relay_message(dumps({"op": "error", "code": "timeout", "message": "", "retry": None})),
            RelayErrorMessage("timeout", ""),
        )

    def test_not_a_message(self) -> None:
        """Not UTF-8, not JSON, not an object, or a JSON constant: malformed, saying so."""
        for payload in (b"", b"{", b"\xff", b"[]", b'"ready"', b"null"):
            self.assertMalformed(payload)
        self.assertMalformed(b'{"op":"error","code":"x","message":"","retry":NaN}', "NaN")

    def test_op(self) -> None:
        """A missing, non-string or unknown op is malformed (the client's own ops too)."""
        self.assertMalformed(dumps({"session": SESSION}), '"op"')
        self.assertMalformed(dumps({"op": 1}), '"op"')
        for op in ("listen", "connect", "accept", "READY", "dance"):
            self.assertMalformed(dumps({"op": op}), "unknown op")

    def test_fields_checked(self) -> None:
        """The fields a client acts on (session, code) are checked for type and form."""
        for session in (None, 7, SESSION.upper(), SESSION[:-1]):
            self.assertMalformed(dumps({"op": "incoming", "session": session, "peer": None}), '"session"')
        self.assertMalformed(dumps({"op": "error", "message": "m"}), '"code"')
        self.assertMalformed(dumps({"op": "error", "code": "", "message": "m"}), '"code"')

    def test_informative_fields_lenient(self) -> None:
        """
        A malformed peer, limits, message or retry counts as absent: a
        refusal's code or a pairing is never lost to a field only reported.
        """
        for peer in (7, PEER.upper(), "x"):
            incoming = dumps({"op": "incoming", "session": SESSION, "peer": peer})
            self.assertEqual(parse_relay_message(incoming).peer, None)
            self.assertEqual(parse_relay_message(dumps({"op": "paired", "peer": peer})).peer, None)
        for limits in ([1], "none", 5):
            self.assertIsNone(parse_relay_message(dumps({"op": "ready", "limits": limits})).limits)
            self.assertIsNone(parse_relay_message(dumps({"op": "paired", "peer": None, "limits": limits})).limits)
        error = parse_relay_message(dumps({"op": "error", "code": "no-listener"}))
        self.assertEqual((error.code, error.message, error.retry), ("no-listener", "", None))
        for retry in (-1, "5", True):
            message = dumps({"op": "error", "code": "timeout", "message": None, "retry": retry})
            self.assertEqual(parse_relay_message(message).retry, None)
        self.assertIsNone(parse_relay_message(b'{"op":"error","code":"timeout","message":"","retry":1e400}').retry)

    def test_session_seconds(self) -> None:
        """
        ready's and paired's session_seconds: a positive number, else no cap
        (null, absent, an older relay without limits, or malformed).
        """
        for message in (Ready, lambda limits: Paired(None, limits)):
            self.assertEqual(message({"session_seconds": 295}).session_seconds, 295.0)
            self.assertEqual(message({"session_seconds": 2.5, "max_message": 262144}).session_seconds, 2.5)
            self.assertIsNone(message(None).session_seconds)
            for value in (None, 0, -1, "295", True, [295]):
                self.assertIsNone(message({"session_seconds": value}).session_seconds, value)
            self.assertIsNone(message({"max_message": 262144}).session_seconds)
        ready = parse_relay_message(b'{"op":"ready","limits":{"session_seconds":1e400}}')
        self.assertIsNone(ready.session_seconds)


class DeclineWireTests(unittest.SynchronousTestCase):
    """The listener's decline (issue 15, item 3)."""

    def test_round_trip(self) -> None:
        from pluresync.relay.core.wire import Decline, encode_decline

        session = "ab" * 16
        message = parse_control(encode_decline(session, ErrorCode.RATE_LIMITED, "HTTP 429", 3.0))
        self.assertEqual(message, Decline(session, ErrorCode.RATE_LIMITED, "HTTP 429", 3.0))

    def test_refused(self) -> None:
        session = "ab" * 16
        for bad in (
            {"v": 1, "op": "decline", "session": "x", "code": "rate-limited"},
            {"v": 1, "op": "decline", "session": session, "code": "no-listener"},
            {"v": 1, "op": "decline", "session": session, "code": "peer-gone", "retry": -1},
            {"v": 1, "op": "decline", "session": session, "code": "peer-gone", "reason": 5},
        ):
            with self.assertRaises(ProtocolError):
                parse_control(json.dumps(bad).encode())

    def test_ready_announces(self) -> None:
        from pluresync.relay.core.wire import encode_ready

        self.assertTrue(parse_relay_message(encode_ready(None, decline=True)).decline)
        self.assertFalse(parse_relay_message(encode_ready(None)).decline)
