"""
Twisted's own HTTP client through a relay, to a `twist web` that listens on one:

    twist web --listen "relay:url=ws\\://127.0.0.1\\:8080:keyfile=demo.key" --path .   # peer A
    python endpoint_client.py /README.md                                              # peer B

RELAY is the endpoint string (default: the local relay and demo.key, as in quickstart.py).
"""
import os, sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString
from twisted.web.client import Agent, HTTPConnectionPool
from treq.client import HTTPClient  # treq comes with pluresync

RELAY = os.environ.get("RELAY", "relay:url=ws\\://127.0.0.1\\:8080:keyfile=demo.key")

class ThroughRelay:  # Agent asks this for an endpoint per URL: always the peer behind the relay
    def __init__(self, reactor): self.reactor = reactor
    def endpointForURI(self, uri): return clientFromString(self.reactor, RELAY)

async def main(reactor, path):
    agent = Agent.usingEndpointFactory(reactor, ThroughRelay(reactor), HTTPConnectionPool(reactor, persistent=False))
    response = await HTTPClient(agent).get("http://peer" + path)  # the host name is not used
    body = await response.content()
    print(response.code, len(body), "bytes"); sys.stdout.write(body.decode(errors="replace"))

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, (sys.argv[1:] or ["/"])[0])))
