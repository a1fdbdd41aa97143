"""
The control messages of relay protocol v1, both directions, for both sides.

The relay parses what clients send (L{parse_control}) and encodes its answers
(L{encode_ready}, L{encode_incoming}, L{encode_paired}, L{encode_error}); a
client encodes its one hello (L{encode_listen}, L{encode_connect},
L{encode_accept}) and parses the answers (L{parse_relay_message}).  Keeping
both directions here means the two sides cannot drift apart: every encoder
is the inverse of the other side's parser, and the subprotocol, the close
codes and the op names are spelled nowhere else.

Pure Python: no Twisted, no Autobahn.  C{docs/protocol.md} is the
specification; this module is its executable form.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

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

    @classmethod
    def from_close_code(cls, code: int | None) -> ErrorCode | None:
        """
        The error a close code stands for, or C{None} (1000, 1001, 1006 and
        codes of no error): after pairing the relay sends no error message,
        so the close code is all a client learns.
        """
        return _ERRORS_BY_CLOSE_CODE.get(code)


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
_ERRORS_BY_CLOSE_CODE = {close: error for error, close in _CLOSE_CODES.items()}


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


@dataclass(frozen=True)
class Decline:
    """
    On a listener's control socket: it could not open the socket to
    C{accept} the offered C{session} (its upgrade was refused, say with
    HTTP 429), so its connector hears C{code} and C{reason} at once
    instead of the accept timeout.  Only to relays whose C{ready} said
    C{"decline":true}.
    """

    session: str
    code: ErrorCode
    reason: str
    retry: float | None = None


#: The codes a listener may decline with: its accept socket was rate-limited
#: (or the relay was busy), or it failed otherwise.
DECLINE_CODES = frozenset({ErrorCode.RATE_LIMITED, ErrorCode.PEER_GONE})
#: The longest reason a decline carries (it is for humans, and logged nowhere).
MAX_DECLINE_REASON = 200


ControlMessage = Listen | Connect | Accept | Decline


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
    if op == "decline":
        session = obj.get("session")
        if not isinstance(session, str) or not _SESSION.match(session):
            raise _bad('"session" must be 32 lowercase hex characters')
        code = obj.get("code")
        codes = {c.value: c for c in DECLINE_CODES}
        if code not in codes:
            raise _bad(f'"code" must be one of {", ".join(sorted(codes))}')
        reason = obj.get("reason")
        if reason is None:
            reason = ""
        if not isinstance(reason, str):
            raise _bad('"reason" must be a string')
        retry = obj.get("retry")
        if retry is not None:
            if type(retry) not in (int, float) or not math.isfinite(retry) or retry < 0:
                raise _bad('"retry" must be a finite number >= 0')
            retry = float(retry)
        return Decline(session=session, code=codes[code], reason=reason[:MAX_DECLINE_REASON], retry=retry)
    if isinstance(op, str):
        raise _bad('unknown "op"; expected listen, connect, accept or decline')
    raise _bad('"op" must be a string')


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode("utf-8")


# -- what a client sends -------------------------------------------------------


def _checked(message: dict[str, Any]) -> bytes:
    """
    C{message} encoded, once the relay's own rules (L{parse_control}) accept
    it: a client bug is caught before it costs a round trip, and what the
    client sends and what the relay accepts cannot drift apart.

    @raise ValueError: the relay would refuse it (its reason).
    """
    payload = _encode(message)
    try:
        parse_control(payload)
    except ProtocolError as error:
        raise ValueError(error.message) from None
    return payload


def encode_listen(rdv: str, peer: str) -> bytes:
    """
    A listener's hello: register under C{rdv} as peer C{peer}.

    @raise ValueError: an argument the relay would refuse.
    """
    return _checked({"v": VERSION, "op": "listen", "rdv": rdv, "peer": peer})


def encode_connect(rdv: str, peer: str | None, from_: str | None, wait: float | None) -> bytes:
    """
    A connector's hello: pair with a listener of C{rdv} (with peer id
    C{peer}, if given), telling it our own id C{from_}; C{wait}: seconds the
    relay may hold us waiting for one.  Absent fields (C{None}) are left out.

    @raise ValueError: an argument the relay would refuse.
    """
    fields = {"peer": peer, "from": from_, "wait": wait}
    return _checked({"v": VERSION, "op": "connect", "rdv": rdv, **{k: v for k, v in fields.items() if v is not None}})


def encode_accept(session: str) -> bytes:
    """
    A listener's hello on a new socket: take the connector of C{session}
    (from an C{incoming}).

    @raise ValueError: not a session id the relay hands out.
    """
    return _checked({"v": VERSION, "op": "accept", "session": session})


# -- what the relay sends ------------------------------------------------------


def encode_ready(limits: dict[str, Any] | None = None, decline: bool = False) -> bytes:
    """C{ready}; C{decline}: this relay takes C{decline} on the control socket."""
    message: dict[str, Any] = {"op": "ready"}
    if limits is not None:
        message["limits"] = limits
    if decline:
        message["decline"] = True
    return _encode(message)


def encode_decline(session: str, code: ErrorCode, reason: str, retry: float | None = None) -> bytes:
    """A listener's C{decline} of an offered C{session} (L{Decline})."""
    message: dict[str, Any] = {
        "v": VERSION,
        "op": "decline",
        "session": session,
        "code": code.value,
        "reason": reason[:MAX_DECLINE_REASON],
    }
    if retry is not None:
        message["retry"] = retry
    return _checked(message)


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


# -- what a client reads -------------------------------------------------------


@dataclass(frozen=True)
class Ready:
    """
    The relay registered our listener.

    @ivar limits: the relay's announced limits as sent (C{None}: an older
        relay, or none announced); kept as data, so a client can act before
        it reaches them (L{session_seconds}).
    """

    op: ClassVar[str] = "ready"

    limits: Mapping[str, Any] | None = None
    #: whether the relay takes C{decline} (L{Decline}) on this control socket
    decline: bool = False

    @property
    def session_seconds(self) -> float | None:
        """The announced C{session_seconds} (L{announced_seconds})."""
        return announced_seconds(self.limits)


@dataclass(frozen=True)
class Incoming:
    """A connector (declaring C{peer}, or C{None}) waits for our listener in C{session}."""

    op: ClassVar[str] = "incoming"

    session: str
    peer: str | None


@dataclass(frozen=True)
class Paired:
    """
    This socket is one end of a pair; binary messages flow from now on.

    @ivar peer: the other side's declared peer id (a claim of the other
        client, proven only by the end-to-end handshake), or C{None}.
    @ivar limits: as in L{Ready}.
    """

    op: ClassVar[str] = "paired"

    peer: str | None
    limits: Mapping[str, Any] | None = None

    @property
    def session_seconds(self) -> float | None:
        """The announced C{session_seconds} (L{announced_seconds})."""
        return announced_seconds(self.limits)


@dataclass(frozen=True)
class RelayErrorMessage:
    """
    The relay's refusal, sent before it closes the socket.

    @ivar code: the wire code as sent: a relay newer than this client may
        send one that L{ErrorCode} does not know yet (see L{error_code}).
    @ivar message: for humans; clients act on C{code}.
    @ivar retry: seconds after which trying again may succeed (a hint), or C{None}.
    """

    op: ClassVar[str] = "error"

    code: str
    message: str
    retry: float | None = None

    @property
    def error_code(self) -> ErrorCode | None:
        """The code as an L{ErrorCode}, or C{None} for one this client does not know."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


RelayMessage = Ready | Incoming | Paired | RelayErrorMessage


class RelayMessageError(ValueError):
    """
    The relay sent a text message that is not one of protocol v1's: the
    client cannot know what the relay meant, so it gives up the socket.
    """


# The relay's optional, informative fields are read leniently: one that is
# malformed counts as absent, so a refusal's code (which clients MUST act on)
# or a pairing is never lost to a field the client only reports.


def _limits(obj: dict[str, Any]) -> Mapping[str, Any] | None:
    value = obj.get("limits")
    return value if isinstance(value, dict) else None


def announced_seconds(limits: Mapping[str, Any] | None) -> float | None:
    """
    The C{session_seconds} of a C{limits} object: how long the relay lets a
    socket live (docs/protocol.md says from when each front counts), or
    C{None} when no cap was announced.  Read leniently like every
    informative field: anything but a positive finite number counts as no cap.
    """
    value = limits.get("session_seconds") if limits is not None else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
        return None
    return float(value)


def _peer(obj: dict[str, Any]) -> str | None:
    value = obj.get("peer")
    return value if isinstance(value, str) and _HEX64.match(value) else None


def parse_relay_message(payload: bytes) -> RelayMessage:
    """
    Parse one message from the relay (the payload of a text frame): the
    inverse of L{encode_ready}, L{encode_incoming}, L{encode_paired} and
    L{encode_error}.

    Unknown extra fields are ignored and a C{null} optional field counts as
    absent, as the protocol asks of clients; so does a malformed informative
    field (C{limits}, C{peer}, an error's C{message} and C{retry}).  The
    rest is checked.

    @raise RelayMessageError: the payload is not a relay message of protocol
        v1 (the exception's text says what is wrong).
    """
    try:
        obj = json.loads(payload.decode("utf-8"), parse_constant=_reject_relay_constant)
    except RelayMessageError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RelayMessageError("not a JSON text") from None
    if not isinstance(obj, dict):
        raise RelayMessageError("not a JSON object")
    op = obj.get("op")
    if op == Ready.op:
        return Ready(limits=_limits(obj), decline=obj.get("decline") is True)
    if op == Incoming.op:
        session = obj.get("session")
        if not isinstance(session, str) or not _SESSION.match(session):
            raise RelayMessageError('"session" must be 32 lowercase hex characters')
        return Incoming(session=session, peer=_peer(obj))
    if op == Paired.op:
        return Paired(peer=_peer(obj), limits=_limits(obj))
    if op == RelayErrorMessage.op:
        code, message, retry = obj.get("code"), obj.get("message"), obj.get("retry")
        if not isinstance(code, str) or not code:
            raise RelayMessageError('"code" must be a non-empty string')
        if not isinstance(message, str):
            message = ""
        if isinstance(retry, bool) or not isinstance(retry, (int, float)) or not 0 <= retry < math.inf:
            retry = None
        else:
            retry = float(retry)
        return RelayErrorMessage(code=code, message=message, retry=retry)
    if isinstance(op, str):
        raise RelayMessageError(f"unknown op {op[:20]!r}; expected ready, incoming, paired or error")
    raise RelayMessageError('"op" must be a string')


def _reject_relay_constant(name: str) -> Any:
    raise RelayMessageError(f"{name} is not valid JSON")


def short_id(value: str | None) -> str:
    """The loggable prefix of a rendezvous, peer or session id."""
    if value is None:
        return "-"
    return value[:8]
