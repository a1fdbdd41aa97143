"""
The pluresync backup relay as a Vercel Python Function (ASGI).

Vercel's Python runtime serves the ASGI application named ``app``.  The
relay itself is ``pluresync.relay.asgi`` (installed from this repository by
``requirements.txt``): relay protocol v1, the same pairing core as the
Twisted relay (``pluresync/relay/core/pairing.py``), and pairing and piping
across function instances through Redis, since Vercel pins each WebSocket to
one instance and instances cannot reach each other.  See README.md beside
this directory for the settings (``PLURESYNC_REDIS_URL``, ``PLURESYNC_AUTH``
...) and the limits (connections end at the function's maximum duration).

Run it locally exactly as the tests do::

    PLURESYNC_REDIS_URL=redis://127.0.0.1:6379/0 PLURESYNC_AUTH=open \\
        uvicorn --app-dir deploy/vercel/api relay:app --host 127.0.0.1 --port 8080
"""

from pluresync.relay.asgi import create_app

app = create_app()
