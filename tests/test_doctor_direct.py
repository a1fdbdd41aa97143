"""
C{pluresync doctor}'s look at the direct path: UDP, the NAT class and the
public address, from real STUN servers on 127.0.0.1; advice that does not
count in the overall verdict.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import DatagramProtocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from pluresync.direct.stunserver import StunServer
from pluresync.doctor.direct import diagnose_direct
from pluresync.doctor.report import FAIL, OK, SKIPPED, Row, Section, format_report
from pluresync.doctor.targets import targets
from pluresync.keys import SyncKey


class DirectSectionTests(TestCase):
    timeout = 30

    def listen(self, protocol) -> int:
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(lambda: maybeDeferred(port.stopListening))
        return port.getHost().port

    async def test_answered(self):
        """Two servers answer: UDP works, no NAT on loopback, the public address is the socket's."""
        first, second = self.listen(StunServer()), self.listen(StunServer())
        section = await diagnose_direct(reactor, (("127.0.0.1", first), ("127.0.0.1", second)), 5.0)
        self.assertTrue(section.advice)
        udp, nat, public = section.rows
        self.assertEqual((udp.check, udp.verdict), ("udp", OK))
        self.assertIn("2 of 2 STUN servers answered", udp.detail)
        self.assertEqual((nat.check, nat.verdict), ("nat", OK))
        self.assertTrue(nat.detail.startswith("open: "))
        self.assertEqual(public.verdict, OK)
        self.assertTrue(public.detail.startswith("127.0.0.1:"))

    async def test_no_answer(self):
        """A server that says nothing: UDP fails, the NAT is "blocked", with what it means."""
        silent = self.listen(DatagramProtocol())
        section = await diagnose_direct(reactor, (("127.0.0.1", silent),), 0.5)
        udp, nat, public = section.rows
        self.assertEqual(udp.verdict, FAIL)
        self.assertIn("no answer from 1 STUN server", udp.detail)
        self.assertEqual(nat.verdict, FAIL)
        self.assertIn("no UDP gets out", nat.detail)
        self.assertEqual(public.verdict, SKIPPED)

    async def test_no_servers(self):
        """Without stun= nothing is sent; the rows say why, the note what direct can still do."""
        section = await diagnose_direct(reactor, (), 5.0)
        self.assertEqual([row.verdict for row in section.rows], [SKIPPED] * 3)
        self.assertIn("peers on one network", section.notes[0])


class VerdictTests(SynchronousTestCase):
    def test_advice_does_not_count(self):
        """A failing direct section neither fails a working relay nor counts as a transport."""
        relay = Section("relay:azure", "wss://r", [Row("round trip", OK)])
        direct = Section("direct", "UDP", [Row("udp", FAIL)], advice=True)
        text, code = format_report("header", [relay, direct])
        self.assertEqual(code, 0)
        self.assertIn("1 of 1 transport works", text)
        self.assertIn("direct  UDP  [advice]", text)
        broken = Section("relay:azure", "wss://r", [Row("round trip", FAIL)])
        text, code = format_report("header", [broken, direct])
        self.assertEqual(code, 1)
        self.assertIn("none of 1 transport works", text)

    def test_targets(self):
        """auto:'s stun= reaches the doctor; direct=off and relay: have no direct section."""
        key = SyncKey.generate().to_text()
        found = targets(f"auto:key={key}:stun=127.0.0.1\\:3478,127.0.0.1\\:3479")
        self.assertEqual(found.stun, (("127.0.0.1", 3478), ("127.0.0.1", 3479)))
        self.assertIsNone(targets(f"auto:key={key}:direct=off").stun)
        self.assertIsNone(targets(f"relay:azure:key={key}").stun)
