"""
The Twisted front of the relay, C{twist pluresync-relay}: Autobahn served by
twisted.web, one L{websocket.RelayProtocol} per socket over the shared
session rules, coupled pairs, C{/health}, C{/metrics} and the service.
"""
