"""
The two steps every path takes between "a pipe reaches the peer" and "the
user's protocol is connected", whatever carries the bytes.

A path (the relay endpoint today, C{direct:} later) opens a pipe its own way,
then calls L{secure_pipe} to run the end-to-end handshake over it and gets a
secured L{SecureChannel} that no protocol sees yet.  Keeping the two steps
apart lets C{auto:} race several paths to this point and L{attach} only the
winner, while the losers are C{discard}ed before any listener builds a
protocol for them.  Living here, beside the channel, they never pull a path's
own code into another path.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred

from pluresync.errors import PluresyncError
from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, Topic
from pluresync.secure.channel import SecureChannel
from pluresync.secure.handshake import Handshake


def secure_pipe(
    bind_pipe: Callable[[IPipeReceiver], IPipe],
    *,
    initiator: bool,
    name: str,
    identity: PeerIdentity,
    topic: Topic,
    expected_peer: bytes | None = None,
) -> Deferred[SecureChannel]:
    """
    Run the end-to-end handshake over a pipe.

    @param bind_pipe: called once with the channel: from then on the pipe
        delivers to it, and it returns the pipe (an L{IPipe}) to write to.
    @param initiator: the connecting side (the listener's side responds).
    @param name: the path's name, as the channel's addresses report it.
    @param expected_peer: (initiator) the only peer id to accept, from C{peer=}.
    @return: a Deferred firing with the secured, unattached channel, or
        failing with the handshake's or the pipe's error; cancelling it
        aborts the pipe.
    """
    handshake = Handshake(initiator, identity, topic, expected_peer=expected_peer)
    channel = SecureChannel(handshake, name, identity.peer_id)
    channel.startPipe(bind_pipe(channel))
    return channel.secured.addCallback(lambda _: channel)


def attach(channel: SecureChannel, factory):
    """
    Build the user's protocol for a secured channel and connect them.

    @return: the protocol.
    @raise PluresyncError: the factory refused (C{buildProtocol} returned
        C{None}); the channel is aborted, as Twisted's own ports do.
    """
    protocol = factory.buildProtocol(channel.getPeer())
    if protocol is None:
        channel.abortConnection()
        raise PluresyncError("the protocol factory refused the connection (buildProtocol returned None)")
    channel.attach(protocol)
    return protocol
