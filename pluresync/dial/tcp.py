"""
TCP to a relay or a proxy.

Twisted's C{HostnameEndpoint} notices that its last address was refused only
at its next 0.3 s attempt tick; for an address given as an IP literal there
is nothing to race, so a refused relay fails at once, which is what lets
C{auto:} hand a dead path's turn to the next immediately.
"""

from __future__ import annotations

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint


def tcp_endpoint(reactor, host: str, port: int, timeout: float = 30) -> IStreamClientEndpoint:
    """A client endpoint for C{host}: direct for IP literals, happy eyeballs for names."""
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)
