"""
One side of a pair on the Vercel relay: its socket and the session's two
Redis lists, with a credit window.

Function instances cannot reach each other and pub/sub drops slow
subscribers, so data goes through lists: each direction of a pair is
C{P d:S:ROLE} (ROLE C{c}: the connector's bytes, C{a}: the acceptor's),
written with C{RPUSH} and read with C{BLPOP} + C{LPOP n}.  Flow control is a
credit window: a side stops reading its WebSocket while C{window} of its
messages are unread; the reading side acknowledges what it delivered on
C{P k:S:ROLE}.  Memory per direction is at most C{window} messages.  Each
side refreshes C{P a:S:ROLE} (TTL); a side whose partner's key is gone ends
with C{peer-gone}.  Everything has a TTL.

Both halves of a pair go through Redis even when they sit on the same
instance (one code path; the backup relay is for small data).

A L{Pipe} is its session's L{pluresync.relay.core.session.PartnerEnd}: when
the session ends its side, L{Pipe.end} puts an END item with the partner's
close code into the partner's list (after the data for a normal close, ahead
of it otherwise); the partner's pipe reads it and ends its own session.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pluresync.relay.core.session import CLOSE_REASONS
from pluresync.relay.core.wire import CLOSE_NORMAL, ErrorCode

from .tasks import quiet

if TYPE_CHECKING:
    from .connection import RelaySocket
    from .instance import RelayInstance

log = logging.getLogger("pluresync.relay.asgi")

_DATA = b"\x00"
_END = b"\x01"

#: Seconds after a pipe's clean-up to delete its keys once more (see Pipe._cleanup).
_LATE_CLEANUP = 1.0

_PEER_GONE = ErrorCode.PEER_GONE


async def abandon(instance: RelayInstance, session: str, role: str) -> None:
    """Side C{role} of C{session} leaves before it started: its partner gets C{peer-gone}."""
    await _push_end(instance, instance.keys.key("d", session, role), _PEER_GONE.close_code, front=True)


async def _push_end(instance: RelayInstance, key: str, code: int, front: bool) -> None:
    item = _END + str(code).encode()
    try:
        pipe = instance.redis.pipeline(transaction=False)
        (pipe.lpush if front else pipe.rpush)(key, item)
        pipe.expire(key, instance.config.data_ttl)
        await pipe.execute()
    except Exception as error:
        log.warning("pipe end failed: %r", error)


class Pipe:
    """
    One side of a pair (see the module docstring).  The socket's receive
    loop calls L{from_client}; a task runs L{_deliver}.
    """

    def __init__(self, instance: RelayInstance, socket: RelaySocket, session: str, role: str) -> None:
        other = "a" if role == "c" else "c"
        key = instance.keys.key
        self.instance = instance
        self.socket = socket
        self.out_key = key("d", session, role)
        self.in_key = key("d", session, other)
        self.my_acks = key("k", session, role)
        self.their_acks = key("k", session, other)
        self.alive_key = key("a", session, role)
        self.partner_alive = key("a", session, other)
        self.inflight = 0
        self.ended = False
        self.started = instance.clock()
        self.task: asyncio.Task[Any] | None = None

    def start(self) -> None:
        self.instance.pipes.add(self)
        self.task = self.instance.spawn(self._run())

    async def _run(self) -> None:
        await quiet(self.instance.redis.set(self.alive_key, b"1", ex=self.instance.ttl))
        await self._deliver()

    # -- client → Redis ------------------------------------------------------------

    async def from_client(self, data: bytes) -> None:
        """Queue one binary message of the client for the partner (waits for credit)."""
        if self.ended:
            return
        config = self.instance.config
        redis = self.instance.redis
        try:
            while self.inflight >= config.window and not self.ended:
                got = await redis.blpop([self.my_acks], timeout=config.poll)
                if got is not None:
                    self.inflight -= int(got[1])
                    more = await redis.lpop(self.my_acks, 64)
                    self.inflight -= sum(int(x) for x in more or ())
            if self.ended:
                return
            pipe = redis.pipeline(transaction=False)
            pipe.rpush(self.out_key, _DATA + data)
            pipe.expire(self.out_key, config.data_ttl)
            await pipe.execute()
        except Exception as error:
            log.warning("pipe write failed: %r", error)
            self._broken()
            return
        self.inflight += 1

    # -- PartnerEnd ----------------------------------------------------------------

    def end(self, code: int, reason: str) -> None:
        """This side's session ended: the partner closes with C{code} (1000 after the data)."""
        if self.ended:
            return
        self._finish()

        async def push() -> None:
            await _push_end(self.instance, self.out_key, code, front=code != CLOSE_NORMAL)
            await self._cleanup()

        task = self.instance.spawn(push())
        self.instance.ending.add(task)
        task.add_done_callback(self.instance.ending.discard)

    def _broken(self) -> None:
        """Redis failed, or the partner vanished: both sides end with C{peer-gone}."""
        self.end(_PEER_GONE.close_code, _PEER_GONE.value)
        self.socket.session.partner_ended(_PEER_GONE.close_code, _PEER_GONE.value)

    def _finish(self) -> None:
        self.ended = True
        self.instance.pipes.discard(self)
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()

    async def _cleanup(self) -> None:
        # Our out-list is the partner's to read (and delete); ours are the in-list and acks.
        keys = (self.in_key, self.my_acks, self.alive_key)
        await quiet(self.instance.redis.delete(*keys))
        # A partner ending at the same moment may still push its END or last
        # acks into our keys, re-creating them just after this delete (each
        # would then only expire with its TTL): delete once more a little later.
        self.instance.spawn(self._delete_later(keys))

    async def _delete_later(self, keys: tuple[str, ...]) -> None:
        await asyncio.sleep(_LATE_CLEANUP)
        await quiet(self.instance.redis.delete(*keys))

    # -- Redis → client ------------------------------------------------------------

    async def _deliver(self) -> None:
        instance = self.instance
        config = instance.config
        redis = instance.redis
        grace = config.ttl + config.heartbeat
        try:
            while not self.ended:
                got = await redis.blpop([self.in_key], timeout=config.poll)
                if got is None:
                    if instance.clock() - self.started > grace and not await redis.exists(self.partner_alive):
                        self._broken()
                        return
                    continue
                items = [got[1]]
                more = await redis.lpop(self.in_key, config.window)
                items.extend(more or ())
                delivered = 0
                for item in items:
                    if item[:1] == _DATA:
                        if not await self.socket.send_data(item[1:]):
                            return  # the client is gone; the receive loop reports it
                        delivered += 1
                        continue
                    await self._partner_ended(int(item[1:]))
                    return
                if delivered:
                    pipe = redis.pipeline(transaction=False)
                    pipe.rpush(self.their_acks, str(delivered).encode())
                    pipe.expire(self.their_acks, config.data_ttl)
                    await pipe.execute()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            log.warning("pipe read failed: %r", error)
            self._broken()

    async def _partner_ended(self, code: int) -> None:
        self.ended = True
        self.instance.pipes.discard(self)
        self.socket.session.partner_ended(code, CLOSE_REASONS.get(code, _PEER_GONE.value))
        # The partner ended first and writes nothing more: the last one out
        # deletes every key of the session.
        await quiet(
            self.instance.redis.delete(
                self.in_key, self.out_key, self.my_acks, self.their_acks, self.alive_key, self.partner_alive
            )
        )
