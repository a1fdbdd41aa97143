from pluresync.endpoints.parsers import AutoClientParser, AutoServerParser, RelayClientParser, RelayServerParser

relayClientParser = RelayClientParser()
relayServerParser = RelayServerParser()
autoClientParser = AutoClientParser()
autoServerParser = AutoServerParser()
