"""
The message API: an echo listener and a client, through a relay.

    python api_echo.py            # both peers in this one process
    python api_echo.py listen     # only the listener (e.g. on one machine)
    python api_echo.py connect    # only the client (e.g. on another)

RELAY_URL is the relay (default ws://127.0.0.1:8080, a local `twist pluresync-relay`);
KEYFILE is the sync key both peers share (default demo.key, from `pluresync keygen --out demo.key`).
"""
import os, sys
from twisted.internet import task
from twisted.internet.defer import Deferred
from pluresync import SyncKey, create_transport

RELAY_URL = os.environ.get("RELAY_URL", "ws://127.0.0.1:8080")
KEYFILE = os.environ.get("KEYFILE", "demo.key")

def transport(reactor):
    key = SyncKey.from_file(KEYFILE)
    return create_transport("azure-relay", azure_relay_url=RELAY_URL, sync_key=key, reactor=reactor)

async def echo(conn):  # the listener runs this for every peer that connects
    async for message in conn.receive():  # ends when the peer closes cleanly
        await conn.send(message.upper())

async def main(reactor, role):
    if role in ("listen", "both"):
        listener = transport(reactor)
        await listener.listen(echo)
        print("listening", flush=True)
        if role == "listen":
            await Deferred()  # until Ctrl-C
    client = transport(reactor)
    conn = await client.connect()
    print(f"connected to peer {conn.peer_id[:16]}... via {conn.transport_name}", flush=True)
    for text in (b"hello", b"each send is one message", b"bye"):
        await conn.send(text)  # waits only if the network pushes back
    async for reply in conn.receive():
        print(reply.decode(), flush=True)
        if reply == b"BYE":
            break
    await conn.close()  # an authenticated close; the listener's receive() ends
    await client.close()
    if role == "both":
        await listener.close()

task.react(lambda reactor: Deferred.fromCoroutine(main(reactor, (sys.argv[1:] or ["both"])[0])))
