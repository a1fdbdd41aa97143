"""
The step every path takes between "a pipe reaches the peer" and "a link
may carry a session", whatever carries the bytes.

A path (the relay endpoint today, C{direct:} later) opens a pipe its own way,
then calls L{secure_link} to run the end-to-end handshake over it and gets a
secured L{Link} that no session uses yet.  Keeping the steps apart lets
C{auto:} race several paths to this point and use only the winner, while
the losers are C{discard}ed before any listener builds a protocol for them;
and it lets a session get its later links (a resume, a move) through the
very same step.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.defer import Deferred

from pluresync.interfaces import IPipe, IPipeReceiver
from pluresync.keys import PeerIdentity, Topic
from pluresync.secure.handshake import Handshake
from pluresync.secure.link import Link, Resolver


def secure_link(
    bind_pipe: Callable[[IPipeReceiver], IPipe],
    *,
    initiator: bool,
    name: str,
    identity: PeerIdentity,
    topic: Topic,
    expected_peer: bytes | None = None,
    hello: Callable | None = None,
    resolver: Resolver | None = None,
) -> Deferred[Link]:
    """
    Run the end-to-end handshake over a pipe.

    @param bind_pipe: called once with the link: from then on the pipe
        delivers to it, and it returns the pipe (an L{IPipe}) to write to.
    @param initiator: the connecting side (the listener's side responds).
    @param name: the path's name, as the session reports it.
    @param expected_peer: (initiator) the only peer id to accept, from C{peer=}.
    @param hello: (initiator) makes the session hello when frame 3 is written.
    @param resolver: (responder) answers the initiator's hello.
    @return: a Deferred firing with the secured link (the initiator's not yet
        chosen, the responder's chosen), or failing with the handshake's or
        the pipe's error; cancelling it aborts the pipe.
    """
    link_box: list[Link] = []
    handshake = Handshake(
        initiator,
        identity,
        topic,
        expected_peer=expected_peer,
        payload=(lambda: link_box[0].hello_payload()) if initiator else None,
    )
    link = Link(handshake, name, hello=hello, resolver=resolver)
    link_box.append(link)
    link.startPipe(bind_pipe(link))
    return link.secured
