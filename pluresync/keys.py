"""
Every secret and name derived from a sync key, in one place.

A sync key is the group secret: 32 random bytes. From it (and an optional
topic name) come, each with its own BLAKE2b personalisation so no two can be
confused::

    topic      = BLAKE2b-256(key=sync key, data=topic name, person="pluresync-topic")
    rendezvous = BLAKE2b-256(data=topic,                     person="pluresync-rdv")
    psk        = BLAKE2b-256(data=topic,                     person="pluresync-psk")

The relay sees only the rendezvous id, a one-way hash of the topic, so it
learns neither the key nor the topic. A peer's identity is its own static
X25519 key pair, independent of the sync key.

Text forms are made for copying by hand: a prefix that says what the thing is,
then lowercase base32 without padding, with a two-byte checksum so a
mistyped key is caught before it is used.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from nacl import pwhash
from nacl.bindings import crypto_scalarmult_base
from nacl.utils import random as _random

from pluresync.errors import KeyFileError

KEY_LENGTH = 32
KEY_PREFIX = "psk1-"
IDENTITY_PREFIX = "psid1-"
KEY_ENVIRONMENT_VARIABLE = "PLURESYNC_KEY"

_PERSON_TOPIC = b"pluresync-topic"
_PERSON_RDV = b"pluresync-rdv"
_PERSON_PSK = b"pluresync-psk"
_PERSON_CHECK = b"pluresync-check"
_PERSON_SALT = b"pluresync-salt"


def _create_private_file(path: Path, text: str) -> bool:
    """
    Create C{path} holding C{text}, readable by its owner only, in one atomic
    step: the content is written to a private temporary file beside it and
    hard-linked into place, so no other process (or a racing one creating the
    same file) ever sees it empty or half-written.

    @return: C{False} if C{path} exists already (it is left alone).
    """
    fd, temporary = tempfile.mkstemp(prefix=".pluresync-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.link(temporary, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)
    return True


def _blake2b(data: bytes, person: bytes, key: bytes = b"", size: int = 32) -> bytes:
    return hashlib.blake2b(data, digest_size=size, key=key, person=person).digest()


def _checksum(prefix: str, raw: bytes) -> bytes:
    # Keyed by the prefix, so a key pasted where an identity belongs fails.
    return _blake2b(raw, _PERSON_CHECK, key=prefix.encode("ascii"), size=2)


def _encode(prefix: str, raw: bytes) -> str:
    check = _checksum(prefix, raw)
    text = base64.b32encode(raw + check).decode("ascii").rstrip("=").lower()
    return prefix + text


def _decode(prefix: str, text: str, what: str) -> bytes:
    cleaned = "".join(text.split())
    if not cleaned.lower().startswith(prefix):
        raise KeyFileError(f"this is not a {what}: it should start with {prefix!r}")
    body = cleaned[len(prefix) :].replace("-", "").upper()
    try:
        decoded = base64.b32decode(body + "=" * (-len(body) % 8))
    except ValueError:
        raise KeyFileError(f"this {what} is malformed (not base32)") from None
    raw, check = decoded[:-2], decoded[-2:]
    if len(raw) != KEY_LENGTH or _checksum(prefix, raw) != check:
        raise KeyFileError(f"this {what} is malformed or mistyped (checksum mismatch)")
    return raw


@dataclass(frozen=True)
class SyncKey:
    """
    The group secret that every peer of one sync group holds.

    Its C{repr} never shows the key, so it can sit in tracebacks and logs.
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) != KEY_LENGTH:
            raise KeyFileError(f"a sync key is exactly {KEY_LENGTH} bytes")

    @classmethod
    def generate(cls) -> SyncKey:
        return cls(_random(KEY_LENGTH))

    @classmethod
    def from_text(cls, text: str) -> SyncKey:
        return cls(_decode(KEY_PREFIX, text, "pluresync sync key"))

    @classmethod
    def from_passphrase(
        cls,
        passphrase: str,
        *,
        opslimit: int = pwhash.argon2id.OPSLIMIT_MODERATE,
        memlimit: int = pwhash.argon2id.MEMLIMIT_MODERATE,
    ) -> SyncKey:
        """
        Stretch a passphrase with Argon2id, so that someone who sees the
        rendezvous id (a relay operator) cannot test guesses cheaply.

        The salt is fixed (every peer must derive the same key from the same
        passphrase); the work factor is what protects a weak passphrase, and
        a random key from L{generate} is always the stronger choice.
        """
        if not passphrase:
            raise KeyFileError("the passphrase is empty")
        salt = _blake2b(b"", _PERSON_SALT, size=pwhash.argon2id.SALTBYTES)
        return cls(
            pwhash.argon2id.kdf(KEY_LENGTH, passphrase.encode("utf-8"), salt, opslimit=opslimit, memlimit=memlimit)
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SyncKey:
        """Read a key file written by L{write} (or by C{pluresync keygen})."""
        path = Path(path).expanduser()
        try:
            text = path.read_text("ascii")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not a text file"
            raise KeyFileError(f"cannot read the sync key file {str(path)!r}: {reason}") from None
        return cls.from_text(text)

    def to_text(self) -> str:
        return _encode(KEY_PREFIX, self.secret)

    def write(self, path: str | os.PathLike[str]) -> None:
        """
        Write the key's text form to a new file readable by its owner only.

        The file is created with mode 0600 in one step, so there is no moment
        when another user could read it; an existing file is never overwritten.
        """
        path = Path(path).expanduser()
        if not _create_private_file(path, self.to_text() + "\n"):
            raise KeyFileError(f"{str(path)!r} exists already; not overwriting a key")

    def fingerprint(self) -> str:
        """A short, safe-to-log tag telling keys apart (never enough to guess one)."""
        return _blake2b(self.secret, _PERSON_CHECK, size=4).hex()

    def topic(self, name: str = "") -> Topic:
        return Topic(_blake2b(name.encode("utf-8"), _PERSON_TOPIC, key=self.secret))


@dataclass(frozen=True)
class Topic:
    """A sync group's topic: what peers meet on. Secret, like the key."""

    secret: bytes = field(repr=False)

    @property
    def rendezvous_id(self) -> bytes:
        """What the relay sees and pairs peers by: a one-way hash of the topic."""
        return _blake2b(self.secret, _PERSON_RDV)

    @property
    def psk(self) -> bytes:
        """The Noise pre-shared key: only holders of the topic complete a handshake."""
        return _blake2b(self.secret, _PERSON_PSK)


@dataclass(frozen=True)
class PeerIdentity:
    """
    A peer's static X25519 key pair; its public half is the peer id.

    Persist it (L{from_file}) when other peers must address this one with
    C{peer=}; otherwise a fresh identity per process is fine.
    """

    private: bytes = field(repr=False)
    public: bytes = field(init=False)
    #: made for this process alone (L{generate}), not kept in a file: no
    #: peer can know it beforehand, so connects that share a session
    #: (L{pluresync.session.pool}) may share it too
    ephemeral: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.private, bytes) or len(self.private) != KEY_LENGTH:
            raise KeyFileError(f"an identity key is exactly {KEY_LENGTH} bytes")
        object.__setattr__(self, "public", crypto_scalarmult_base(self.private))

    @classmethod
    def generate(cls) -> PeerIdentity:
        return cls(_random(KEY_LENGTH), ephemeral=True)

    @property
    def pool_key(self) -> bytes | str:
        """How a session pool tells identities apart: any ephemeral one is as good as another."""
        return "ephemeral" if self.ephemeral else self.public

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, create: bool = False) -> PeerIdentity:
        """
        Load an identity, or with C{create=True} make one on first use.

        Creation is atomic and owner-only, like L{SyncKey.write}.
        """
        path = Path(path).expanduser()
        if create and not path.exists():
            identity = cls(_random(KEY_LENGTH))
            if _create_private_file(path, _encode(IDENTITY_PREFIX, identity.private) + "\n"):
                return identity
            # another process made it first: read theirs below
        try:
            text = path.read_text("ascii")
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or "not a text file"
            raise KeyFileError(f"cannot read the identity file {str(path)!r}: {reason}") from None
        return cls(_decode(IDENTITY_PREFIX, text, "pluresync identity"))

    @property
    def peer_id(self) -> str:
        return format_peer_id(self.public)


def format_peer_id(public: bytes) -> str:
    """The text form of a peer id: 64 lowercase hex digits (also the wire form)."""
    return public.hex()


def parse_peer_id(text: str) -> bytes:
    """Parse a peer id given by a user, with an error that says what is wrong."""
    cleaned = text.strip().lower()
    if len(cleaned) != 2 * KEY_LENGTH:
        raise ValueError(f"a peer id is {2 * KEY_LENGTH} hex digits, got {len(cleaned)} characters")
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        raise ValueError("a peer id is hex digits only") from None


def load_sync_key(
    keyfile: str | None = None,
    key: str | None = None,
    environ: dict[str, str] | None = None,
) -> SyncKey:
    """
    Find the sync key the way every endpoint does: C{key=} text, else
    C{keyfile=}, else the C{PLURESYNC_KEY} environment variable (which may hold
    the key's text or a path to a key file).
    """
    if key is not None and keyfile is not None:
        raise KeyFileError("give either key= or keyfile=, not both")
    if key is not None:
        return SyncKey.from_text(key)
    if keyfile is not None:
        return SyncKey.from_file(keyfile)
    env = os.environ if environ is None else environ
    value = env.get(KEY_ENVIRONMENT_VARIABLE)
    if value:
        if value.strip().lower().startswith(KEY_PREFIX):
            return SyncKey.from_text(value)
        return SyncKey.from_file(value)
    raise KeyFileError(
        f"no sync key: pass keyfile=PATH or set {KEY_ENVIRONMENT_VARIABLE} "
        "(make a key with `pluresync keygen --out PATH`)"
    )
