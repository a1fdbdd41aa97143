"""
The direct path: peers that can reach each other talk without a relay.

What finds the other peer and opens a way to it lives here (the public
address from STUN, UDP hole punching, LAN discovery); what then carries
the bytes is a pipe like any other (L{pluresync.pipes}), under the same
link and session as a relay's WebSocket.  Its third-party dependencies
(qh3, zeroconf) are the C{pluresync[direct]} extra.
"""
