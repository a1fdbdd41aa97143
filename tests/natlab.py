"""
A NAT lab in Linux network namespaces, built by a test and removed after it.

Each lab is six namespaces wired with veth pairs, two nftables NATs
between two LANs and "the internet" (a bridge), all on private addresses
and none linked to the root namespace, so no lab packet leaves the machine::

    hosta 192.168.1.2 --+
                        +-- lan (nata) [NAT A] wan 172.16.0.1 --+
    hostc 192.168.1.3 --+                                       +-- br0 (inet) 172.16.0.10
                                                                |    a STUN server (UDP 3478, 3479)
    hostb 192.168.2.2 ----- lan (natb) [NAT B] wan 172.16.0.2 --+

A NAT is L{CONE} (nftables C{masquerade}: one public port per socket,
kept across destinations) or L{SYMMETRIC} (C{masquerade random}: a random
public port for every destination).  Both drop new connections coming in
on their WAN side, as home routers do: without that rule a peer's early
probe makes the router's conntrack keep an entry that clashes with the
later outbound mapping, masquerade picks another port, and correct
punching fails.  L{NatLab.block_udp} drops all UDP forwarded from one
LAN ("a corporate network"); hosta and hostc share a LAN bridge behind
NAT A (the same-LAN case).

How to use it in a test::

    from .natlab import CONE, SYMMETRIC, NatLab

    class MyTests(TestCase):
        timeout = 60

        async def test_it(self):
            lab = NatLab(self, nat_a=SYMMETRIC, nat_b=CONE)   # skips unless root with ip and nft
            stun = lab.stun_server(self)                      # pluresync's STUN server, in inet
            self.assertEqual(await stun.line(), "ready")
            peer = lab.spawn(self, "hosta", ["-m", "tests.punchpeer", "--stun", INTERNET])
            first = await peer.line()                          # its stdout, line by line
            peer.send("...")                                   # its stdin
            self.assertEqual(await peer.ended, 0)

L{NatLab.spawn} runs C{ip netns exec NS python ARGS} with the checkout on
C{PYTHONPATH}; the process is killed when its time bound runs out and at
the test's cleanup (by pid: C{ip netns del} does not end the processes in
a namespace, it only hides it).  The lab's own cleanup, registered first so
it runs last, also kills by pid anything else left in its namespaces, then
deletes them, also when the test failed.  Names carry a prefix of C{nl},
the creating process's pid and four random hex digits (C{nl4242-1a2b-hosta}),
so labs of parallel trial workers (C{-j2}) never collide, and a lab whose
creator was killed before its cleanup ran is removed by the next lab built
(L{sweep}); interface names repeat (C{wan}, C{lan}), but only inside each
lab's own namespaces.  Every command runs with a time bound.

It needs root, iproute2 (C{ip}) and nftables (C{nft}); without them
L{NatLab} raises C{SkipTest} saying which.  C{.ci/run} installs both.

To look at a lab by hand, build one from a Python shell as root and stop
before the cleanup, or use C{ip netns list}, C{ip netns exec NS nft list
ruleset}, C{ip netns exec NS conntrack -L}; C{ip -all netns del} removes
every namespace of the machine, not only a lab's: prefer C{ip netns del}
by name.

The internet runs pluresync's own STUN server (L{stun_server}: the
relay's C{--udp-port} on two ports), so a peer classifies its NAT as in
production (L{pluresync.direct.nat.classify_nat}); C{python -m tests.natlab
nat --stun 172.16.0.10} prints what a host's NAT looks like from there.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest

ROOT = Path(__file__).resolve().parent.parent

#: NAT kinds.
CONE, SYMMETRIC = "cone", "symmetric"
#: The hosts, each with its router and address.
HOSTS = {"hosta": ("nata", "192.168.1.2"), "hostc": ("nata", "192.168.1.3"), "hostb": ("natb", "192.168.2.2")}
#: The routers' LAN and WAN addresses.
ROUTERS = {"nata": ("192.168.1.1", "172.16.0.1"), "natb": ("192.168.2.1", "172.16.0.2")}
#: The internet's own address (its STUN server's), in the namespace "inet".
INTERNET = "172.16.0.10"
STUN_PORTS = (3478, 3479)
#: Seconds any one setup or teardown command may take.
COMMAND_TIMEOUT = 15.0
#: What a lab process's stdout and stderr keep (the last bytes).
OUTPUT_LIMIT = 1 << 20

_NAMESPACES = ("inet", "nata", "natb", "hosta", "hostc", "hostb")
#: A lab namespace's name: its creator's pid, a random tag, its role.
_NAME = re.compile(r"^nl(\d+)-[0-9a-f]{4}-[a-z]+$")


def unavailable(euid: int | None = None, which: Callable[[str], str | None] = shutil.which) -> str | None:
    """Why the lab cannot be built here (the skip reason), or C{None}."""
    if (os.geteuid() if euid is None else euid) != 0:
        return "the NAT lab needs root (network namespaces, nftables): run the tests as root, as .ci/run does"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if which(tool) is None:
            return f"the NAT lab needs the `{tool}` command: apt-get install {package}"
    return None


class LabError(Exception):
    """A lab command failed (with its output)."""


def _command(args: list[str], stdin: str | None = None) -> str:
    try:
        done = subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    except subprocess.TimeoutExpired as e:
        raise LabError(f"{' '.join(args)}: no answer within {COMMAND_TIMEOUT:g} s") from e
    if done.returncode != 0:
        raise LabError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def _nat_rules(kind: str) -> str:
    flags = " random" if kind == SYMMETRIC else ""
    return f"""
table ip nat {{
  chain postrouting {{ type nat hook postrouting priority srcnat; oifname "wan" masquerade{flags}; }}
}}
table inet filter {{
  chain forward {{ type filter hook forward priority filter; policy accept; }}
  chain input {{ type filter hook input priority filter; policy accept; iifname "wan" ct state new drop; }}
}}
"""


class NatLab:
    """
    The lab of one test: built on creation, removed at the test's cleanup.

    @param test: the test (its C{addCleanup} removes the lab).
    @param nat_a: NAT A's kind (L{CONE} or L{SYMMETRIC}).
    @param nat_b: NAT B's kind.
    """

    def __init__(self, test, nat_a: str = CONE, nat_b: str = CONE) -> None:
        reason = unavailable()
        if reason is not None:
            raise SkipTest(reason)
        if {nat_a, nat_b} - {CONE, SYMMETRIC}:
            raise ValueError(f"a lab NAT is {CONE!r} or {SYMMETRIC!r}")
        sweep()
        self.prefix = f"nl{os.getpid()}-{secrets.token_hex(2)}"
        self.created: list[str] = []
        test.addCleanup(self.remove)
        try:
            _command(["ip", "netns", "add", self.ns("inet")])
        except LabError as e:
            raise SkipTest(f"the NAT lab cannot create network namespaces here: {e}") from e
        self.created.append(self.ns("inet"))
        self._build(nat_a, nat_b)

    def ns(self, name: str) -> str:
        """The real name of the lab's namespace C{name} (C{inet}, C{nata}, C{hosta}, ...)."""
        return f"{self.prefix}-{name}"

    @property
    def namespaces(self) -> list[str]:
        return [self.ns(name) for name in _NAMESPACES]

    def ip(self, name: str, *args: str) -> str:
        """C{ip ARGS} inside the namespace C{name}."""
        return _command(["ip", "-n", self.ns(name), *args])

    def exec(self, name: str, *args: str, stdin: str | None = None) -> str:
        """A command inside the namespace C{name}, bounded in time."""
        return _command(["ip", "netns", "exec", self.ns(name), *args], stdin)

    def _build(self, nat_a: str, nat_b: str) -> None:
        for name in _NAMESPACES[1:]:
            _command(["ip", "netns", "add", self.ns(name)])
            self.created.append(self.ns(name))
        for name in _NAMESPACES:
            self.ip(name, "link", "set", "lo", "up")
        # The internet: a bridge, with the STUN server's address on it.
        self.ip("inet", "link", "add", "br0", "type", "bridge")
        self.ip("inet", "addr", "add", f"{INTERNET}/24", "dev", "br0")
        self.ip("inet", "link", "set", "br0", "up")
        for router, kind in (("nata", nat_a), ("natb", nat_b)):
            lan_address, wan_address = ROUTERS[router]
            # veth ends are created directly in their namespaces, so their
            # names never meet another lab's in the root namespace.
            _command(
                ["ip", "link", "add", "wan", "netns", self.ns(router), "type", "veth"]
                + ["peer", "name", f"p-{router}", "netns", self.ns("inet")]
            )
            self.ip("inet", "link", "set", f"p-{router}", "master", "br0", "up")
            self.ip(router, "addr", "add", f"{wan_address}/24", "dev", "wan")
            self.ip(router, "link", "set", "wan", "up")
            self.ip(router, "link", "add", "lan", "type", "bridge")
            self.ip(router, "addr", "add", f"{lan_address}/24", "dev", "lan")
            self.ip(router, "link", "set", "lan", "up")
            self.exec(router, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
            self.exec(router, "nft", "-f", "-", stdin=_nat_rules(kind))
        for host, (router, address) in HOSTS.items():
            _command(
                ["ip", "link", "add", f"l-{host}", "netns", self.ns(router), "type", "veth"]
                + ["peer", "name", "eth0", "netns", self.ns(host)]
            )
            self.ip(router, "link", "set", f"l-{host}", "master", "lan", "up")
            self.ip(host, "addr", "add", f"{address}/24", "dev", "eth0")
            self.ip(host, "link", "set", "eth0", "up")
            self.ip(host, "route", "add", "default", "via", ROUTERS[router][0])

    def block_udp(self, router: str) -> None:
        """Drop every UDP datagram forwarded from C{router}'s LAN (a corporate network); TCP still passes."""
        rule = ["add", "rule", "inet", "filter", "forward", "iifname", "lan", "meta", "l4proto", "udp", "drop"]
        self.exec(router, "nft", *rule)

    def spawn(self, test, name: str, args: list[str], timeout: float = 60.0) -> LabProcess:
        """
        Run C{python ARGS} in the namespace C{name} as a real process, with
        the checkout importable.  It is killed after C{timeout} seconds and
        at C{test}'s cleanup.
        """
        process = LabProcess(f"{name}: {' '.join(args)}")
        environment = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        argv = ["ip", "netns", "exec", self.ns(name), sys.executable, *args]
        transport = reactor.spawnProcess(process, shutil.which("ip"), argv, env=environment, path=str(ROOT))
        process.start(transport, timeout)
        test.addCleanup(process.stop)
        return process

    def stun_server(self, test, timeout: float = 60.0) -> LabProcess:
        """pluresync's STUN server in C{inet}, on L{STUN_PORTS}; its first line is C{ready}."""
        return self.spawn(test, "inet", ["-m", "tests.natlab", "stun", "--seconds", str(timeout)], timeout + 5)

    def remove(self) -> None:
        """Kill what is left in the lab's namespaces (by pid), then delete them."""
        created, self.created = self.created, []
        _remove(list(reversed(created)))


def _remove(namespaces: list[str]) -> None:
    """Kill every process left in C{namespaces} (by pid: deleting them would not), then delete them."""
    problems = []
    for namespace in namespaces:
        try:
            pids = _command(["ip", "netns", "pids", namespace]).split()
        except LabError as e:
            problems.append(str(e))
            continue
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    for namespace in namespaces:
        try:
            _command(["ip", "netns", "del", namespace])
        except LabError as e:
            problems.append(str(e))
    if problems:
        raise LabError("removing the NAT lab: " + "; ".join(problems))


def sweep() -> list[str]:
    """
    Remove the namespaces of labs whose creating process is gone (killed
    before its cleanup could run); the names removed.
    """
    orphans = []
    for line in _command(["ip", "netns", "list"]).splitlines():
        name = line.split()[0] if line.strip() else ""
        found = _NAME.match(name)
        if found and not os.path.exists(f"/proc/{found.group(1)}"):
            orphans.append(name)
    if orphans:
        _remove(orphans)
    return orphans


class LabProcess(ProcessProtocol):
    """
    A process in a lab namespace: its stdout line by line, its stdin, its end.

    @ivar code: its exit code (a signal's negative number) once it ended, else C{None}.
    @ivar timed_out: whether it was killed because its time bound ran out.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.out = b""
        self.err = b""
        self.code: int | None = None
        self.timed_out = False
        self._lines: list[str] = []
        self._partial = b""
        self._line_waiters: list[Deferred[str]] = []
        self._end_waiters: list[Deferred[int]] = []
        self._transport = None
        self._deadline = None

    def start(self, transport, timeout: float) -> None:
        self._transport = transport
        self._deadline = reactor.callLater(timeout, self._expire)

    def _expire(self) -> None:
        self.timed_out = True
        self.signal("KILL")

    def signal(self, name: str) -> None:
        try:
            self._transport.signalProcess(name)
        except ProcessExitedAlready:
            pass

    def send(self, line: str) -> None:
        """Write C{line} and a newline to its stdin."""
        self._transport.write(line.encode() + b"\n")

    def line(self) -> Deferred[str]:
        """Its next stdout line (fails, with its stderr, if it ends first)."""
        if self._lines:
            return succeed(self._lines.pop(0))
        if self.code is not None:
            return fail(self._why_no_line())
        d: Deferred[str] = Deferred()
        self._line_waiters.append(d)
        return d

    @property
    def ended(self) -> Deferred[int]:
        """A Deferred that fires with the exit code once it ended."""
        if self.code is not None:
            return succeed(self.code)
        d: Deferred[int] = Deferred()
        self._end_waiters.append(d)
        return d

    def outReceived(self, data: bytes) -> None:
        self.out = (self.out + data)[-OUTPUT_LIMIT:]
        *complete, self._partial = (self._partial + data).split(b"\n")
        for raw in complete:
            line = raw.decode("utf-8", "replace")
            if self._line_waiters:
                self._line_waiters.pop(0).callback(line)
            else:
                self._lines.append(line)

    def errReceived(self, data: bytes) -> None:
        self.err = (self.err + data)[-OUTPUT_LIMIT:]

    def processEnded(self, reason) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        value = reason.value
        self.code = (
            0 if isinstance(value, ProcessDone) else (value.exitCode if value.exitCode is not None else -value.signal)
        )
        waiters, self._end_waiters = self._end_waiters, []
        for d in waiters:
            d.callback(self.code)
        waiters, self._line_waiters = self._line_waiters, []
        for d in waiters:
            d.errback(self._why_no_line())

    def _why_no_line(self) -> AssertionError:
        bound = " (killed: its time bound ran out)" if self.timed_out else ""
        stderr = self.err.decode("utf-8", "replace")[-3000:]
        return AssertionError(f"{self.name} ended{bound} before the line awaited; stderr:\n{stderr}")

    def stop(self) -> Deferred[int]:
        """End it (TERM, then KILL after 3 s); fires with its exit code once it ended."""
        ended = self.ended
        if self.code is None:
            self.signal("TERM")
            kill = reactor.callLater(3.0, self.signal, "KILL")

            def cancel_kill(code: int) -> int:
                if kill.active():
                    kill.cancel()
                return code

            ended.addCallback(cancel_kill)
        return ended


# -- run inside the lab ---------------------------------------------------------------


def stun(seconds: float) -> None:
    """Serve STUN on L{STUN_PORTS} of every address for C{seconds}, as a relay's C{--udp-port} does."""
    from pluresync.direct.stunserver import StunServer

    for port in STUN_PORTS:
        reactor.listenUDP(port, StunServer())
    reactor.callLater(seconds, reactor.stop)
    reactor.callWhenRunning(lambda: print("ready", flush=True))
    reactor.run()


def nat(server: str) -> None:
    """Print, as JSON, how this host's NAT looks from the STUN server at C{server} (its two ports)."""
    import json

    from twisted.internet import task

    from pluresync.direct.nat import discover_nat

    async def run(reactor) -> None:
        report = await discover_nat(reactor, [(server, port) for port in STUN_PORTS], deadline=2.0)
        mapped = [str(sample.mapped) if sample.mapped else None for sample in report.samples]
        print(json.dumps({"nat": report.nat, "mapped": mapped, "reason": report.reason}), flush=True)

    task.react(lambda reactor: Deferred.fromCoroutine(run(reactor)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.natlab", description="NAT lab helpers run inside the lab")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("stun", help="a STUN server on UDP 3478 and 3479")
    server.add_argument("--seconds", type=float, default=60.0)
    client = commands.add_parser("nat", help="classify this host's NAT with the STUN server at --stun")
    client.add_argument("--stun", default=INTERNET)
    args = parser.parse_args(argv)
    if args.command == "stun":
        stun(args.seconds)
    else:
        nat(args.stun)


if __name__ == "__main__":
    main()
