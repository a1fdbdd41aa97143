"""
Relay protocol v1 control messages: parsing, validation and encoding.
"""

from __future__ import annotations

import json

from twisted.trial import unittest

from pluresync.relay.core.wire import (
    MAX_CONTROL_BYTES,
    Accept,
    Connect,
    ErrorCode,
    Listen,
    ProtocolError,
    encode_error,
    encode_incoming,
    encode_paired,
    encode_ready,
    parse_control,
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

    def test_short_id(self) -> None:
        """Ids are logged as 8-character prefixes."""
        self.assertEqual(short_id(RDV), "abababab")
        self.assertEqual(short_id(None), "-")
