"""
C{pluresync keygen} and C{pluresync peer-id}: the two secrets-and-names
commands. Neither touches the network, so both run without a reactor.
"""

from __future__ import annotations

from pluresync.cli.base import BaseOptions
from pluresync.cli.home import machine_identity
from pluresync.keys import SyncKey


class KeygenOptions(BaseOptions):
    synopsis = "[--out PATH]"
    longdesc = (
        "Make a new random sync key. With --out, write it to a new file readable "
        "only by you (mode 0600; an existing file is never overwritten) and print "
        "its fingerprint; without, print the key itself."
    )
    optParameters = [["out", "o", None, "Write the key to this new file."]]

    def run(self) -> int:
        key = SyncKey.generate()
        if self["out"]:
            key.write(self["out"])
            print(f"wrote a new sync key to {self['out']} (fingerprint {key.fingerprint()})")
        else:
            print(key.to_text())
        return 0


class PeerIdOptions(BaseOptions):
    synopsis = ""
    longdesc = (
        "Print this machine's peer id (64 hex digits), the public half of its "
        "identity file $PLURESYNC_HOME/identity (default ~/.pluresync/identity, "
        "created on first use, mode 0600). Every relay:/auto: endpoint given to "
        "pluresync uses that identity unless it has identity= itself, so other "
        "peers can pass this id as peer= to reach this machine. The id is public; "
        "the file is not."
    )

    def run(self) -> int:
        print(machine_identity().peer_id)
        return 0
