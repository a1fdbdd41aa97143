"""
C{pluresync doctor} and the HTTP pipe: behind a proxy that refuses
WebSockets it says that the HTTP pipe works from here, and pairs with
itself through it (the exit code: this transport works).
"""

from __future__ import annotations

from pluresync.doctor.report import FAIL, OK

from .httpproxy import InspectingProxy
from .localrelay import LocalRelay
from .test_doctor import DoctorTestCase


class DoctorHttpPipeTests(DoctorTestCase):
    async def test_websocket_refused_http_pipe_works(self) -> None:
        relay = LocalRelay(self)
        proxy = InspectingProxy(self, deny_upgrade=True)
        code, text = await self.doctor(self.relay_endpoint(relay.url, proxy=proxy.url))
        self.assertEqual(code, 0, text)
        self.assertEqual(self.verdict(text, "websocket"), FAIL)
        self.assertEqual(self.verdict(text, "http pipe"), OK)
        self.assertIn("WebSockets are refused from here, the relay's HTTP pipe works", self.row(text, "http pipe"))
        self.assertEqual(self.verdict(text, "round trip"), OK)
        self.assertIn("(over the HTTP pipe)", self.row(text, "round trip"))

    async def test_both_work(self) -> None:
        relay = LocalRelay(self)
        code, text = await self.doctor(self.relay_endpoint(relay.url))
        self.assertEqual(code, 0, text)
        self.assertEqual(self.verdict(text, "http pipe"), OK)
        self.assertIn("pipe=auto uses the WebSocket", self.row(text, "http pipe"))
