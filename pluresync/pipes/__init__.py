"""
What carries the encrypted bytes between the peers (an
L{pluresync.interfaces.IPipe}): a WebSocket to a relay (L{websocket}), a
plain TCP connection to a peer on the LAN (L{tcp}), or QUIC on a punched
UDP socket for the direct path (L{quic}, with its certificates in
L{quiccert} and the shared socket's owner in L{udp}); a new kind of pipe is
one more module here.
"""
