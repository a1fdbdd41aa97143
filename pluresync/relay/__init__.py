"""
The pluresync relay: pairs peers by rendezvous id and pipes their bytes.

The parts, one idea each:

  - L{wire}: the control messages of relay protocol v1 (pure);
  - L{pairing}: the rendezvous registry and session pairing (pure);
  - L{limits}: the relay's limits and their defaults;
  - L{auth}: who may connect: open, a tokens file, signed tokens (pure);
    L{authconfig} (the C{--auth} options), L{tokencli} (C{pluresync relay-token});
  - L{websocket}: the Autobahn adapter (control phase, piping, flow control);
  - L{health}, L{site}: the HTTP side (C{/health} and the WebSocket at C{/});
  - L{service}: the C{twist pluresync-relay} options and service.

The wire format is specified in C{docs/protocol.md}.
"""
