"""
The end-to-end layer every path shares: the Noise handshake over a pipe
(L{establish}), and the encrypted channel the user's protocol gets
(L{channel}).  It knows no path: no endpoint, pipe or relay module.
"""
