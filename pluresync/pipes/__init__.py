"""
What carries the encrypted bytes between the peers (an
L{pluresync.interfaces.IPipe}): a WebSocket to a relay (L{websocket}), a
plain TCP connection to a peer on the LAN (L{tcp}); a new kind of pipe is
one more module here.
"""
