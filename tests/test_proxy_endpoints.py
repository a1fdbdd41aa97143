"""relay: endpoint strings through a real HTTP proxy (tinyproxy), end to end."""

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from pluresync.errors import RelayUnreachableError
from pluresync.keys import SyncKey

from .httpproxy import TinyProxy
from .localrelay import Collector, Listening, LocalRelay


class ProxyEndToEndTests(TestCase):
    """A relay: listener and client, both through tinyproxy via proxy=."""

    timeout = 30

    async def test_pair_through_proxy(self):
        """Listener and client both tunnel through tinyproxy (log shows the CONNECTs); bytes flow."""
        relay = LocalRelay(self)
        relay_port = relay.port.getHost().port
        proxy = await TinyProxy.start(self, connect_ports=[relay_port])
        key = SyncKey.generate()
        param = {"proxy": f"http\\://127.0.0.1\\:{proxy.port}"}
        listening = Listening()
        port = await serverFromString(reactor, relay.endpoint(key, **param)).listen(listening.factory)
        self.addCleanup(port.stopListening)
        accepted = listening.next()
        client = await clientFromString(reactor, relay.endpoint(key, **param)).connect(Factory.forProtocol(Collector))
        server = await accepted
        got = Deferred()
        server.dataArrived = lambda data: not got.called and got.callback(None)
        client.transport.write(b"via proxy")
        await got
        self.assertEqual(server.data, b"via proxy")
        client.transport.loseConnection()
        await client.lost
        await server.lost
        self.assertGreaterEqual(proxy.log().count(f"CONNECT 127.0.0.1:{relay_port} HTTP/1.1"), 3)

    async def test_auth_error_surfaces(self):
        """A proxy wanting credentials: connect() fails with RelayUnreachableError saying so."""
        relay = LocalRelay(self)
        relay_port = relay.port.getHost().port
        proxy = await TinyProxy.start(self, connect_ports=[relay_port], basic_auth=("u", "p"))
        endpoint = clientFromString(
            reactor, relay.endpoint(SyncKey.generate(), proxy=f"http\\://127.0.0.1\\:{proxy.port}", wait="0")
        )
        with self.assertRaises(RelayUnreachableError) as e:
            await endpoint.connect(Factory.forProtocol(Collector))
        self.assertIn("requires authentication", str(e.exception))

    async def test_env_proxy_unreachable(self):
        """HTTP_PROXY pointing nowhere: the message names the proxy and where it came from."""
        import os

        relay = LocalRelay(self)
        self.patch(os, "environ", {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9"})
        endpoint = clientFromString(reactor, relay.endpoint(SyncKey.generate(), wait="0"))
        with self.assertRaises(RelayUnreachableError) as e:
            await endpoint.connect(Factory.forProtocol(Collector))
        self.assertIn("HTTP_PROXY", str(e.exception))
