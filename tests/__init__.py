"""
pluresync's trial suite.

Every test talks to servers it starts itself on 127.0.0.1, so an ambient HTTP
proxy of the machine running the tests (http_proxy, HTTPS_PROXY, ...) must not
be used; tests of proxy support set their own.
"""

import os

for _name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
    os.environ.pop(_name, None)
    os.environ.pop(_name.upper(), None)
