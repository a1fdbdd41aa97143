"""
The control messages of relay protocol v1: parsing, validation, encoding.

Pure Python: no Twisted, no Autobahn.  C{docs/protocol.md} is the
specification; this module is its executable form.
"""

from __future__ import annotations

import enum
import json
import math
import re
from dataclasses import dataclass
from typing import Any

SUBPROTOCOL = "pluresync.v1"
VERSION = 1
MAX_CONTROL_BYTES = 4096

CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001

_HEX64 = re.compile(r"[0-9a-f]{64}\Z")
_SESSION = re.compile(r"[0-9a-f]{32}\Z")


class ErrorCode(enum.Enum):
    """
    Every error the relay reports; the value is the wire code.
    """

    BAD_REQUEST = "bad-request"
    UNAUTHORIZED = "unauthorized"
    NO_LISTENER = "no-listener"
    NO_SESSION = "no-session"
    TIMEOUT = "timeout"
    TOO_LARGE = "too-large"
    PEER_GONE = "peer-gone"
    RATE_LIMITED = "rate-limited"

    @property
    def close_code(self) -> int:
        """The WebSocket close code that goes with this error."""
        return _CLOSE_CODES[self]


_CLOSE_CODES = {
    ErrorCode.BAD_REQUEST: 4000,
    ErrorCode.UNAUTHORIZED: 4001,
    ErrorCode.NO_LISTENER: 4004,
    ErrorCode.NO_SESSION: 4005,
    ErrorCode.TIMEOUT: 4008,
    ErrorCode.TOO_LARGE: 4009,
    ErrorCode.PEER_GONE: 4010,
    ErrorCode.RATE_LIMITED: 4029,
}


class ProtocolError(Exception):
    """
    A request the relay refuses; the socket gets C{code} and is closed.

    @ivar code: the L{ErrorCode}.
    @ivar message: a human-readable explanation (never a full rendezvous id).
    """

    def __init__(self, code: ErrorCode, message: str, retry: float | None = None) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        #: seconds after which trying again may succeed (C{rate-limited}), or C{None}
        self.retry = retry


@dataclass(frozen=True)
class Listen:
    """A listener registers under C{rdv} with its peer id C{peer}."""

    rdv: str
    peer: str


@dataclass(frozen=True)
class Connect:
    """
    A connector asks for a listener of C{rdv}.

    @ivar peer: only a listener with this peer id will do (or C{None}: any).
    @ivar from_: the connector's own peer id, passed on (or C{None}).
    @ivar wait: seconds to wait for a listener, as asked (not yet clamped),
        or C{None} for the relay's default.
    """

    rdv: str
    peer: str | None
    from_: str | None
    wait: float | None


@dataclass(frozen=True)
class Accept:
    """A listener accepts session C{session} on this (new) socket."""

    session: str


ControlMessage = Listen | Connect | Accept


def _bad(message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message)


def _reject_constant(name: str) -> Any:
    raise _bad(f"{name} is not valid JSON")


def _hex64(obj: dict[str, Any], key: str, required: bool) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            raise _bad(f'"{key}" is required')
        return None
    if not isinstance(value, str) or not _HEX64.match(value):
        raise _bad(f'"{key}" must be 64 lowercase hex characters')
    return value


def _wait(obj: dict[str, Any]) -> float | None:
    value = obj.get("wait")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad('"wait" must be a number of seconds')
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise _bad('"wait" must be a finite number >= 0')
    return value


def parse_control(payload: bytes) -> ControlMessage:
    """
    Parse one control message (the payload of a text frame).

    Unknown extra fields are ignored; a C{null} optional field counts as
    absent; everything else is checked strictly.

    @raise ProtocolError: C{too-large} beyond L{MAX_CONTROL_BYTES}, else
        C{bad-request}.
    """
    if len(payload) > MAX_CONTROL_BYTES:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"control messages are at most {MAX_CONTROL_BYTES} bytes",
        )
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad("the control message is not JSON") from None
    if not isinstance(obj, dict):
        raise _bad("the control message must be a JSON object")
    version = obj.get("v")
    if type(version) is not int or version != VERSION:
        raise _bad(f'"v" must be {VERSION}')
    op = obj.get("op")
    if op == "listen":
        rdv = _hex64(obj, "rdv", required=True)
        peer = _hex64(obj, "peer", required=True)
        assert rdv is not None and peer is not None
        return Listen(rdv=rdv, peer=peer)
    if op == "connect":
        rdv = _hex64(obj, "rdv", required=True)
        assert rdv is not None
        return Connect(
            rdv=rdv,
            peer=_hex64(obj, "peer", required=False),
            from_=_hex64(obj, "from", required=False),
            wait=_wait(obj),
        )
    if op == "accept":
        session = obj.get("session")
        if not isinstance(session, str) or not _SESSION.match(session):
            raise _bad('"session" must be 32 lowercase hex characters')
        return Accept(session=session)
    if isinstance(op, str):
        raise _bad('unknown "op"; expected listen, connect or accept')
    raise _bad('"op" must be a string')


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


def encode_ready(limits: dict[str, Any] | None = None) -> bytes:
    """The relay's answer to a listener's C{listen} (with the C{limits} in force)."""
    if limits is None:
        return _encode({"op": "ready"})
    return _encode({"op": "ready", "limits": limits})


def encode_incoming(session: str, peer: str | None) -> bytes:
    """Tell a listener that a connector (peer id C{peer}) waits in C{session}."""
    return _encode({"op": "incoming", "session": session, "peer": peer})


def encode_paired(peer: str | None, limits: dict[str, Any] | None = None) -> bytes:
    """Tell one end of a pair the other side's declared peer id (and the C{limits} in force)."""
    if limits is None:
        return _encode({"op": "paired", "peer": peer})
    return _encode({"op": "paired", "peer": peer, "limits": limits})


def encode_error(code: ErrorCode, message: str, retry: float | None = None) -> bytes:
    """The relay's last control message before it closes with C{code} (C{retry}: a hint, seconds)."""
    if retry is None:
        return _encode({"op": "error", "code": code.value, "message": message})
    return _encode({"op": "error", "code": code.value, "message": message, "retry": retry})


def short_id(value: str | None) -> str:
    """The loggable prefix of a rendezvous, peer or session id."""
    if value is None:
        return "-"
    return value[:8]
