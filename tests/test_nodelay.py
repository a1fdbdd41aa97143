"""
TCP_NODELAY on the sockets of both ends of a relay hop (issue 15, item 4):
Autobahn's own attempt fails silently (it reads its option before copying
it from the factory), so pluresync sets it itself.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.trial import unittest

from pluresync.pipes.websocket import RelayURL, open_relay_socket
from pluresync.relay.core.wire import encode_listen
from pluresync.relay.server.site import build_site

from .relayprocess import poll, sockets_closed


def _no_delay(transport) -> int:
    return transport.getHandle().getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class NoDelayTests(unittest.TestCase):
    timeout = 20

    async def test_both_ends(self) -> None:
        site, factory = build_site(reactor)
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        url = RelayURL.parse(f"ws://127.0.0.1:{port.getHost().port}")
        protocol, _ = await open_relay_socket(reactor, url, encode_listen("ab" * 32, "cd" * 32))
        self.assertTrue(_no_delay(protocol.transport), "the client's socket")
        relay_side = await poll(lambda: next(iter(factory.sockets), None), timeout=5, what="the relay's socket")
        self.assertTrue(_no_delay(relay_side.transport), "the relay's socket")
        protocol.transport.abortConnection()
        await sockets_closed()
