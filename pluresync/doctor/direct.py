"""
The doctor's look at the direct path from here: whether UDP gets out at
all, how this network's NAT maps it, and the public address it gives, and
in one sentence whether a direct path to a peer can work from here.

It asks the STUN servers the endpoint names (C{stun=}), from one new UDP
socket, as the direct path would; it sends nothing else.  Its section is
advice, not a transport: it does not count in the doctor's overall verdict
(the relays carry when direct cannot).
"""

from __future__ import annotations

import time

from pluresync.doctor.report import FAIL, OK, SKIPPED, WARN, Row, Section

#: What each NAT class means for a direct path, and what to do about it.
_VERDICTS = {
    "open": (OK, "no NAT: a peer can reach this host directly", None),
    "cone": (OK, "one public port per socket: a direct path works with a peer behind any NAT", None),
    "symmetric": (
        WARN,
        "a new public port for every destination: a direct path works only with a peer behind a cone NAT or none",
        "peers behind two symmetric NATs stay on the relay; a router with UPnP, or another network, may do better",
    ),
    "blocked": (
        FAIL,
        "no UDP gets out (a corporate firewall, most likely): no direct path from here; the relays carry",
        "nothing to fix for pluresync: the relay path is made for this network; direct=off skips the attempts",
    ),
    "unknown": (WARN, "the STUN answers did not say how the NAT maps", "ask two STUN servers on different hosts"),
}


async def diagnose_direct(reactor, stun: tuple[tuple[str, int], ...], timeout: float) -> Section:
    """The direct path's section: UDP, the NAT class, the public address."""
    section = Section("direct", "UDP (STUN: " + (", ".join(f"{h}:{p}" for h, p in stun) or "none") + ")")
    section.advice = True
    rows = section.rows
    if not stun:
        reason = "no STUN servers named (stun=)"
        rows += [
            Row("udp", SKIPPED, None, reason),
            Row("nat", SKIPPED, None, reason),
            Row("public address", SKIPPED, None, reason),
        ]
        section.notes.append(
            "without stun= only this host's own addresses are offered: peers on one network, or with no NAT "
            "between them, still meet directly; across NATs give stun=HOST:PORT,HOST:PORT (a relay's --udp-port N "
            "and N+1, or public STUN servers)"
        )
        return section
    from pluresync.direct.nat import discover_nat

    started = time.monotonic()
    try:
        report = await discover_nat(reactor, list(stun), deadline=timeout)
    except Exception as e:
        took = time.monotonic() - started
        rows.append(Row("udp", FAIL, took, f"cannot ask: {e}", "check the stun= servers"))
        rows.append(Row("nat", SKIPPED, None, "UDP failed"))
        rows.append(Row("public address", SKIPPED, None, "UDP failed"))
        return section
    took = time.monotonic() - started
    answered = [s for s in report.samples if not s.unreachable]
    if answered:
        rows.append(Row("udp", OK, took, f"{len(answered)} of {len(report.samples)} STUN servers answered"))
    else:
        rows.append(
            Row(
                "udp",
                FAIL,
                took,
                f"no answer from {len(report.samples)} STUN server{'s' if len(report.samples) != 1 else ''}",
                "UDP is blocked here, or the servers are down: the relays carry every stream",
            )
        )
    verdict, meaning, fix = _VERDICTS.get(report.nat, _VERDICTS["unknown"])
    rows.append(Row("nat", verdict, None, f"{report.nat}: {meaning} ({report.reason})", fix))
    mapped = report.mapped
    if mapped is not None:
        rows.append(Row("public address", OK, None, f"{mapped.host}:{mapped.port} (as the first server saw it)"))
    else:
        rows.append(Row("public address", SKIPPED, None, "no server told it"))
    return section
