"""
What a LAN listener advertises over mDNS/DNS-SD, byte for byte, and how a
seeker recognises it (docs/protocol.md, "LAN discovery").

Everyone on the LAN sees the advertisement, so it must tell a LAN observer
neither the topic nor which advertisements come from the same peer or
group.  It carries only a fresh random salt and keyed hashes of it, under a
key derived from the topic: a peer that holds the topic recognises the
advertisement, anyone else sees random bytes, and two advertisements (even
of one listener, restarted) share nothing.  A second tag binds the port and
the addresses to connect to, so an observer that copies the advertisement
cannot point seekers at itself without also taking over the advertiser's
addresses.

Pure: no Twisted, no zeroconf; L{pluresync.direct.lan} puts these values
into DNS-SD records and takes them out again.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pluresync.keys import Topic

#: The DNS-SD service type every pluresync LAN listener registers.
SERVICE_TYPE = "_pluresync._tcp.local."
#: The advertisement format's version (the TXT key C{v}).
VERSION = b"1"
LAN_KEY_LENGTH = 32
SALT_LENGTH = 16
NAME_TAG_LENGTH = 8
ADDRESS_TAG_LENGTH = 16
#: Addresses one advertisement may carry (more are not advertised, and an
#: advertisement with more is ignored: it keeps the TXT record small).
MAX_ADDRESSES = 8
#: Length of an instance name label: hex of the salt and of the name tag.
LABEL_LENGTH = 2 * (SALT_LENGTH + NAME_TAG_LENGTH)

_PERSON_LAN = b"pluresync-lan"
_PERSON_NAME = b"pluresync-lan-n"
_PERSON_ADDRESSES = b"pluresync-lan-a"
_HEX = frozenset("0123456789abcdef")


def lan_key(topic: Topic) -> bytes:
    """
    The key LAN advertisements are tagged with: a one-way hash of the
    topic, with its own personalisation, so it reveals nothing about the
    topic, the psk or the rendezvous id.
    """
    return hashlib.blake2b(topic.secret, digest_size=LAN_KEY_LENGTH, person=_PERSON_LAN).digest()


def check_key(key: bytes) -> None:
    """Refuse anything but a LAN key's 32 bytes (a ValueError that never quotes it)."""
    if not isinstance(key, bytes) or len(key) != LAN_KEY_LENGTH:
        raise ValueError(f"a LAN key is {LAN_KEY_LENGTH} bytes (from pluresync.direct.lanadvert.lan_key)")


def _name_tag(key: bytes, salt: bytes) -> bytes:
    return hashlib.blake2b(salt, digest_size=NAME_TAG_LENGTH, key=key, person=_PERSON_NAME).digest()


def _address_tag(key: bytes, salt: bytes, port: int, addresses: bytes) -> bytes:
    data = salt + port.to_bytes(2, "big") + addresses
    return hashlib.blake2b(data, digest_size=ADDRESS_TAG_LENGTH, key=key, person=_PERSON_ADDRESSES).digest()


def usable_address(text: str) -> bool:
    """
    Whether an IPv4 address may be advertised or connected to: a unicast
    address of some network, not loopback, multicast, broadcast or unspecified.
    """
    try:
        address = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return not (address.is_loopback or address.is_multicast or address.is_unspecified or address.is_reserved)


@dataclass(frozen=True)
class Advert:
    """
    One advertisement, as DNS-SD carries it.

    @ivar label: the service instance name's label (48 lowercase hex digits).
    @ivar port: the TCP port (the SRV record's).
    @ivar addresses: the IPv4 addresses to connect to, as advertised.
    @ivar properties: the TXT record's keys and values, in order.
    """

    label: str
    port: int
    addresses: tuple[str, ...]
    properties: dict[bytes, bytes]

    @property
    def instance_name(self) -> str:
        return f"{self.label}.{SERVICE_TYPE}"

    @property
    def host_name(self) -> str:
        """The SRV target and A records' owner: as random as the label, never the machine's name."""
        return f"{self.label}.local."


def make_advert(key: bytes, port: int, addresses: Sequence[str], salt: bytes | None = None) -> Advert:
    """
    A fresh advertisement of C{port} on C{addresses} (IPv4, dotted quads),
    tagged with C{key} (L{lan_key}).

    @param salt: for tests only; a fresh random one by default.
    """
    check_key(key)
    if not 0 < port < 65536:
        raise ValueError(f"cannot advertise port {port}")
    addresses = tuple(dict.fromkeys(str(ipaddress.IPv4Address(a)) for a in addresses))
    bad = [a for a in addresses if not usable_address(a)]
    if bad:
        raise ValueError(f"cannot advertise {', '.join(bad)}: not a unicast LAN address")
    if not addresses:
        raise ValueError("no address to advertise: the host has no usable IPv4 address")
    addresses = addresses[:MAX_ADDRESSES]
    salt = os.urandom(SALT_LENGTH) if salt is None else salt
    if len(salt) != SALT_LENGTH:
        raise ValueError(f"a salt is {SALT_LENGTH} bytes")
    listed = ",".join(addresses).encode("ascii")
    properties = {
        b"v": VERSION,
        b"a": listed,
        b"t": _address_tag(key, salt, port, listed).hex().encode("ascii"),
    }
    return Advert((salt + _name_tag(key, salt)).hex(), port, addresses, properties)


def _salt(label: str) -> bytes | None:
    if len(label) != LABEL_LENGTH or not _HEX.issuperset(label):
        return None
    return bytes.fromhex(label[: 2 * SALT_LENGTH])


def recognise(key: bytes, label: str) -> bool:
    """
    Whether the instance name label C{label} was made with C{key}: decided
    from the name alone, so strangers' advertisements are never resolved.
    """
    check_key(key)
    label = label.lower()
    salt = _salt(label)
    if salt is None:
        return False
    return hmac.compare_digest(bytes.fromhex(label[2 * SALT_LENGTH :]), _name_tag(key, salt))


def verify(key: bytes, label: str, port: int, properties: Mapping[bytes, bytes | None]) -> tuple[str, ...] | None:
    """
    The addresses a resolved advertisement offers, if it was made with
    C{key} for exactly this port and these addresses; C{None} otherwise (a
    stranger's, a copy pointing elsewhere, another version, malformed).
    """
    if not recognise(key, label):
        return None
    salt = _salt(label.lower())
    listed, tag = properties.get(b"a"), properties.get(b"t")
    if properties.get(b"v") != VERSION or not listed or not tag or not 0 < port < 65536:
        return None
    if len(tag) != 2 * ADDRESS_TAG_LENGTH or len(listed) > MAX_ADDRESSES * 16:
        return None
    try:
        expected = bytes.fromhex(tag.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not hmac.compare_digest(expected, _address_tag(key, salt, port, listed)):
        return None
    try:
        addresses = tuple(listed.decode("ascii").split(","))
    except UnicodeDecodeError:
        return None
    if len(addresses) > MAX_ADDRESSES or not all(usable_address(a) for a in addresses):
        return None
    return addresses
