"""
The contracts between pluresync's parts, and the ones users program against.

Endpoint users see only Twisted's own interfaces (IStreamClientEndpoint,
ITransport, ...); L{ISyncTransport} and L{ISyncConnection} are for the
message-oriented API in L{pluresync.api}.  The rest are the seams inside,
one per boundary a new kind of path (C{direct:}) or pipe plugs into:

  - L{IPath}: one way to reach peers, as C{auto:} races and listens on it;
    its C{client()} is an L{IPathClient}, its C{listener()} an L{IPathListener};
  - L{IPipe}: what carries the end-to-end layer's bytes (a relay WebSocket
    today), and L{IPipeReceiver}: the end-to-end layer as the pipe sees it;
  - L{IPairEnd}: one side of a pair inside the relay;
  - L{IDatagramHandler}: one protocol among several on a shared UDP socket
    (the direct path's STUN, probes and QUIC);
  - L{IDatagramSocket} and L{IDatagramReceiver}: a UDP socket shared by the
    direct path's users (STUN, hole-punch probes, a QUIC pipe), as its
    owner and they see each other.
"""

from twisted.internet.interfaces import IListeningPort, IPushProducer
from zope.interface import Attribute, Interface


class ISyncConnection(Interface):
    """
    One end-to-end encrypted connection to one peer, carrying whole messages.

    Message boundaries are preserved: each C{send(data)} arrives as exactly one
    item of C{receive()}.
    """

    peer_id = Attribute("The peer's id (hex of its static public key), proven by the handshake.")
    transport_name = Attribute("Which transport carries it, e.g. 'relay:azure'.")

    def send(data):
        """
        Send one message.

        @return: a Deferred that fires when the message has been handed to the
            network and the connection is ready for more (it waits while the
            peer or the relay applies backpressure), or fails if the
            connection is lost first.
        """

    def receive():
        """
        @return: an async iterator of received messages (C{bytes}); it ends
            after the peer's clean close and raises if the stream was cut.
        """

    def close():
        """
        Close cleanly (an authenticated close record), after sending what was
        queued.

        @return: a Deferred that fires when the connection is closed.
        """


class ISyncTransport(Interface):
    """A way of reaching peers that share the sync key (the seed's SyncTransport)."""

    name = Attribute("The transport's name, e.g. 'azure-relay'.")

    def connect(peer=None):
        """
        Connect to a listening peer (to one with this peer id, if given).

        @return: a Deferred firing with an L{ISyncConnection}.
        """

    def listen(on_connection):
        """
        Accept connections from peers; C{on_connection(conn)} is called with
        each L{ISyncConnection} (it may return a Deferred or coroutine; errors
        are logged, not raised).

        @return: a Deferred firing when the listener is registered.
        """

    def close():
        """
        Stop listening and close every connection of this transport.

        @return: a Deferred firing when all are closed.
        """


class IPipe(Interface):
    """
    What the end-to-end layer needs from whatever carries its bytes (a
    relay's WebSocket today, a direct TCP or QUIC stream later).

    Keeping the carrier behind this narrow interface is what lets a new kind
    of pipe serve the same end-to-end layer unchanged.  A pipe carries one
    link (L{pluresync.secure.link.Link}); the session above moves to another
    link when it ends.  A pipe delivers to its L{IPipeReceiver}.  A pipe
    whose carrier announces when it will end (a relay's session cap) says so
    in an optional C{expires_at} attribute (reactor seconds, or C{None}).
    """

    def write(data):
        """Send bytes, in order; buffered by the carrier's transport."""

    def pauseReading():
        """Stop delivering received bytes (backpressure towards the peer)."""

    def resumeReading():
        """Deliver received bytes again."""

    def registerProducer(producer, streaming):
        """Throttle C{producer} by the carrier's outgoing buffer."""

    def unregisterProducer():
        """Undo L{registerProducer}."""

    def close():
        """End the carrier in an orderly way after what was written is sent."""

    def abort():
        """Drop the carrier at once."""


class IPipeReceiver(Interface):
    """
    The end-to-end layer as a pipe sees it: where the pipe delivers what it
    receives, and how it ends.
    """

    def pipeDataReceived(data):
        """
        Bytes from the peer, in order.  Pipe boundaries mean nothing: the
        receiver does its own framing.
        """

    def pipeLost(reason):
        """
        The pipe ended; called once, and nothing is delivered after it.
        C{reason} is a Failure of C{ConnectionDone} for an orderly end of the
        carrier and of a L{pluresync.errors.PluresyncError} otherwise (e.g.
        L{pluresync.errors.PeerGoneError}, L{pluresync.errors.RelayLostError}).
        """


class IPathClient(Interface):
    """
    One attempt to reach the peer over one path, up to a secured channel
    and no further, so that C{auto:} can race several and keep one.
    """

    name = Attribute("The path's name, e.g. 'relay:azure'.")

    def secure(hello=None):
        """
        Reach the peer and complete the end-to-end handshake, building no
        protocol.

        @param hello: makes the session hello written in the handshake's
            frame 3 (L{pluresync.session.wire.Hello}): a resume of an
            existing session; a new session's if C{None}.
        @return: a Deferred firing with a secured, unused
            L{pluresync.secure.link.Link}, for the caller to use (a session
            takes it: L{pluresync.session.attach}) or C{discard};
            cancelling it abandons the attempt (C{ConnectingCancelledError}),
            and it fails with C{ConnectionTimeoutError} after the path's
            own timeout.
        """


class IPathListener(IListeningPort):
    """
    A listener on one path, not yet started, that C{auto:} keeps alive on
    its own beside the listeners of the other paths.
    """

    connected = Attribute("Whether the listener is registered (reachable) right now.")

    def startListening(keep_trying=False):
        """
        Start listening.

        @param keep_trying: if the first attempt fails, still fail the
            returned Deferred, but go on trying in the background (with
            backoff) until L{stopListening}.
        @return: a Deferred firing with this listener once it is reachable.
        """


class IPath(Interface):
    """
    One way to reach peers (a relay today; C{direct:} later), as C{auto:}
    uses it. Adding a transport to C{auto:} is providing this.
    """

    name = Attribute("The path's name, e.g. 'relay:azure'.")
    # Optional: head_start, seconds before auto: starts the next path (less
    # than its delay= only); without it, delay= applies.
    identity = Attribute("Our PeerIdentity on this path.")
    session = Attribute("The SessionParams of the sessions it carries.")
    cache_key = Attribute("What identifies the peer we reach, before connecting (for the path cache).")

    def client(reactor):
        """
        @return: an L{IPathClient} for one connection attempt.
        """

    def listener(reactor, factory, sessions=None):
        """
        @param sessions: the L{pluresync.session.attach.SessionTable} its
            links join (shared by the paths of one C{auto:} listener, so a
            session can resume over any of them); its own if C{None}.
        @return: an L{IPathListener}, not yet started, that builds the
            user's protocols with C{factory}.
        """


class IPairEnd(IPushProducer):
    """
    One side of a relay pair, as the other side sees it: a client's socket on
    this relay, or a cluster link standing for a socket on another instance.

    The relay couples the two ends of a pair symmetrically:
    C{a.registerProducer(b, True)} and C{b.registerProducer(a, True)}, so when
    one end's outgoing buffer fills up, the other end stops reading its
    client and TCP pushes back on that writer.  As an C{IPushProducer},
    C{pauseProducing}/C{resumeProducing} stop and restart reading this end's
    client; C{stopProducing} does nothing (a pair ends through L{end}, with a
    close code, never by a dropped connection).
    """

    received = Attribute("Bytes of data frames this end has read from its client (for the pair's log line).")

    def writeData(payload, opcode, fin):
        """
        A data frame from the other end, for this end's client, unchanged:
        C{opcode} is binary (2) or continuation (0), C{fin} ends the message.
        """

    def registerProducer(producer, streaming):
        """Pause C{producer} (the other end) while this end's outgoing buffer is full."""

    def unregisterProducer():
        """Undo L{registerProducer}."""

    def end(code, reason):
        """
        The other end is gone: close this end with WebSocket close code C{code}
        (1000 when the other end closed normally, 4010 C{peer-gone}, 1001
        going away, 4029 rate-limited).  Idempotent; no more L{writeData}.
        """


class IDatagramHandler(Interface):
    """
    One protocol among several that share a UDP socket (the direct path's
    socket carries STUN, its punch probes and QUIC).

    The socket's C{DatagramProtocol} owns the handlers and offers each
    datagram to them in turn; a handler writes through a callable the owner
    gives it, never through a transport of its own.  Which datagram is
    whose is decided by its first byte (see L{pluresync.direct.stun}).
    """

    def datagramReceived(datagram, addr):
        """
        Offer C{datagram} from C{addr} (C{(host, port)}).

        @return: C{True} if it belongs to this handler's protocol (handled,
            or dropped as malformed or unexpected), C{False} to offer it to
            the next handler.  Never raises.
        """


class IDatagramReceiver(Interface):
    """
    A user of a shared UDP socket (a QUIC pipe, the punching code), fed by
    the socket's owner with the datagrams that are its own.
    """

    def datagramReceived(data, address):
        """
        One datagram, as read: C{address} is the sender's C{(host, port)}.
        The receiver checks the sender itself (a stranger may send anything).
        """


class IDatagramSocket(Interface):
    """
    One UDP socket as the users that share it see it.

    The direct path punches a NAT mapping with probes and then runs QUIC on
    the very same socket (the mapping belongs to that local port), so one
    owner reads the socket and hands each datagram to the user it belongs
    to, telling them apart by the first byte (RFC 9443): QUIC packets have
    the fixed bit C{0x40} set, STUN messages start with C{0x00}-C{0x03}.
    """

    def sendDatagrams(datagrams):
        """
        Send each C{(data, (host, port))} of the sequence now, in order, best
        effort: a datagram the kernel refuses (a full buffer, an ICMP error
        reported on the socket) is dropped, as the network may drop it;
        QUIC's loss recovery resends.
        """

    def attach(receiver):
        """
        Hand every QUIC datagram (first byte with C{0x40} set) read from now
        on to C{receiver} (an L{IDatagramReceiver}), until L{detach}.
        """

    def detach(receiver):
        """Stop handing datagrams to C{receiver} (idempotent)."""
