"""
How a relay is reached: TCP (L{tcp}), an HTTP CONNECT proxy (L{proxy}), and
TLS failures explained in one line (L{tlserrors}).  Any pipe that dials a
relay (the WebSocket today, HTTP requests later) uses these.
"""
