"""
Relay instances behaving as one through Redis: the cluster protocol both
fronts share (L{protocol}), and the Twisted side of it (L{service}, with
L{link} carrying a session's bytes between two instances).
"""
