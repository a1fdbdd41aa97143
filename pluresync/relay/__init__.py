"""
The pluresync relay: pairs peers by rendezvous id and pipes their bytes.

Its parts, one folder each:

  - L{core}: pure rules, no Twisted, Autobahn or asyncio: the relay
    protocol v1 messages (L{core.wire}, which clients import too), the
    rendezvous registry (L{core.pairing}), limits, rate limits and auth;
  - L{server}: the Twisted front (C{twist pluresync-relay}): the Autobahn
    adapter, the HTTP site, C{/health}, C{/metrics}, the service;
  - L{cluster}: several Twisted relay instances behaving as one through
    Redis, and the links that carry a session between two of them;
  - L{asgi}: the Vercel front, an ASGI application clustered through Redis.

The wire format is specified in C{docs/protocol.md}.  Importing this package
imports nothing else.
"""
