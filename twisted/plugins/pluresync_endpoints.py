"""
pluresync's endpoint-string parsers (C{relay:}, C{direct:}, C{auto:}), found by Twisted's plugin scan.

Every C{clientFromString}/C{serverFromString} process that looks for a
plugin prefix imports this module, and Twisted swallows an import error here
(the user later sees "Unknown endpoint type"). So it only instantiates the
parsers, whose module imports nothing heavy; tests/test_imports.py holds it to that.
"""

from pluresync.endpoints.parsers import (
    AutoClientParser,
    AutoServerParser,
    DirectClientParser,
    DirectServerParser,
    RelayClientParser,
    RelayServerParser,
)

relayClientParser = RelayClientParser()
relayServerParser = RelayServerParser()
directClientParser = DirectClientParser()
directServerParser = DirectServerParser()
autoClientParser = AutoClientParser()
autoServerParser = AutoServerParser()
