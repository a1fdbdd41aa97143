"""
The knobs of a session, as endpoint strings (C{resume=}, C{window=},
C{stall=}, C{ping=}, C{rotate=}, C{reuse=}, C{streams=}) and
C{create_transport} set them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pluresync.secure.frames import MAX_RECORD_PAYLOAD
from pluresync.session.wire import Caps

#: Larger than the bytes a fast path buffers in flight (loopback TCP keeps
#: several MiB per socket; 100 ms of round trip at 1 Gbit/s is 12.5 MB), so
#: that the credit, not the carrier, is rarely what holds a sender back.
DEFAULT_WINDOW = 16 * 1024 * 1024
#: A window must hold a few full records, or a sender could never send one.
MIN_WINDOW = 4 * (MAX_RECORD_PAYLOAD + 1)
MAX_WINDOW = 1 << 30


@dataclass(frozen=True)
class SessionParams:
    """
    @ivar resume: seconds a session may go without any link before it ends
        (C{connectionLost} with the last link's error); 0 ends it with its
        first link, as version 1 did.
    @ivar window: bytes the peer may send beyond what our protocol has
        consumed (the credit), which also bounds what we keep for resending.
    @ivar stall: seconds of silence on a link that was carrying traffic
        before it counts as dead (a ping goes out after half of it).
    @ivar ping: seconds of silence on an idle link before we ping it; it
        counts as dead after C{ping + stall}.
    @ivar rotate: seconds before a relay's announced session cap at which
        the initiator moves the session to a fresh link (at most a quarter
        of the cap, so short caps rotate too).
    @ivar ack_delay: longest wait before acknowledging what arrived.
    """

    resume: float = 30.0
    window: int = DEFAULT_WINDOW
    stall: float = 2.0
    ping: float = 15.0
    rotate: float = 20.0
    ack_delay: float = 0.01
    #: whether this side takes direct paths (tells the peer so: caps bit 1)
    direct: bool = False
    #: whether this side offers AES-GCM for records (caps bit 2): C{None}
    #: when this CPU has AES instructions (L{pluresync.noise.cipher.hardware_aes})
    aes: bool | None = None
    #: whether this side carries many streams on one session (caps bit 3)
    streams: bool = True
    #: (initiator) whether connects to the same peer share a session
    #: (L{pluresync.session.pool}); C{reuse=off} turns it off
    share: bool = True
    #: (initiator) seconds a session with no stream left stays up for a new
    #: one (C{reuse=}); 0 closes it with its last stream
    linger: float = 0.0
    #: (listener) streams one session may hold at once; an OPEN beyond is refused
    max_streams: int = 256
    #: (listener) streams one session may open per second, on average (a burst of C{max_streams})
    open_rate: float = 200.0

    @property
    def caps(self) -> int:
        """The capability bits this side's hello or READY carries."""
        from pluresync.noise.cipher import hardware_aes

        aes = hardware_aes() if self.aes is None else self.aes
        return (
            Caps.RESUME
            | (Caps.DIRECT if self.direct else 0)
            | (Caps.AESGCM if aes else 0)
            | (Caps.STREAMS if self.streams else 0)
            | (Caps.KEEP if self.streams and self.linger > 0 else 0)
        )

    def __post_init__(self) -> None:
        if not MIN_WINDOW <= self.window <= MAX_WINDOW:
            raise ValueError(f"window must be between {MIN_WINDOW} and {MAX_WINDOW} bytes")
        if self.resume < 0 or self.stall <= 0 or self.ping <= 0 or self.rotate < 0:
            raise ValueError("resume and rotate must be >= 0, stall and ping > 0")
        if self.linger < 0 or self.max_streams < 1 or self.open_rate <= 0:
            raise ValueError("linger must be >= 0, max_streams >= 1 and open_rate > 0")
