"""Two peers through a relay: `python quickstart.py listen` here, `python quickstart.py connect` there."""
import os, sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import Factory, Protocol

RELAY = os.environ.get("RELAY", "relay:url=ws\\://127.0.0.1\\:8080:keyfile=demo.key")

class Shout(Protocol):  # the listening peer answers in capitals
    def dataReceived(self, data): self.transport.write(data.upper())

class Hello(Protocol):  # the connecting peer says hello and prints the answer
    def connectionMade(self): self.transport.write(b"hello, peer")
    def dataReceived(self, data): print(data.decode()); self.transport.loseConnection()
    def connectionLost(self, reason): self.factory.done.callback(None)

async def main(reactor, role):
    if role == "listen":
        await serverFromString(reactor, RELAY).listen(Factory.forProtocol(Shout))
        print("listening", flush=True); await Deferred()  # until Ctrl-C
    factory = Factory.forProtocol(Hello); factory.done = Deferred()
    await clientFromString(reactor, RELAY).connect(factory); await factory.done

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, sys.argv[1])))
