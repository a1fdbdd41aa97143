"""
The relay's rules, as pure Python: what every relay front runs, and the part
of relay protocol v1 a client needs too (L{wire}).  Nothing here imports
Twisted, Autobahn or asyncio (tests/test_architecture.py checks it), so the
Twisted relay and the Vercel function cannot drift apart.
"""
