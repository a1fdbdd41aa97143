"""
Rate limits and quotas of the relay: token buckets and counters.

Pure Python (no Twisted, no Autobahn) with an injected clock (a function
returning seconds, e.g. C{reactor.seconds} or C{time.monotonic}), so another
front end (a serverless one) can reuse it.  The Twisted adapter
(L{pluresync.relay.server.websocket}) decides what to do with the answers: refuse
an upgrade with HTTP 429, or pause reading a socket for the number of
seconds a bucket asks for.

Nothing here records an address anywhere but in the per-address table of
L{ConnectionLimiter}, which forgets idle entries.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Clock = Callable[[], float]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TokenBucket:
    """
    A token bucket: C{rate} tokens per second, at most C{burst} saved up.

    L{take} never refuses: it takes the tokens (the bucket may go into
    debt) and says how long the caller must wait before going on, which
    is how bytes are limited (delayed, never dropped).  L{try_take} takes
    them only if they are there, which is how connections are limited.

    A C{rate} of 0 means unlimited: both calls return 0 at once.

    @param burst: the bucket's capacity (default: one second's worth,
        C{rate}); it starts full.
    """

    __slots__ = ("rate", "burst", "_clock", "_tokens", "_stamp")

    def __init__(self, rate: float, burst: float | None = None, clock: Clock | None = None) -> None:
        if not rate >= 0 or math.isinf(rate):
            raise ValueError("rate must be a finite number >= 0")
        if burst is None:
            burst = rate
        if not burst >= 0:
            raise ValueError("burst must be >= 0")
        if rate and clock is None:
            raise ValueError("a limited bucket needs a clock")
        self.rate = float(rate)
        self.burst = float(burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock() if clock is not None else 0.0

    def _refill(self) -> float:
        now = self._clock()  # type: ignore[misc]
        elapsed = now - self._stamp
        if elapsed > 0:  # a clock that goes back refills nothing
            self._stamp = now
            tokens = self._tokens + elapsed * self.rate
            self._tokens = tokens if tokens < self.burst else self.burst
        return self._tokens

    def take(self, n: float = 1) -> float:
        """
        Take C{n} tokens, going into debt if need be.

        @return: seconds to wait until the debt is paid off (0 when the
            tokens were there); never negative.
        """
        if not self.rate:
            return 0.0
        tokens = self._refill() - n
        self._tokens = tokens
        if tokens >= 0:
            return 0.0
        return -tokens / self.rate

    def try_take(self, n: float = 1) -> float:
        """
        Take C{n} tokens if there are that many.

        @return: 0 when they were taken; else the seconds until there will
            be enough (nothing is taken).  Never negative; C{inf} if C{n}
            exceeds the burst.
        """
        if not self.rate:
            return 0.0
        tokens = self._refill()
        if tokens >= n:
            self._tokens = tokens - n
            return 0.0
        if n > self.burst:
            return math.inf
        return (n - tokens) / self.rate

    def full_at(self) -> float:
        """The clock time when the bucket will be full again."""
        if not self.rate:
            return 0.0
        return self._stamp + (self.burst - self._tokens) / self.rate


class ConnectionLimiter:
    """
    Per client address: new connections per second (a token bucket) and
    concurrent connections (a counter).

    L{admit} before accepting a connection, L{release} once for each
    admitted one when it ends.  Entries of addresses with no connection
    and a full bucket are forgotten (swept when the table doubles).

    @param rate: new connections per second per address (0: unlimited).
    @param burst: how many may come at once (default: C{rate}).
    @param max_concurrent: connections open at once per address (0: unlimited).
    """

    def __init__(self, rate: float, burst: float | None, max_concurrent: int, clock: Clock) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self.max_concurrent = max_concurrent
        self._clock = clock
        self._buckets: dict[str, TokenBucket] = {}
        self._open: dict[str, int] = {}
        self._sweep_at = 1024

    @property
    def enabled(self) -> bool:
        return bool(self.rate or self.max_concurrent)

    def admit(self, address: str) -> tuple[float, str | None]:
        """
        May C{address} open one more connection?

        @return: C{(0, None)} when it may (it is now counted: call
            L{release} when it ends); else C{(retry_after_seconds, why)}
            with C{why} C{"rate"} or C{"concurrent"}.
        """
        if self.max_concurrent and self._open.get(address, 0) >= self.max_concurrent:
            return 1.0, "concurrent"
        if self.rate:
            bucket = self._buckets.get(address)
            if bucket is None:
                if len(self._buckets) >= self._sweep_at:
                    self._sweep()
                bucket = self._buckets[address] = TokenBucket(self.rate, self.burst, self._clock)
            wait = bucket.try_take(1)
            if wait:
                return wait, "rate"
        self._open[address] = self._open.get(address, 0) + 1
        return 0.0, None

    def hold(self, address: str) -> bool:
        """
        Count one more connection of C{address} against the concurrent
        limit only (a TCP connection whose request is not read yet: it has
        no token to draw, and is counted again by L{admit} once it asks to
        upgrade, after L{release}).

        @return: whether it was counted (false: the address is at its limit).
        """
        if self.max_concurrent and self._open.get(address, 0) >= self.max_concurrent:
            return False
        self._open[address] = self._open.get(address, 0) + 1
        return True

    def release(self, address: str) -> None:
        """One admitted (or held) connection of C{address} ended."""
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)

    def open_count(self, address: str) -> int:
        return self._open.get(address, 0)

    def __len__(self) -> int:
        """Addresses tracked (for tests and memory bounds)."""
        return len(self._buckets.keys() | self._open.keys())

    def _sweep(self) -> None:
        now = self._clock()
        for address in [a for a, b in self._buckets.items() if a not in self._open and b.full_at() <= now]:
            del self._buckets[address]
        self._sweep_at = max(1024, 2 * len(self._buckets))


class SessionBudget:
    """
    The byte cap of one session, shared by both of its sides.

    @param cap: bytes the session may forward, both directions (0: no cap).
    """

    __slots__ = ("cap", "used")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.used = 0


class Unlimited:
    """The meter of a session with no limit at all: L{take} is free."""

    __slots__ = ()

    def take(self, n: int) -> float:
        return 0.0


UNLIMITED = Unlimited()


class SessionMeter:
    """
    What one side of a session draws from, per forwarded frame: its own
    bytes-per-second bucket, the relay's global bucket, and the session's
    byte cap.

    L{take} returns the seconds to stop reading this side (0: go on), or
    C{inf} once the session's byte cap is exceeded (end the session).
    """

    __slots__ = ("_bucket", "_global", "_budget")

    def __init__(self, bucket: TokenBucket | None, global_bucket: TokenBucket | None, budget: SessionBudget | None):
        self._bucket = bucket if bucket is not None and bucket.rate else None
        self._global = global_bucket if global_bucket is not None and global_bucket.rate else None
        self._budget = budget if budget is not None and budget.cap else None

    def take(self, n: int) -> float:
        budget = self._budget
        if budget is not None:
            budget.used += n
            if budget.used > budget.cap:
                return math.inf
        wait = 0.0
        if self._bucket is not None:
            wait = self._bucket.take(n)
        if self._global is not None:
            other = self._global.take(n)
            if other > wait:
                wait = other
        return wait


@dataclass(frozen=True)
class RateLimits:
    """
    The rate limits and quotas of a relay (0 everywhere means off).

    @ivar connections_per_second: new WebSockets per client address per second.
    @ivar connections_burst: new WebSockets one address may open at once.
    @ivar connections_per_address: WebSockets open at once per address.
    @ivar listeners_per_rdv: listeners registered at once per rendezvous id.
    @ivar session_bytes_per_second: bytes per second each side of a session
        may send (token bucket, one second of burst).
    @ivar session_bytes: bytes a session may forward, both directions.
    @ivar session_seconds: how long a session may last.
    @ivar global_bytes_per_second: bytes per second the relay forwards in all.
    @ivar retry: the retry hint (seconds) of limits that do not compute one.
    @ivar trusted_proxies: networks whose C{X-Forwarded-For} is believed
        (L{client_address}).
    """

    # One busy host legitimately opens a pool at once: 50 connects through
    # one relay from one address cost 100 upgrades when its listener is on
    # the same host (connector + accept socket each), plus the control
    # socket; the burst admits two such pools, the rate a steady 50 new
    # streams a second.
    connections_per_second: float = 100.0
    connections_burst: int = 200
    connections_per_address: int = 500
    listeners_per_rdv: int = 16
    session_bytes_per_second: int = 0
    session_bytes: int = 0
    session_seconds: float = 0.0
    global_bytes_per_second: int = 0
    retry: float = 5.0
    trusted_proxies: tuple[IPNetwork, ...] = ()

    def __post_init__(self) -> None:
        for name in self.__dataclass_fields__:
            if name == "trusted_proxies":
                continue
            value = getattr(self, name)
            if not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0")

    def announced(self, max_message: int) -> dict[str, int | float | None]:
        """The C{limits} object of C{ready} and C{paired} (C{null}: no limit)."""
        return {
            "session_bytes_per_second": self.session_bytes_per_second or None,
            "session_bytes": self.session_bytes or None,
            "session_seconds": self.session_seconds or None,
            "max_message": max_message,
        }


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    """C{--trusted-proxy} values (C{10.0.0.0/8}, C{::1}, ...) as networks."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR network: {cidr!r}") from None
    return tuple(networks)


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = text.strip().strip('"')
    if text.startswith("["):  # [v6]:port
        text = text[1 : text.find("]")] if "]" in text else text[1:]
    elif text.count(":") == 1:  # v4:port
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    mapped = getattr(address, "ipv4_mapped", None)
    return mapped if mapped is not None else address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: tuple[IPNetwork, ...]) -> bool:
    return any(address.version == n.version and address in n for n in networks)


def _limit_key(address) -> str:
    """
    What one client is, for counting: an IPv4 address, or an IPv6 /64 (one
    host usually owns a whole /64, and could otherwise use a fresh address
    for every connection).
    """
    if address.version == 6:
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


def client_address(peer: str, forwarded_for: str | None, trusted: tuple[IPNetwork, ...]) -> str:
    """
    The address the limits count a connection against.

    The TCP peer C{peer}, unless it is a trusted proxy: then the right-most
    entry of C{X-Forwarded-For} (C{forwarded_for}, all headers joined with
    commas) that is not itself a trusted proxy; if every entry is trusted,
    the left-most one.  Entries that are not IP addresses end the walk and
    count as the client (as text, at most 64 characters).
    """
    peer_ip = _ip(peer)
    if peer_ip is None or not trusted or not forwarded_for or not _trusted(peer_ip, trusted):
        return _limit_key(peer_ip) if peer_ip is not None else peer
    entries = [e for e in (part.strip() for part in forwarded_for.split(",")) if e]
    if not entries:
        return _limit_key(peer_ip)
    for entry in reversed(entries):
        address = _ip(entry)
        if address is None:
            return entry[:64]
        if not _trusted(address, trusted):
            return _limit_key(address)
    first = _ip(entries[0])
    return _limit_key(first)


def accept_address(peer: str, trusted: tuple[IPNetwork, ...]) -> str | None:
    """
    The address a TCP connection counts against before its request is read,
    or C{None} when the peer is a trusted proxy: many clients share its
    connections, and each is counted by its C{X-Forwarded-For} at the
    upgrade instead (L{client_address}).
    """
    peer_ip = _ip(peer)
    if peer_ip is None:
        return peer
    if trusted and _trusted(peer_ip, trusted):
        return None
    return _limit_key(peer_ip)
