"""
Throughput of one stream: the sender process writes `size` bytes (64 KiB
writes from a streaming producer), the receiver process counts them; MB/s =
size / (receiver's last byte - sender's start), MB = 10^6 bytes.
"""

from __future__ import annotations

from paths import Relays, run_pair


def measure(path: str, relays: Relays, size: int, chunk: int = 64 << 10, profile_prefix: str | None = None) -> dict:
    """
    One transfer.  Besides MB/s it reports the CPU seconds per GB (10^9
    bytes) each process spent during the transfer (sender: from its first
    write to its close; receiver: first to last byte; relay: while the
    receiver's result was awaited, i.e. the transfer plus set-up and close of
    the stream), which says where the time goes: the three processes share 2
    cores.
    """
    timeout = max(60.0, size / 2e6)  # a floor of 2 MB/s, then give up
    received, sent, relay_cpu = run_pair(
        path, relays, "recv", "send", ["--size", str(size), "--chunk", str(chunk)], timeout, profile_prefix
    )
    seconds = received["last_byte"] - sent["start"]
    gb = size / 1e9
    return {
        "path": path,
        "bytes": size,
        "chunk": chunk,
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
        "cpu_s_per_gb": {
            "sender": sent["transfer_cpu_s"] / gb,
            "relay": relay_cpu / gb,
            "receiver": received["transfer_cpu_s"] / gb,
        },
        "max_rss_mib": {"sender": sent.get("max_rss_kib", 0) / 1024, "receiver": received.get("max_rss_kib", 0) / 1024},
    }
