from twisted.application.service import ServiceMaker

pluresyncRelay = ServiceMaker(
    "pluresync relay",
    "pluresync.relay.server.service",
    "A pluresync relay: pairs peers by rendezvous id and pipes their encrypted bytes.",
    "pluresync-relay",
)
