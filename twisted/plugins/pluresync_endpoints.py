from pluresync.endpoints.parsers import RelayClientParser, RelayServerParser

relayClientParser = RelayClientParser()
relayServerParser = RelayServerParser()
