"""
The end-to-end layer every path shares: the Noise handshake over a pipe
(L{establish}) and the link it secures (L{link}: one pipe's sealing).
It knows no path (no endpoint, pipe or relay module) and no session: a
link carries whatever session L{pluresync.session} puts on it.
"""
