"""
What authentication and metrics cost the relay, per event (not per frame):
checking a signed token and a tokens-file token at each WebSocket upgrade,
and rendering /metrics for one scrape.

    python bench/relaycosts.py [--n 20000]

Prints a Markdown table of microseconds per operation (median of 5 rounds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import generate_latest  # noqa: E402

from pluresync.relay.core.auth import SignedTokenAuth, TokenFileAuth, hash_token, mint_token  # noqa: E402
from pluresync.relay.server.metrics import RelayMetrics  # noqa: E402


def per_call(function, n: int) -> float:
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            function()
        rounds.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20000)
    n = parser.parse_args().n
    now = time.time()
    secret = os.urandom(32)
    signed = SignedTokenAuth(secret)
    token = mint_token(secret, "acme", 3600, now)
    header = f"Bearer {token}"
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / "tokens"
        tokens = [f"tok-{i:04d}-" + os.urandom(16).hex() for i in range(1000)]
        path.write_text("".join(f"{hash_token(t)} client{i}\n" for i, t in enumerate(tokens)))
        listed = TokenFileAuth(str(path))
        listed_header = f"Bearer {tokens[-1]}"
        assert signed.check(header, now).ok and listed.check(listed_header, now).ok
        metrics = RelayMetrics(lambda: {"connections": 5000, "listeners": 100, "sessions": 2000, "pending": 3})
        for code in ("bad-request", "no-listener", "timeout"):
            metrics.error(code)
        rows = [
            ("signed token check (HMAC-SHA256)", per_call(lambda: signed.check(header, now), n)),
            ("tokens-file check (1,000 hashed tokens)", per_call(lambda: listed.check(listed_header, now), n)),
            ("a refused token", per_call(lambda: signed.check("Bearer psrt1.bad.bad", now), n)),
            ("/metrics render (one scrape)", per_call(lambda: generate_latest(metrics.registry), max(1, n // 100))),
        ]
    print("| operation | µs per call (median of 5 rounds) |")
    print("|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value:.1f} |")


if __name__ == "__main__":
    main()
