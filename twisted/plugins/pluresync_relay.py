"""
The C{twist pluresync-relay} plugin.

It names the service module as a string, so C{twist --help} and every other
plugin scan import none of the relay (Autobahn, the reactor's TCP and TLS).
"""

from twisted.application.service import ServiceMaker

pluresyncRelay = ServiceMaker(
    "pluresync relay",
    "pluresync.relay.server.service",
    "A pluresync relay: pairs peers by rendezvous id and pipes their encrypted bytes.",
    "pluresync-relay",
)
