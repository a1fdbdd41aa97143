"""
What carries the encrypted bytes between the peers (an
L{pluresync.interfaces.IPipe}): a WebSocket to a relay today (L{websocket});
a new kind of pipe is one more module here.
"""
