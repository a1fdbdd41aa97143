"""
Authentication with real processes: `twist pluresync-relay --auth signed`,
a token minted by `pluresync relay-token`, and relay: endpoints using it.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory
from twisted.trial.unittest import TestCase

from pluresync.errors import RelayAuthError
from pluresync.keys import SyncKey

from .localrelay import Collector
from .processes import spawn
from .relayprocess import start_relay


class SignedTokenProcessTests(TestCase):
    timeout = 60

    async def test_signed_tokens(self):
        """
        A relay process with --auth signed refuses a client without a token
        (RelayAuthError, the relay answered 401) and pairs clients holding a
        token minted by the real `pluresync relay-token` command; neither the
        token nor the secret ever appears in the relay's output.
        """
        work = Path(self.mktemp()).resolve()
        work.mkdir(parents=True)
        secret = work / "relay.secret"
        secret.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        secret.chmod(0o600)
        minting = spawn(
            self, ["-m", "pluresync", "relay-token", "--secret-file", str(secret), "--tenant", "acme", "--ttl", "1h"]
        )
        self.assertEqual(await minting.ended, 0, minting.err.decode())
        token = minting.out.decode().strip()
        self.assertTrue(token.startswith("psrt1."))
        tokenfile = work / "relay.token"
        tokenfile.write_text(token + "\n")

        relay = await start_relay(self, ["--auth", "signed", "--auth-secret-file", str(secret)])
        key = SyncKey.generate().to_text()
        base = f"relay:url={relay.escaped_url}:key={key}"

        with self.assertRaises(RelayAuthError) as refused:
            await clientFromString(reactor, base + ":wait=0").connect(Factory.forProtocol(Collector))
        self.assertEqual(refused.exception.code, "unauthorized")
        self.assertNotIn(token, str(refused.exception))

        port = await serverFromString(reactor, f"{base}:tokenfile={tokenfile}").listen(Factory.forProtocol(Collector))
        self.addCleanup(port.stopListening)
        client = await clientFromString(reactor, f"{base}:tokenfile={tokenfile}:wait=10").connect(
            Factory.forProtocol(Collector)
        )
        client.transport.loseConnection()
        await client.lost
        for secret_text in (token, token.split(".")[-1], secret.read_text().strip()):
            self.assertNotIn(secret_text, relay.output)
        self.assertIn("acme", relay.output)


class MetricsProcessTests(TestCase):
    timeout = 60

    async def test_metrics_of_a_real_relay(self):
        """
        A `twist pluresync-relay` process serves /metrics on its port: after
        one pairing through it the pairing counter says so, and no line
        carries the rendezvous id.
        """
        import treq
        from twisted.web.client import HTTPConnectionPool

        relay = await start_relay(self)
        key = SyncKey.generate()
        base = f"relay:url={relay.escaped_url}:key={key.to_text()}"
        port = await serverFromString(reactor, base).listen(Factory.forProtocol(Collector))
        self.addCleanup(port.stopListening)
        client = await clientFromString(reactor, base + ":wait=10").connect(Factory.forProtocol(Collector))
        client.transport.loseConnection()
        await client.lost
        pool = HTTPConnectionPool(reactor, persistent=False)
        response = await treq.get(f"http://127.0.0.1:{relay.port}/metrics", pool=pool)
        self.assertEqual(response.code, 200)
        text = (await response.text()).splitlines()
        self.assertIn("pluresync_relay_pairings_total 1.0", text)
        rdv = key.topic().rendezvous_id.hex()
        self.assertFalse([line for line in text if rdv[:8] in line])
