"""
The Vercel function's HTTP pipe (docs/protocol.md, "HTTP pipe"): relay
protocol v1 over plain HTTP requests, for clients whose proxy refuses
WebSockets.

An L{HttpPipe} is what a WebSocket is to a
L{pluresync.relay.asgi.connection.RelaySocket}: it offers the same ASGI
C{receive} and C{send} (C{websocket.receive}, C{websocket.send},
C{websocket.close}, C{websocket.disconnect}), made of one streaming
downstream response and the bodies of the upstream requests.  So the
socket's session, its pairing through Redis with sockets on other
instances, its limits and its cap at the function's maximum duration are
those of a WebSocket, by construction.

Vercel's load balancer may send a pipe's upstream requests to another
function instance than the one that holds its downstream: that instance
forwards the upstream through Redis (L{forward_upstream}: the body's
pieces in the list C{P hu:TOKEN}, with a credit window acknowledged on
C{P hk:TOKEN}), the owner feeds them to the pipe in order
(L{HttpPipe.serve_forwarded}) and answers on C{P ha:TOKEN:SEQ}; C{P hp:TOKEN}
says which pipes live somewhere.  Every key has a TTL.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pluresync.relay.core.httpwire import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    UPSTREAM_KINDS,
    FrameBreach,
    FrameReader,
    encode_close,
    encode_open,
    frame,
    frame_head,
    new_pipe_token,
    parse_close,
    parse_seq,
)

log = logging.getLogger("pluresync.relay.asgi")

Send = Callable[[dict[str, Any]], Awaitable[None]]

#: Messages parsed from upstreams that wait for the socket; more holds the upstream's body back.
INBOX = 16
#: A downstream that ended without a close frame.
CLOSE_ABNORMAL = 1006
#: Forwarded upstream items: an upstream begins (its number), a piece of its body, its end.
_BEGIN, _DATA, _END = b"S", b"D", b"E"
#: Forwarded items one instance may have unacknowledged in Redis per pipe.
FORWARD_WINDOW = 16
#: How long a forwarding instance waits for credit or for the owner's answer.
FORWARD_TIMEOUT = 30.0


def _keys(instance: Any, token: str) -> tuple[str, str, str]:
    """The pipe's owner marker, its forwarded upstream list, and its credit list."""
    key = instance.keys.key
    return key("hp", token), key("hu", token), key("hk", token)


def _answer_key(instance: Any, token: str, seq: bytes) -> str:
    return instance.keys.key("ha", token, seq.decode("ascii", "replace"))


async def forward_upstream(instance: Any, token: str, seq: bytes, receive: Callable[[], Awaitable[dict]]) -> int:
    """
    An upstream for a pipe this instance does not hold: if one lives on
    another instance, pass the body on to it through Redis and return the
    owner's answer; else 404.
    """
    redis = instance.redis
    owner, items, credit = _keys(instance, token)
    ttl = instance.config.data_ttl
    if not await redis.exists(owner):
        return 404
    inflight = 0

    async def push(item: bytes) -> bool:
        nonlocal inflight
        deadline = time.monotonic() + FORWARD_TIMEOUT
        # Bounded in time: the owner acknowledges what it took, or is gone.
        while inflight >= FORWARD_WINDOW:
            if time.monotonic() > deadline:
                return False
            got = await redis.blpop([credit], timeout=instance.config.poll)
            if got is not None:
                inflight -= int(got[1])
        pipe = redis.pipeline(transaction=False)
        pipe.rpush(items, item)
        pipe.expire(items, ttl)
        await pipe.execute()
        inflight += 1
        return True

    if not await push(_BEGIN + seq):
        return 404
    # Bounded: each turn reads one piece of the body, until its end or the client's.
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return 404
        body = message.get("body") or b""
        if body and not await push(_DATA + body):
            return 404
        if not message.get("more_body"):
            break
    if not await push(_END):
        return 404
    got = await redis.blpop([_answer_key(instance, token, seq)], timeout=FORWARD_TIMEOUT)
    return int(got[1]) if got is not None else 404


class HttpPipe:
    """One HTTP pipe at this instance: a WebSocket's ASGI messages over HTTP requests."""

    def __init__(self, send: Send, max_message: int, ping: float) -> None:
        self.token = new_pipe_token()
        self._send = send
        self._ping = ping
        self._inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue(INBOX)
        self._reader = FrameReader(self._frame, max_message, UPSTREAM_KINDS)
        self._parsed: list[dict[str, Any]] = []
        self._replies: list[bytes] = []
        self._completed = -1
        self._upstream_open = False
        self._response_open = True
        self._disconnected = False
        loop = asyncio.get_running_loop()
        self._time = loop.time
        self._last_heard = loop.time()

    # -- the downstream ------------------------------------------------------------

    async def open(self, max_post: int) -> None:
        """Start the downstream response: headers and the C{open} frame."""
        await self._send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/x-pluresync-pipe"),
                    (b"cache-control", b"no-store, no-transform"),
                    (b"x-accel-buffering", b"no"),
                ],
            }
        )
        await self._write(encode_open(self.token, max_post, self._ping))

    async def _write(self, data: bytes) -> None:
        if self._response_open:
            await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end_response(self) -> None:
        """End the downstream (the terminating chunk); once."""
        if self._response_open:
            self._response_open = False
            try:
                await self._send({"type": "http.response.body", "body": b"", "more_body": False})
            except Exception:
                pass

    def lost(self) -> None:
        """The downstream's client is gone (without a close frame: 1006)."""
        self._response_open = False
        self._disconnect(CLOSE_ABNORMAL)

    def _disconnect(self, code: int) -> None:
        if not self._disconnected:
            self._disconnected = True
            # Past the bound if need be: the socket must hear that it ended.
            self._inbox.put_nowait({"type": "websocket.disconnect", "code": code})

    async def keepalive(self) -> None:
        """Ping every interval; end a pipe silent for two (a dead client holds no pair)."""
        if self._ping <= 0:
            return
        while not self._disconnected:
            await asyncio.sleep(self._ping)
            if self._time() - self._last_heard > 2 * self._ping:
                log.info("dropped a silent HTTP pipe")
                await self.end_response()
                self._disconnect(CLOSE_ABNORMAL)
                return
            await self._write(frame(PING))

    # -- what the RelaySocket sees (ASGI WebSocket messages) --------------------------

    async def receive(self) -> dict[str, Any]:
        return await self._inbox.get()

    async def send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "websocket.send":
            text = message.get("text")
            if text is not None:
                await self._write(frame(TEXT, text.encode("utf-8")))
            else:
                data = message.get("bytes") or b""
                await self._write(frame_head(BINARY, len(data)) + data)
        elif kind == "websocket.close":
            code = int(message.get("code") or 1000)
            await self._write(encode_close(code, str(message.get("reason") or "")))
            await self.end_response()
            self._disconnect(code)

    # -- upstreams forwarded by other instances --------------------------------------

    async def claim(self, instance: Any) -> None:
        """
        Say in Redis that this pipe lives (here), before its client learns
        its token: an upstream may reach another instance at once.
        """
        owner, _, _ = _keys(instance, self.token)
        await instance.redis.set(owner, b"1", ex=int(instance.config.max_duration + instance.config.data_ttl))

    async def serve_forwarded(self, instance: Any) -> None:
        """Take the upstreams other instances forward for this pipe (through Redis), in order, until it ends."""
        redis = instance.redis
        _, items, credit = _keys(instance, self.token)
        config = instance.config
        seq = b""
        accepted = False
        try:
            while not self._disconnected:
                got = await redis.blpop([items], timeout=config.poll)
                if got is None:
                    continue
                item = got[1]
                kind, rest = item[:1], item[1:]
                if kind == _BEGIN:
                    seq = rest
                    status = self.begin_upstream(parse_seq(rest))
                    accepted = status == 0
                    if not accepted:
                        await self._answer_forwarded(instance, seq, status)
                elif kind == _DATA and accepted:
                    await self.upstream_data(rest)
                elif kind == _END:
                    if accepted:
                        self.end_upstream()
                        accepted = False
                        await self._answer_forwarded(instance, seq, 204)
                pipe = redis.pipeline(transaction=False)
                pipe.rpush(credit, b"1")
                pipe.expire(credit, config.data_ttl)
                await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("forwarded upstreams failed: %r", error)
        finally:
            if accepted:
                self.end_upstream()

    async def _answer_forwarded(self, instance: Any, seq: bytes, status: int) -> None:
        key = _answer_key(instance, self.token, seq)
        pipe = instance.redis.pipeline(transaction=False)
        pipe.rpush(key, str(status).encode())
        pipe.expire(key, instance.config.data_ttl)
        await pipe.execute()

    async def forget(self, instance: Any) -> None:
        """The pipe is over: its keys go (what is still forwarded is answered 404 by its TTL)."""
        try:
            await instance.redis.delete(*_keys(instance, self.token))
        except Exception as error:
            log.warning("HTTP pipe clean-up failed: %r", error)

    # -- upstreams -----------------------------------------------------------------

    def begin_upstream(self, seq: int | None) -> int:
        """0 when this upstream's body is the pipe's next; else the status to answer (204: a retry)."""
        if self._disconnected:
            return 404
        if not self._upstream_open and seq is not None and seq == self._completed and seq >= 0:
            return 204
        if self._upstream_open or seq != self._completed + 1:
            self._breach("an upstream out of order", 4000)
            return 409
        self._upstream_open = True
        self._last_heard = self._time()
        return 0

    async def upstream_data(self, data: bytes) -> None:
        """Frames of the open upstream: to the socket, waiting while it has not taken the ones before."""
        if self._disconnected:
            return
        self._last_heard = self._time()
        try:
            self._reader.feed(data)
        except FrameBreach as breach:
            self._parsed.clear()
            self._breach(breach.message, 4009 if breach.too_large else CLOSE_ABNORMAL)
        parsed, self._parsed = self._parsed, []
        replies, self._replies = self._replies, []
        for reply in replies:
            await self._write(reply)
        for message in parsed:
            if message["type"] == "websocket.disconnect":
                await self.end_response()
                self._disconnect(message["code"])
                return
            await self._inbox.put(message)

    def end_upstream(self) -> None:
        if self._upstream_open:
            self._upstream_open = False
            self._completed += 1
            if not self._reader.at_boundary:
                self._breach("an upstream body ended inside a frame", CLOSE_ABNORMAL)

    def _breach(self, why: str, code: int) -> None:
        log.info("ended an HTTP pipe: %s", why)
        asyncio.get_running_loop().create_task(self._ended_by_breach(code, why))

    async def _ended_by_breach(self, code: int, why: str) -> None:
        if code != CLOSE_ABNORMAL:
            await self._write(encode_close(code, why[:100]))
        await self.end_response()
        self._disconnect(code)

    def _frame(self, fin: bool, kind: int, payload: bytes) -> None:
        if kind == BINARY:
            self._parsed.append({"type": "websocket.receive", "bytes": payload})
        elif kind == TEXT:
            try:
                self._parsed.append({"type": "websocket.receive", "text": payload.decode("utf-8")})
            except UnicodeDecodeError:
                raise FrameBreach("a text frame that is not UTF-8") from None
        elif kind == PING:
            self._replies.append(frame(PONG, payload))
        elif kind == CLOSE:
            code, reason = parse_close(payload)
            self._replies.append(encode_close(code, reason))
            self._parsed.append({"type": "websocket.disconnect", "code": code})
        # PONG and PAD: heard, nothing to do
