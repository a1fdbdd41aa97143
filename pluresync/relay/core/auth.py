"""
Relay authentication: who may open a WebSocket at a relay.

Pure Python (standard library only: no Twisted, no Autobahn), so any front
end that terminates the WebSocket upgrade (the Twisted relay, a serverless
function) can use it as is.  C{docs/protocol.md} ("Authentication") is the
specification of the header and of the signed token format.

An L{Authenticator} looks at the upgrade request's C{Authorization} header
and answers an L{AuthResult}: allowed (with the tenant's name, for logs), or
refused with a short reason code.  Nothing here ever puts a token, a hash
of one or a secret into a result, an exception message or a repr.

Three modes:

  - L{OpenAuth}: everyone may connect (the default only on loopback);
  - L{TokenFileAuth}: a file of allowed tokens, stored as SHA-256 hashes,
    re-read when it changes;
  - L{SignedTokenAuth}: stateless tokens carrying a tenant name and an
    expiry, signed with HMAC-SHA256 under a secret read from a file
    (instances that share the secret file share nothing else).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import math
import os
import re
import secrets as _secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

#: The prefix (and version) of signed tokens.
SIGNED_PREFIX = "psrt1"
#: How far a signed token's expiry may lie in the past (relay clocks drift).
DEFAULT_SKEW = 60.0
#: A shared secret must be at least this long (bytes, after stripping).
MIN_SECRET_BYTES = 32
#: Longest Authorization header value looked at; longer is malformed.
MAX_HEADER = 4096
#: Largest tokens or secret file read (bounds the cost of a reload).
MAX_FILE_BYTES = 1 << 20

# Reason codes of a refusal (never anything derived from the token).
MISSING = "missing"
"""No C{Authorization} header."""
MALFORMED = "malformed"
"""Not C{Bearer <token>}, or a signed token that does not parse."""
UNKNOWN_TOKEN = "unknown-token"
"""(tokens) The token is not in the tokens file."""
BAD_SIGNATURE = "bad-signature"
"""(signed) The signature does not verify under any configured secret."""
EXPIRED = "expired"
"""(signed) The token's expiry (plus the skew allowance) has passed."""

_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*\Z")
_B64URL = re.compile(r"[A-Za-z0-9_-]*\Z")
_HASHED_LINE = re.compile(r"sha256:([0-9a-fA-F]{64})\s+(\S+)\Z")

#: The constant-time comparison every check uses (a module attribute, so a
#: test can watch it being used).
_compare = hmac.compare_digest


class AuthConfigError(ValueError):
    """A tokens file or secret file is missing, unreadable or malformed (never quotes its content)."""


@dataclass(frozen=True)
class AuthResult:
    """
    The answer of an L{Authenticator}.

    @ivar ok: whether the upgrade may go on.
    @ivar tenant: the tenant's name when allowed (C{None} in open mode);
        safe to log.
    @ivar reason: when refused, one of L{MISSING}, L{MALFORMED},
        L{UNKNOWN_TOKEN}, L{BAD_SIGNATURE}, L{EXPIRED}; safe to log and to
        send to the client.
    """

    ok: bool
    tenant: str | None = None
    reason: str | None = None

    @classmethod
    def allow(cls, tenant: str | None = None) -> AuthResult:
        return cls(True, tenant, None)

    @classmethod
    def refuse(cls, reason: str) -> AuthResult:
        return cls(False, None, reason)


@runtime_checkable
class Authenticator(Protocol):
    """Decides whether a WebSocket upgrade may proceed."""

    #: C{"open"}, C{"tokens"} or C{"signed"}.
    mode: str

    def check(self, authorization_header: str | None, now: float) -> AuthResult:
        """
        @param authorization_header: the request's C{Authorization} header
            value, or C{None} if it has none.
        @param now: the current time (UNIX seconds).
        """
        ...


def valid_tenant(name: str) -> bool:
    """Whether C{name} is a usable tenant name: 1-64 of C{A-Z a-z 0-9 . _ @ -}, starting alphanumeric."""
    return isinstance(name, str) and _TENANT.match(name) is not None


def bearer_token(authorization_header: str | None) -> str | AuthResult:
    """
    The token of a C{Bearer} header (RFC 6750: scheme case-insensitive, one
    token68), or the refusal (L{MISSING} / L{MALFORMED}).
    """
    if authorization_header is None or not authorization_header.strip():
        return AuthResult.refuse(MISSING)
    if len(authorization_header) > MAX_HEADER:
        return AuthResult.refuse(MALFORMED)
    scheme, _, token = authorization_header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or _TOKEN68.match(token) is None:
        return AuthResult.refuse(MALFORMED)
    return token


def hash_token(token: str) -> str:
    """The tokens-file form of C{token}: C{sha256:} and 64 hex digits."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_random_token() -> str:
    """A fresh random token for a tokens file: 32 bytes from the OS CSPRNG, base64url (43 characters)."""
    return _secrets.token_urlsafe(32)


class OpenAuth:
    """Everyone may connect; no header is looked at."""

    mode = "open"

    def check(self, authorization_header: str | None, now: float) -> AuthResult:
        return AuthResult.allow(None)

    def __repr__(self) -> str:
        return "OpenAuth()"


class _WatchedFile:
    """
    A file parsed by C{parse} and re-parsed when it changes.

    Checks cost one C{stat} at most every C{interval} seconds (of the
    caller's clock); a change of modification time, size, inode or change
    time re-reads it.  A file that fails to read or parse on reload leaves
    the previous content in force and is reported through C{report} (once
    per change); the first read raises L{AuthConfigError}.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[bytes, str], object],
        interval: float,
        report: Callable[[str], None] | None,
    ) -> None:
        self.path = os.path.expanduser(path)
        self._parse = parse
        self._interval = interval
        self._report = report
        self._checked: float | None = None
        self._stamp = self._stat()
        self.value = self._load()
        self.error: str | None = None

    def _stat(self) -> tuple[int, int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise AuthConfigError(f"cannot read {self.path}: {e.strerror}") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)

    def _load(self) -> object:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise AuthConfigError(f"cannot read {self.path}: {e.strerror}") from None
        if len(data) > MAX_FILE_BYTES:
            raise AuthConfigError(f"{self.path} is larger than {MAX_FILE_BYTES} bytes")
        return self._parse(data, self.path)

    def current(self, now: float) -> object:
        if self._checked is not None and 0 <= now - self._checked < self._interval:
            return self.value
        self._checked = now
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return self.value
            self._stamp = stamp
            self.value = self._load()
            self.error = None
        except AuthConfigError as e:
            if str(e) != self.error:
                self.error = str(e)
                if self._report is not None:
                    self._report(f"{e}; keeping the previous version")
        return self.value


def parse_tokens_file(data: bytes, path: str = "tokens file") -> tuple[tuple[bytes, str], ...]:
    """
    Parse a tokens file: one C{sha256:HEX NAME} per line; blank lines and
    lines starting with C{#} are ignored.  Errors name the line number only
    (a line may hold a pasted token).

    @return: C{(digest, tenant)} pairs.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise AuthConfigError(f"{path} is not UTF-8 text") from None
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _HASHED_LINE.match(line)
        if match is None:
            raise AuthConfigError(
                f"{path}, line {number}: expected 'sha256:<64 hex digits> <tenant>' "
                "(store the token's hash, never the token: `pluresync relay-token --random --tenant NAME` "
                "prints both)"
            )
        if not valid_tenant(match.group(2)):
            raise AuthConfigError(
                f"{path}, line {number}: a tenant name is 1-64 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit"
            )
        entries.append((bytes.fromhex(match.group(1)), match.group(2)))
    return tuple(entries)


class TokenFileAuth:
    """
    Allowed tokens from a file, stored hashed: one C{sha256:HEX NAME} per
    line, C{NAME} being the tenant's name for logs.

    Why plain SHA-256 and not a slow password hash: the tokens are random
    and long (L{new_random_token}: 256 bits), so nobody can find one from
    its hash by guessing, however fast the hash; a slow KDF (bcrypt,
    Argon2) only helps low-entropy passwords, and would make every upgrade
    cost tens of milliseconds of CPU, a lever for denial of service.  A
    stolen tokens file therefore reveals no usable token.

    The presented token's digest is compared with I{every} entry with
    C{hmac.compare_digest} (no early exit), so the time taken does not
    depend on which entry, or how much of one, matched.  The file is
    re-read when it changes (checked at most every C{check_interval}
    seconds): add or remove a line to grant or revoke, no restart.  Write
    it atomically (write a new file, rename it over the old one).
    """

    mode = "tokens"

    def __init__(
        self,
        path: str,
        *,
        check_interval: float = 1.0,
        report: Callable[[str], None] | None = None,
    ) -> None:
        self._file = _WatchedFile(path, parse_tokens_file, check_interval, report)

    @property
    def path(self) -> str:
        return self._file.path

    def __len__(self) -> int:
        return len(self._file.value)  # type: ignore[arg-type]

    def check(self, authorization_header: str | None, now: float) -> AuthResult:
        token = bearer_token(authorization_header)
        if isinstance(token, AuthResult):
            return token
        entries: tuple[tuple[bytes, str], ...] = self._file.current(now)  # type: ignore[assignment]
        digest = hashlib.sha256(token.encode("utf-8")).digest()
        tenant = None
        for stored, name in entries:
            if _compare(stored, digest) and tenant is None:
                tenant = name
        return AuthResult.allow(tenant) if tenant is not None else AuthResult.refuse(UNKNOWN_TOKEN)

    def __repr__(self) -> str:
        return f"TokenFileAuth({self.path!r})"


def parse_secret_file(data: bytes, path: str = "secret file") -> tuple[bytes, ...]:
    """
    Parse a secret file: one secret per line (at least 32 bytes each;
    blank lines and C{#} lines ignored).  The first secret signs new
    tokens; all of them verify (for rotation).
    """
    found = []
    for number, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        if len(line) < MIN_SECRET_BYTES:
            raise AuthConfigError(
                f"{path}, line {number}: a secret must be at least {MIN_SECRET_BYTES} characters "
                "(make one with: head -c 32 /dev/urandom | base64)"
            )
        found.append(line)
    if not found:
        raise AuthConfigError(f"{path} holds no secret (make one with: head -c 32 /dev/urandom | base64)")
    return tuple(found)


def read_secret_file(path: str) -> tuple[bytes, ...]:
    """The secrets of the file at C{path} (see L{parse_secret_file})."""
    return _WatchedFile(path, parse_secret_file, 0.0, None).value  # type: ignore[return-value]


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    if _B64URL.match(text) is None or len(text) % 4 == 1:
        return None
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None


def _signature(secret: bytes, signed_part: str) -> bytes:
    return hmac.new(secret, signed_part.encode("ascii"), hashlib.sha256).digest()


def mint_token(secret: bytes, tenant: str, ttl: float, now: float) -> str:
    """
    A signed token for C{tenant}, valid for C{ttl} seconds from C{now}:
    C{psrt1.<base64url(payload)>.<base64url(HMAC-SHA256(secret, "psrt1." + base64url(payload)))>}
    with the payload C{{"exp":UNIX,"t":TENANT,"v":1}} (compact JSON).
    """
    if not valid_tenant(tenant):
        raise ValueError("a tenant name is 1-64 of A-Z a-z 0-9 . _ @ -, starting with a letter or digit")
    if not ttl > 0 or ttl == float("inf"):
        raise ValueError("the lifetime (ttl) must be a finite number of seconds > 0")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"the secret must be at least {MIN_SECRET_BYTES} bytes")
    payload = json.dumps({"exp": int(now + ttl), "t": tenant, "v": 1}, separators=(",", ":"), sort_keys=True)
    signed_part = f"{SIGNED_PREFIX}.{_b64encode(payload.encode('utf-8'))}"
    return f"{signed_part}.{_b64encode(_signature(secret, signed_part))}"


class SignedTokenAuth:
    """
    Stateless signed tokens (L{mint_token}): any relay holding the secret
    accepts them until they expire; no list to share or synchronise.

    The signature is checked (in constant time, against every configured
    secret) before the payload is even decoded.  A token is accepted until
    C{exp + skew}.  Revoking a single token is not possible: rotate the
    secret (see C{docs/relay.md}), or keep lifetimes short.
    """

    mode = "signed"

    def __init__(
        self, secret: bytes | Sequence[bytes], *, skew: float = DEFAULT_SKEW, watched: _WatchedFile | None = None
    ) -> None:
        secrets = (secret,) if isinstance(secret, (bytes, bytearray)) else tuple(secret)
        if not secrets or any(len(s) < MIN_SECRET_BYTES for s in secrets):
            raise AuthConfigError(f"each secret must be at least {MIN_SECRET_BYTES} bytes")
        # With a watched file its current secrets are used, the first ones only checked.
        self._static: tuple[bytes, ...] | None = None if watched else tuple(bytes(s) for s in secrets)
        self._file = watched
        self.skew = skew

    @classmethod
    def from_file(
        cls,
        path: str,
        *,
        skew: float = DEFAULT_SKEW,
        check_interval: float = 1.0,
        report: Callable[[str], None] | None = None,
    ) -> SignedTokenAuth:
        """Secrets from a file (L{parse_secret_file}), re-read when it changes."""
        watched = _WatchedFile(path, parse_secret_file, check_interval, report)
        return cls(watched.value, skew=skew, watched=watched)  # type: ignore[arg-type]

    def _secrets(self, now: float) -> tuple[bytes, ...]:
        if self._file is not None:
            return self._file.current(now)  # type: ignore[return-value]
        assert self._static is not None
        return self._static

    def check(self, authorization_header: str | None, now: float) -> AuthResult:
        token = bearer_token(authorization_header)
        if isinstance(token, AuthResult):
            return token
        parts = token.split(".")
        if len(parts) != 3 or parts[0] != SIGNED_PREFIX:
            return AuthResult.refuse(MALFORMED)
        signature = _b64decode(parts[2])
        if signature is None or len(signature) != 32 or _b64decode(parts[1]) is None:
            return AuthResult.refuse(MALFORMED)
        signed_part = f"{parts[0]}.{parts[1]}"
        good = False
        for secret in self._secrets(now):
            good |= _compare(_signature(secret, signed_part), signature)
        if not good:
            return AuthResult.refuse(BAD_SIGNATURE)
        try:
            payload = json.loads(_b64decode(parts[1]) or b"")
        except ValueError:
            return AuthResult.refuse(MALFORMED)
        if not isinstance(payload, dict):
            return AuthResult.refuse(MALFORMED)
        version, tenant, expiry = payload.get("v"), payload.get("t"), payload.get("exp")
        if (
            type(version) is not int
            or version != 1
            or not valid_tenant(tenant)
            or type(expiry) not in (int, float)
            or not math.isfinite(expiry)
        ):
            return AuthResult.refuse(MALFORMED)
        if now > expiry + self.skew:
            return AuthResult.refuse(EXPIRED)
        return AuthResult.allow(tenant)

    def __repr__(self) -> str:
        where = self._file.path if self._file is not None else "<secret>"
        return f"SignedTokenAuth({where!r})"
