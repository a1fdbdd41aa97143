"""
C{direct:} endpoints (the LAN path) and C{auto:} racing it first.

Unit tests run on a L{MemoryReactorClock} with mDNS faked (L{FakeLan}): the
TCP connections are iosim's, and the handshake and session over them are the
real ones.  Integration tests run real processes (tests/directpeer.py) on two
hosts of a LAN made of network namespaces (tests/lanlab.py), where multicast
works as it does not on C{lo}.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost, ConnectionRefusedError
from twisted.internet.interfaces import (
    IListeningPort,
    IStreamClientEndpoint,
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpoint,
    IStreamServerEndpointStringParser,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.test.iosim import ConnectionCompleter
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from pluresync.direct.lan import lan_key
from pluresync.endpoints import parsers
from pluresync.endpoints.auto import AutoClientEndpoint, AutoConfig, AutoListeningPort, AutoServerEndpoint
from pluresync.endpoints.direct import (
    HANDSHAKE_TIMEOUT,
    DirectClientEndpoint,
    DirectConfig,
    DirectListeningPort,
    DirectServerEndpoint,
    LanAccess,
)
from pluresync.endpoints.parsers import DirectClientParser, DirectServerParser, direct_config
from pluresync.endpoints.pathcache import PathCache
from pluresync.errors import (
    ConfigurationError,
    ConnectionTimeoutError,
    LanConnectError,
    LanDiscoveryError,
    LanNoPeerError,
)
from pluresync.interfaces import IPath, IPathClient, IPathListener
from pluresync.keys import PeerIdentity, SyncKey
from pluresync.pipes import tcp

from . import lanlab
from .test_auto import FakeLink, FakePath

#: The TCP port the listener under test pretends to listen on (MemoryReactor keeps what it is given).
PORT = 45678


class FakeSearch:
    """One LAN search: the test says what is found, and when it ends."""

    def __init__(self, key: bytes, timeout: float, on_found, interfaces) -> None:
        self.key = key
        self.timeout = timeout
        self.on_found = on_found
        self.interfaces = interfaces
        self.cancelled = False
        self.found: list[IPv4Address] = []
        self.d: Deferred = Deferred(self._cancel)

    def _cancel(self, d: Deferred) -> None:
        self.cancelled = True

    def find(self, *hosts: str, port: int = PORT) -> None:
        """One listener found, at C{hosts}."""
        candidates = [IPv4Address("TCP", host, port) for host in hosts]
        self.found += candidates
        self.on_found(candidates)

    def end(self) -> None:
        self.d.callback(list(self.found))


class FakeAdvert:
    """An advertisement whose announcement the test completes by hand."""

    def __init__(self, port: int, key: bytes, addresses, interfaces) -> None:
        self.port = port
        self.key = key
        self.addresses = addresses
        self.interfaces = interfaces
        self.advert = SimpleNamespace(addresses=tuple(addresses or ["10.0.0.1"]))
        self.ready: Deferred = Deferred()
        self.stopped = False

    def stop(self) -> Deferred:
        self.stopped = True
        if not self.ready.called:
            self.ready.errback(LanDiscoveryError("the advertisement was stopped before it was announced"))
            self.ready.addErrback(lambda _: None)
        return succeed(None)


class RecordingPort:
    """A listening port that remembers being stopped (MemoryReactor's forgets)."""

    def __init__(self, port: IListeningPort) -> None:
        self._port = port
        self.stopped = False

    def getHost(self):
        return self._port.getHost()

    def stopListening(self):
        self.stopped = True
        return succeed(None)


class FakeLan:
    """mDNS faked, TCP on the test's MemoryReactorClock: a L{LanAccess} that records what it was asked."""

    def __init__(self) -> None:
        self.searches: list[FakeSearch] = []
        self.adverts: list[FakeAdvert] = []
        self.ports: list[RecordingPort] = []
        self.discover_error: Exception | None = None

    def discover(self, reactor, key, timeout=3.0, *, first=False, on_found=None, interfaces=None) -> Deferred:
        if self.discover_error is not None:
            return fail(self.discover_error)
        search = FakeSearch(key, timeout, on_found, interfaces)
        self.searches.append(search)
        return search.d

    def advertise(self, reactor, port, key, *, addresses=None, interfaces=None) -> FakeAdvert:
        advert = FakeAdvert(port, key, addresses, interfaces)
        self.adverts.append(advert)
        return advert

    def listen(self, reactor, on_pipe, *, port=0, interface="", name=tcp.DEFAULT_NAME) -> Deferred:
        def record(listening):
            self.ports.append(RecordingPort(listening))
            return self.ports[-1]

        return tcp.listen_tcp_pipes(reactor, on_pipe, port=port, interface=interface, name=name).addCallback(record)

    @property
    def access(self) -> LanAccess:
        return LanAccess(discover=self.discover, advertise=self.advertise, listen=self.listen)


class Collect(Protocol):
    """Keeps what arrives and how the connection ended."""

    def __init__(self) -> None:
        self.data = b""
        self.made = 0
        self.lost: list[Failure] = []

    def connectionMade(self) -> None:
        self.made += 1

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason) -> None:
        self.lost.append(reason)


class Builds(Factory):
    """A factory that keeps every protocol it built."""

    def __init__(self) -> None:
        self.built: list[Collect] = []

    def buildProtocol(self, addr):
        self.built.append(Collect())
        return self.built[-1]


def keyfile(test) -> str:
    path = test.mktemp()
    SyncKey.generate().write(path)
    return path


class ParserTests(SynchronousTestCase):
    """C{direct:} strings: found by Twisted's plugin scan, parameters and their errors."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.keyfile = keyfile(self)

    def test_plugins_found_once(self) -> None:
        """
        Twisted finds exactly one client and one server parser for direct
        (a generic name: nothing else may claim it), and they are ours.
        """
        clients = [p for p in getPlugins(IStreamClientEndpointStringParserWithReactor) if p.prefix == "direct"]
        servers = [p for p in getPlugins(IStreamServerEndpointStringParser) if p.prefix == "direct"]
        self.assertEqual((len(clients), len(servers)), (1, 1))
        self.assertTrue(clients[0].__module__.startswith("pluresync."))
        self.assertTrue(servers[0].__module__.startswith("pluresync."))
        self.assertTrue(verifyObject(IStreamClientEndpointStringParserWithReactor, clients[0]))
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, servers[0]))
        self.assertTrue(verifyObject(IStreamClientEndpointStringParserWithReactor, DirectClientParser()))
        self.assertTrue(verifyObject(IStreamServerEndpointStringParser, DirectServerParser()))

    def test_client_and_server(self) -> None:
        """clientFromString and serverFromString build direct: endpoints with the string's parameters."""
        client = clientFromString(
            self.reactor, f"direct:keyfile={self.keyfile}:topic=notes:wait=5:timeout=9:lan=192.168.7.2:resume=4"
        )
        self.assertIsInstance(client, DirectClientEndpoint)
        self.assertTrue(verifyObject(IStreamClientEndpoint, client))
        self.assertTrue(verifyObject(IPathClient, client))
        config = client._config
        self.assertEqual(
            (config.name, config.wait, config.timeout, config.lan), ("direct:lan", 5.0, 9.0, "192.168.7.2")
        )
        self.assertEqual(config.session.resume, 4.0)
        self.assertEqual(config.topic, SyncKey.from_file(self.keyfile).topic("notes"))
        server = serverFromString(self.reactor, f"direct:keyfile={self.keyfile}:port=4444")
        self.assertIsInstance(server, DirectServerEndpoint)
        self.assertTrue(verifyObject(IStreamServerEndpoint, server))
        self.assertEqual((server._config.port, server._config.lan), (4444, None))

    def test_config_is_a_path(self) -> None:
        """
        The config is an IPath with a listener that is an IPathListener, and
        it names the peer for the path cache the way a relay path does.
        """
        config = direct_config(keyfile=self.keyfile)
        self.assertTrue(verifyObject(IPath, config))
        self.assertTrue(verifyObject(IPathListener, config.listener(self.reactor, Factory())))
        relay = parsers.relay_config("azure", keyfile=self.keyfile)
        self.assertEqual(config.cache_key, relay.cache_key)
        peer = "cd" * 32
        self.assertEqual(
            direct_config(keyfile=self.keyfile, peer=peer).cache_key,
            parsers.relay_config("azure", keyfile=self.keyfile, peer=peer).cache_key,
        )

    def test_search_within_the_timeout(self) -> None:
        """A client searches for wait= seconds, ending a second before timeout=, and at least a second."""
        for wait, timeout, search in ((30, 30, 29), (5, 30, 5), (0, 30, 1), (30, 0.5, 0.5), (30, 1.5, 1)):
            config = direct_config(keyfile=self.keyfile, wait=str(wait), timeout=str(timeout))
            self.assertEqual(config.search, search, (wait, timeout))

    def test_unknown_parameters_named(self) -> None:
        """An unknown parameter is named, with the known ones."""
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"direct:keyfile={self.keyfile}:bogus=1:url=x")
        self.assertIn(
            "direct endpoint: unknown parameter(s) bogus, url; known: identity, key, keyfile", str(e.exception)
        )

    def test_refusals(self) -> None:
        """Misplaced and malformed parameters are refused, each error naming its parameter."""
        k = f"direct:keyfile={self.keyfile}"
        for description, words in (
            (f"{k}:port=4444", "port= only apply to listening"),
            (f"{k}:lan=eth0", "lan= is the IPv4 address"),
            (f"{k}:lan=127.0.0.1", "lan= is the IPv4 address"),
            (f"{k}:timeout=soon", "direct endpoint: timeout= must be a number"),
            (f"{k}:window=1", "direct endpoint: window= must be between"),
            (f"direct:lan:{k[7:]}", "takes only name=value parameters"),
        ):
            with self.assertRaises(ConfigurationError) as e:
                clientFromString(self.reactor, description)
            self.assertIn(words, str(e.exception))
        for description, words in (
            (f"{k}:peer={'ab' * 32}", "peer= only apply to connecting"),
            (f"{k}:port=65536", "port= is a TCP port"),
            (f"{k}:port=-1", "port= is a TCP port"),
        ):
            with self.assertRaises(ConfigurationError) as e:
                serverFromString(self.reactor, description)
            self.assertIn(words, str(e.exception))

    def test_key_never_in_errors(self) -> None:
        """A key given in the string never shows up in an error about it."""
        text = SyncKey.generate().to_text()
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"direct:key={text}:bogus=1")
        self.assertNotIn(text[5:], str(e.exception))

    def test_zeroconf_missing(self) -> None:
        """
        Without the direct extra, direct: says what to install, auto:
        leaves the LAN path out (unless direct=on asks for it).
        """
        self.patch(parsers, "zeroconf_installed", lambda: False)
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"direct:keyfile={self.keyfile}")
        self.assertIn("pip install 'pluresync[direct]'", str(e.exception))
        config = clientFromString(self.reactor, f"auto:keyfile={self.keyfile}")._config
        self.assertEqual([p.name for p in config.paths], ["relay:azure", "relay:vercel"])
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:direct=on")
        self.assertIn("pip install 'pluresync[direct]'", str(e.exception))


class AutoStringTests(SynchronousTestCase):
    """What auto: strings and the seed config say about the LAN path."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.keyfile = keyfile(self)

    def config_file(self, **fields) -> str:
        path = self.mktemp()
        Path(path).write_text(json.dumps(fields))
        return path

    def names(self, description: str, server: bool = False) -> list[str]:
        parse = serverFromString if server else clientFromString
        return [p.name for p in parse(self.reactor, description)._config.paths]

    def test_lan_first(self) -> None:
        """By default the LAN path comes first, with the same identity, timeout and cache key as the relays."""
        config = clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:timeout=7:lan=10.1.2.3")._config
        self.assertEqual([p.name for p in config.paths], ["direct:lan", "relay:azure", "relay:vercel"])
        lan, azure = config.paths[0], config.paths[1]
        self.assertIsInstance(lan, DirectConfig)
        self.assertIs(lan.identity, azure.identity)
        self.assertEqual((lan.timeout, lan.lan, lan.cache_key), (7.0, "10.1.2.3", azure.cache_key))
        self.assertEqual(config.cache_key, azure.cache_key)
        port = serverFromString(self.reactor, f"auto:keyfile={self.keyfile}:port=4000")._config.paths[0].port
        self.assertEqual(port, 4000)

    def test_direct_off(self) -> None:
        """direct=off leaves the LAN path out; the config file's syncDirect says the same, below the string."""
        self.assertEqual(self.names(f"auto:keyfile={self.keyfile}:direct=off"), ["relay:azure", "relay:vercel"])
        self.assertEqual(self.names(f"auto:keyfile={self.keyfile}:direct=off", server=True)[0], "relay:azure")
        self.assertEqual(self.names(f"auto:keyfile={self.keyfile}:direct=on")[0], "direct:lan")
        path = self.config_file(syncDirect=False)
        self.assertEqual(self.names(f"auto:keyfile={self.keyfile}:config={path}")[0], "relay:azure")
        self.assertEqual(self.names(f"auto:keyfile={self.keyfile}:config={path}:direct=on")[0], "direct:lan")
        from pluresync.config import load_config

        self.assertEqual(load_config(path, environ={}), {"direct": False})

    def test_refusals(self) -> None:
        """direct= takes on or off; port= is for listeners; a malformed syncDirect names the field."""
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:direct=maybe")
        self.assertIn("direct= is on or off", str(e.exception))
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:port=1")
        self.assertIn("port=", str(e.exception))
        path = self.config_file(syncDirect="no")
        with self.assertRaises(ConfigurationError) as e:
            clientFromString(self.reactor, f"auto:keyfile={self.keyfile}:config={path}")
        self.assertIn("syncDirect must be a bool", str(e.exception))


class LanTestCase(SynchronousTestCase):
    """A direct: config of one key for a listener and a client, on one MemoryReactorClock."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.lan = FakeLan()
        self.key = SyncKey.generate()
        self.config = DirectConfig(
            topic=self.key.topic(), identity=PeerIdentity.generate(), port=PORT, timeout=10.0, access=self.lan.access
        )
        self.completer = ConnectionCompleter(self.reactor)

    def listener(self, factory=None, **kwargs) -> DirectListeningPort:
        config = replace(self.config, identity=PeerIdentity.generate())
        port = DirectListeningPort(self.reactor, config, factory or Builds(), **kwargs)
        self.assertTrue(verifyObject(IPathListener, port))
        return port

    def listening(self, factory=None) -> DirectListeningPort:
        port = self.listener(factory)
        started = port.startListening()
        self.lan.adverts[-1].ready.callback(None)
        self.assertIs(self.successResultOf(started), port)
        return port

    def client(self, **changes) -> DirectClientEndpoint:
        endpoint = DirectClientEndpoint(self.reactor, replace(self.config, **changes))
        self.assertTrue(verifyObject(IStreamClientEndpoint, endpoint))
        return endpoint

    def pump(self):
        """Complete the TCP connection the client asked for (to the listener's port) and run it."""
        pump = self.completer.succeedOnce()
        self.assertIsNotNone(pump, "nobody was connecting")
        pump.flush()
        return pump


class ClientTests(LanTestCase):
    """The client: search, race each listener's addresses, handshake, session."""

    def test_connects_over_the_lan(self) -> None:
        """
        The client searches for its topic's key, connects to what is found,
        and the handshake and session run over the TCP pipe: both protocols
        see one connection on direct:lan, bytes flow both ways, and the
        search ends with the win.
        """
        served = Builds()
        self.listening(served)
        d = self.client().connect(Builds())
        [search] = self.lan.searches
        self.assertEqual((search.key, search.timeout, search.interfaces), (lan_key(self.key.topic()), 9.0, None))
        search.find("10.0.0.1")
        pump = self.pump()
        protocol = self.successResultOf(d)
        self.assertTrue(search.cancelled)
        self.assertEqual(protocol.transport.getPeer().transport, "direct:lan")
        [peer] = served.built
        self.assertEqual(peer.made, 1)
        protocol.transport.write(b"hello over the LAN")
        peer.transport.write(b"and back")
        pump.flush()
        self.assertEqual((peer.data, protocol.data), (b"hello over the LAN", b"and back"))
        protocol.transport.loseConnection()
        for _ in range(100):
            if protocol.lost and peer.lost:
                break
            self.reactor.advance(0.01)
            pump.flush()
        self.assertTrue(protocol.lost[0].check(ConnectionDone) and peer.lost[0].check(ConnectionDone))

    def test_nobody_on_the_lan(self) -> None:
        """A search that finds nobody fails with LanNoPeerError, saying so and what to check."""
        d = self.client().connect(Builds())
        self.lan.searches[0].end()
        failure = self.failureResultOf(d, LanNoPeerError)
        self.assertIn("no peer with this key and topic answered on the LAN within 9 s", str(failure.value))
        self.assertIn("multicast", str(failure.value))
        self.assertEqual(self.reactor.tcpClients, [])

    def test_mdns_cannot_run(self) -> None:
        """When mDNS cannot run here, the attempt fails at once with that error (auto: moves on)."""
        self.lan.discover_error = LanDiscoveryError("could not start mDNS")
        d = self.client().connect(Builds())
        self.failureResultOf(d, LanDiscoveryError)

    def test_next_listener_after_a_dead_one(self) -> None:
        """
        A listener whose address refuses does not end the attempt: the
        search goes on, and another listener found later wins.
        """
        self.listening()
        d = self.client().connect(Builds())
        search = self.lan.searches[0]
        search.find("10.0.0.9", port=PORT + 1)
        self.completer.failOnce(Failure(ConnectionRefusedError()))
        self.assertNoResult(d)
        search.find("10.0.0.1")
        self.pump()
        self.assertEqual(self.successResultOf(d).transport.getPeer().transport, "direct:lan")

    def test_every_listener_failed(self) -> None:
        """Once the search is over and every listener found failed, one error lists each address."""
        d = self.client().connect(Builds())
        search = self.lan.searches[0]
        search.find("10.0.0.9", "10.0.0.8", port=PORT + 1)
        self.completer.failOnce(Failure(ConnectionRefusedError()))
        self.completer.failOnce(Failure(ConnectionRefusedError()))
        self.assertNoResult(d)
        search.end()
        failure = self.failureResultOf(d, LanConnectError)
        self.assertIn("could not reach the peer found on the LAN", str(failure.value))
        self.assertEqual([a for a, _ in failure.value.attempts], [f"10.0.0.9:{PORT + 1}", f"10.0.0.8:{PORT + 1}"])

    def test_peer_picks_the_listener(self) -> None:
        """With peer=, a listener of the same key but another identity is refused, and the right one taken."""
        wrong, right = self.listening(), self.listening()
        d = self.client(peer=right._config.identity.public).connect(Builds())
        search = self.lan.searches[0]
        search.find("10.0.0.1")
        # Both listeners share PORT here: the first one in the reactor's list answers.
        self.pump()
        self.assertNoResult(d)
        self.reactor.tcpServers.pop(0)
        search.find("10.0.0.2")
        self.pump()
        protocol = self.successResultOf(d)
        self.assertEqual(protocol.transport.getPeer().peer_id, right._config.identity.peer_id)
        self.assertEqual(wrong.handshaking, 0)

    def test_timeout(self) -> None:
        """timeout= ends the attempt with ConnectionTimeoutError and ends the search."""
        d = self.client().connect(Builds())
        self.reactor.advance(10)
        failure = self.failureResultOf(d, ConnectionTimeoutError)
        self.assertIn("connecting on the LAN (direct:lan) timed out after 10 s", str(failure.value))
        self.assertTrue(self.lan.searches[0].cancelled)

    def test_cancel(self) -> None:
        """Cancelling connect() ends the search and the TCP attempts: ConnectingCancelledError."""
        d = self.client().connect(Builds())
        self.lan.searches[0].find("10.0.0.1")
        d.cancel()
        self.failureResultOf(d, ConnectingCancelledError)
        self.assertTrue(self.lan.searches[0].cancelled)

    def test_resumes_by_searching_again(self) -> None:
        """
        When the LAN link is lost, the session searches again and resumes
        over the new link: still one connection on both sides, and the
        bytes written meanwhile arrive.
        """
        served = Builds()
        self.listening(served)
        d = self.client(session=replace(self.config.session, resume=30.0)).connect(Builds())
        self.lan.searches[0].find("10.0.0.1")
        pump = self.pump()
        protocol = self.successResultOf(d)
        [peer] = served.built
        pump.clientIO.disconnectReason = Failure(ConnectionLost("the LAN link broke"))
        pump.clientIO.abortConnection()
        pump.flush()
        protocol.transport.write(b"written while the link was down")
        for _ in range(300):
            if len(self.lan.searches) > 1:
                break
            self.reactor.advance(0.1)
        self.assertEqual(len(self.lan.searches), 2, "the session did not search again")
        self.lan.searches[1].find("10.0.0.1")
        pump = self.pump()
        for _ in range(100):
            if peer.data:
                break
            self.reactor.advance(0.01)
            pump.flush()
        self.assertEqual(peer.data, b"written while the link was down")
        self.assertEqual((len(served.built), peer.made, protocol.made, peer.lost, protocol.lost), (1, 1, 1, [], []))


class ListenerTests(LanTestCase):
    """The listener: its port and advertisement, its bounds, its stop."""

    def connect_raw(self, port: DirectListeningPort) -> StringTransport:
        """A TCP connection to the listener that says nothing (it stays in its handshake)."""
        factory = self.reactor.tcpServers[-1][1]
        protocol = factory.buildProtocol(IPv4Address("TCP", "10.0.0.7", 5000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.7", 5000))
        protocol.makeConnection(transport)
        return transport

    def test_listens_and_advertises(self) -> None:
        """
        It opens the TCP port, advertises that port with the topic's key,
        and is reachable (connected) once the advertisement is announced;
        stopping withdraws the advertisement and closes the port.
        """
        port = self.listener()
        started = port.startListening()
        self.assertEqual(self.reactor.tcpServers[0][0], PORT)
        self.assertEqual(self.reactor.tcpServers[0][3], "")
        [advert] = self.lan.adverts
        self.assertEqual((advert.port, advert.key, advert.addresses), (PORT, lan_key(self.key.topic()), None))
        self.assertNoResult(started)
        self.assertFalse(port.connected)
        advert.ready.callback(None)
        self.assertIs(self.successResultOf(started), port)
        self.assertTrue(port.connected)
        self.assertEqual(port.address.port, PORT)
        self.assertEqual(port.getHost().transport, "direct:lan")
        self.assertIs(self.successResultOf(port.startListening()), port)
        self.successResultOf(port.stopListening())
        self.assertTrue(advert.stopped and self.lan.ports[0].stopped)
        self.assertFalse(port.connected)
        self.successResultOf(port.stopListening())

    def test_one_interface(self) -> None:
        """lan= keeps the port, the advertisement and mDNS to that one interface."""
        self.config = replace(self.config, lan="10.0.0.5")
        self.listener().startListening()
        self.assertEqual(self.reactor.tcpServers[0][3], "10.0.0.5")
        advert = self.lan.adverts[0]
        self.assertEqual((advert.addresses, advert.interfaces), (["10.0.0.5"], ["10.0.0.5"]))

    def test_handshakes_bounded(self) -> None:
        """
        Past the bound on connections in their handshake, new ones are
        dropped at once; the handshake timeout frees the places.
        """
        port = self.listener(max_handshakes=3)
        port.startListening()
        self.lan.adverts[0].ready.callback(None)
        held = [self.connect_raw(port) for _ in range(3)]
        self.assertEqual(port.handshaking, 3)
        self.assertFalse(any(t.disconnecting for t in held))
        extra = self.connect_raw(port)
        self.assertTrue(extra.disconnecting)
        self.assertEqual(port.handshaking, 3)
        self.reactor.advance(HANDSHAKE_TIMEOUT)
        self.assertEqual(port.handshaking, 0)
        self.assertTrue(all(t.disconnecting for t in held))
        self.assertFalse(self.connect_raw(port).disconnecting)
        self.assertEqual(port.handshaking, 1)

    def test_stop_abandons_handshakes(self) -> None:
        """stopListening drops connections still in their handshake, and any that come after."""
        port = self.listening()
        held = [self.connect_raw(port) for _ in range(2)]
        self.successResultOf(port.stopListening())
        self.assertTrue(all(t.disconnecting for t in held))
        self.assertEqual(port.handshaking, 0)
        self.assertTrue(self.connect_raw(port).disconnecting)

    def test_first_start_fails(self) -> None:
        """If the advertisement fails, startListening fails and the port is closed."""
        port = self.listener()
        started = port.startListening()
        self.lan.adverts[0].ready.errback(LanDiscoveryError("no multicast here"))
        self.failureResultOf(started, LanDiscoveryError)
        self.assertTrue(self.lan.ports[0].stopped)
        self.assertFalse(port.connected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_start_times_out(self) -> None:
        """An advertisement that is never announced fails the start after timeout=, and closes everything."""
        port = self.listener()
        started = port.startListening()
        self.reactor.advance(9.99)
        self.assertNoResult(started)
        self.reactor.advance(0.01)
        failure = self.failureResultOf(started, ConnectionTimeoutError)
        self.assertIn("advertising on the LAN timed out after 10 s", str(failure.value))
        self.assertTrue(self.lan.adverts[0].stopped and self.lan.ports[0].stopped)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_keep_trying(self) -> None:
        """With keep_trying, a failed start is reported, and tried again after a backoff until it works."""
        port = self.listener()
        started = port.startListening(keep_trying=True)
        self.lan.adverts[0].ready.errback(LanDiscoveryError("no address yet"))
        self.failureResultOf(started, LanDiscoveryError)
        self.reactor.advance(0.7)
        self.assertEqual(len(self.lan.adverts), 1)
        self.reactor.advance(0.6)
        self.assertEqual(len(self.lan.adverts), 2)
        self.lan.adverts[1].ready.callback(None)
        self.assertTrue(port.connected)
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_stop_while_starting(self) -> None:
        """A stop before the advertisement is announced fails the start (cancelled) and closes everything."""
        port = self.listener()
        started = port.startListening()
        stopped = port.stopListening()
        self.failureResultOf(started, ConnectingCancelledError)
        self.successResultOf(stopped)
        self.assertTrue(self.lan.adverts[0].stopped and self.lan.ports[0].stopped)

    def test_stop_while_waiting(self) -> None:
        """A stop during the backoff cancels the next try."""
        port = self.listener()
        port.startListening(keep_trying=True).addErrback(lambda _: None)
        self.lan.adverts[0].ready.errback(LanDiscoveryError("no address yet"))
        self.successResultOf(port.stopListening())
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class AutoTests(LanTestCase):
    """auto: with the LAN path first and two relays (fakes) behind it."""

    def setUp(self) -> None:
        super().setUp()
        identity = self.config.identity
        self.azure = FakePath("relay:azure", identity)
        self.vercel = FakePath("relay:vercel", identity)
        self.cache = PathCache(network=lambda: "home")
        self.auto = AutoConfig(paths=(self.config, self.azure, self.vercel), delay=0.5, timeout=10.0, cache=self.cache)

    def connect(self) -> Deferred:
        return AutoClientEndpoint(self.reactor, self.auto).connect(Builds())

    def test_nobody_on_the_lan_costs_nothing(self) -> None:
        """
        The LAN search starts first and the primary relay in the same turn
        (the LAN path's head start is 0): the relays connect as fast as
        before there was a LAN path; the backup follows after delay= as
        before, and the relay's win ends the LAN search.
        """
        d = self.connect()
        self.assertEqual(len(self.lan.searches), 1)
        self.assertEqual(len(self.azure.attempts), 1)
        self.assertEqual(self.reactor.seconds(), 0)
        self.reactor.advance(0.49)
        self.assertEqual(len(self.vercel.attempts), 0)
        self.reactor.advance(0.01)
        self.assertEqual(len(self.vercel.attempts), 1)
        self.assertFalse(self.lan.searches[0].cancelled)
        self.azure.attempts[0].d.callback(FakeLink())
        self.successResultOf(d)
        self.assertTrue(self.lan.searches[0].cancelled)
        self.assertTrue(self.vercel.attempts[0].cancelled)

    def test_no_mdns_hands_over_at_once(self) -> None:
        """Where mDNS cannot run, the relays start at once, as if there were no LAN path."""
        self.lan.discover_error = LanDiscoveryError("could not start mDNS")
        d = self.connect()
        self.assertEqual(len(self.azure.attempts), 1)
        self.assertEqual(self.reactor.seconds(), 0)
        self.azure.attempts[0].d.callback(FakeLink())
        self.successResultOf(d)

    def test_lan_wins(self) -> None:
        """
        A peer on the LAN that answers before the primary relay wins: the
        relay attempt started beside it is cancelled, the backup never
        starts, and the LAN is remembered.
        """
        self.listening()
        d = self.connect()
        self.lan.searches[0].find("10.0.0.1")
        self.pump()
        protocol = self.successResultOf(d)
        self.assertEqual(protocol.transport.getPeer().transport, "direct:lan")
        self.assertTrue(self.azure.attempts[0].cancelled)
        self.reactor.advance(1)
        self.assertEqual((len(self.azure.attempts), len(self.vercel.attempts)), (1, 0))
        self.assertEqual(
            self.cache.order(["direct:lan", "relay:azure"], self.config.cache_key, self.reactor.seconds())[0],
            "direct:lan",
        )

    def test_late_lan_link_discarded(self) -> None:
        """A relay that wins while the LAN race runs cancels it; nothing is built on the listener."""
        served = Builds()
        self.listening(served)
        d = self.connect()
        self.reactor.advance(0.5)
        self.lan.searches[0].find("10.0.0.1")
        self.azure.attempts[0].d.callback(FakeLink())
        self.successResultOf(d)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(served.built, [])

    def test_remembered_relay_first(self) -> None:
        """Where a relay won last time on this network, it goes first and the LAN waits its head start."""
        self.cache.remember("relay:azure", self.config.cache_key, 0)
        self.connect()
        self.assertEqual((len(self.azure.attempts), len(self.lan.searches)), (1, 0))
        self.reactor.advance(0.5)
        self.assertEqual(len(self.lan.searches), 1)

    def test_listener_listens_on_the_lan(self) -> None:
        """
        An auto: listener listens and advertises on the LAN beside the
        relays, with one session table for all; it is up as soon as any path is.
        """
        port = AutoServerEndpoint(self.reactor, self.auto)
        d = port.listen(Builds())
        self.lan.adverts[0].ready.callback(None)
        listening = self.successResultOf(d)
        self.assertIsInstance(listening, AutoListeningPort)
        self.assertEqual(listening.transports, {"direct:lan": True, "relay:azure": False, "relay:vercel": False})
        direct = listening._ports["direct:lan"]
        self.assertIsInstance(direct, DirectListeningPort)
        self.assertIs(direct._core.sessions, self.azure.sessions)
        self.successResultOf(listening.stopListening())
        self.assertTrue(self.lan.adverts[0].stopped)


class NamespaceTests(TestCase):
    """
    Real processes on two hosts of one LAN (network namespaces on a bridge,
    tests/lanlab.py): a listener in one, a client in the other, no relay
    reachable anywhere.
    """

    timeout = 120

    def setUp(self) -> None:
        reason = lanlab.unavailable()
        if reason is not None:
            raise SkipTest(reason)
        self.keyfile = str(Path(self.mktemp()).resolve())
        SyncKey.generate().write(self.keyfile)
        self.size = int(os.environ.get("PLURESYNC_STREAM_TEST_MIB", "16")) << 20

    def env(self) -> dict:
        return {"DIRECTPEER_BYTES": str(self.size), "DIRECTPEER_LIMIT": "100"}

    def events(self, child) -> list[dict]:
        return [json.loads(line) for line in child.out.decode().splitlines() if line.startswith("{")]

    def event(self, child, name: str) -> dict:
        found = [e for e in self.events(child) if e["event"] == name]
        self.assertTrue(found, f"no {name!r} event: {child.out.decode()[-3000:]} {child.err.decode()[-3000:]}")
        return found[0]

    async def transfer(self, listen: str, connect: str) -> tuple[dict, dict]:
        """Run the listener in host a and the client in host b; both must end well."""
        lab = lanlab.LanLab(self)
        listener = lab.spawn("a", ["-m", "tests.directpeer", "listen", listen], b'"listening"', self.env())
        await listener.ready
        client = lab.spawn("b", ["-m", "tests.directpeer", "connect", connect], env=self.env())
        for child in (client, listener):
            code = await child.ended
            self.assertEqual(code, 0, child.out.decode()[-3000:] + child.err.decode()[-3000:])
        served, done = self.event(listener, "served"), self.event(client, "done")
        self.assertEqual((served["bytes"], done["bytes"]), (self.size, self.size))
        self.assertTrue(done["ok"], "the sha256 differs")
        self.assertTrue(served["clean"] and done["clean"])
        return self.event(client, "connected"), served

    async def test_direct_over_the_lan(self) -> None:
        """
        direct: listener and client on two hosts of a LAN with no relay
        anywhere: the client finds the listener by mDNS, connects over TCP,
        and 16 MiB arrive with their sha256 equal.
        """
        connected, served = await self.transfer(
            f"direct:keyfile={self.keyfile}", f"direct:keyfile={self.keyfile}:timeout=20"
        )
        self.assertEqual((connected["path"], served["path"]), ("direct:lan", "direct:lan"))
        self.assertLess(connected["seconds"], 5)

    async def test_auto_over_the_lan_with_dead_relays(self) -> None:
        """
        auto: with both relays at 127.0.0.1 ports where nothing listens: the
        listener is up on the LAN alone, and the client connects over it.
        """
        relays = "azure=ws\\://127.0.0.1\\:9:vercel=ws\\://127.0.0.1\\:19"
        connected, served = await self.transfer(
            f"auto:keyfile={self.keyfile}:{relays}", f"auto:keyfile={self.keyfile}:{relays}:timeout=20"
        )
        self.assertEqual((connected["path"], served["path"]), ("direct:lan", "direct:lan"))
        self.assertLess(connected["seconds"], 5)
