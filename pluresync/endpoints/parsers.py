"""
Endpoint-string parsers: what makes C{clientFromString(reactor, "relay:azure:keyfile=...")} work.

This module is imported by Twisted's plugin scan, so it imports nothing heavy
(no Autobahn, no NaCl, no reactor): a failing import there is swallowed by
Twisted and surfaces much later as "Unknown endpoint type". The real work is
imported when a string is parsed.

Each parser forwards C{*args, **kwargs} to a function with a real signature,
which coerces the strings and rejects what it does not know with a
L{ConfigurationError} (a C{ValueError}) that names it.
"""

from __future__ import annotations

from twisted.internet.interfaces import (
    IStreamClientEndpointStringParserWithReactor,
    IStreamServerEndpointStringParser,
)
from twisted.plugin import IPlugin
from zope.interface import implementer

from pluresync.errors import ConfigurationError

#: Every parameter a C{relay:} string takes (docs/endpoints.md documents each).
RELAY_PARAMETERS = frozenset(
    {"url", "keyfile", "key", "topic", "peer", "identity", "wait", "timeout", "ca", "ping", "proxy"}
    | {"token", "tokenfile"}
    | {"resume", "window", "stall", "rotate", "reuse"}
    | {"pipe"}
)

#: The environment variable with the relay token (the token, or a file holding it).
RELAY_TOKEN_ENVIRONMENT_VARIABLE = "PLURESYNC_RELAY_TOKEN"


def _valid_token(token: str) -> bool:
    # RFC 6750 b64token: also keeps CR/LF and spaces out of the header.
    import re

    return len(token) <= 4096 and re.fullmatch(r"[A-Za-z0-9._~+/-]+=*", token) is not None


def _read_token_file(path: str, where: str) -> str:
    from pathlib import Path

    try:
        text = Path(path).expanduser().read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"relay endpoint: cannot read {where}={path!r}: {getattr(e, 'strerror', e)}") from None
    if not _valid_token(text):
        raise ConfigurationError(f"relay endpoint: {where}={path!r} does not hold a relay token (one line, no spaces)")
    return text


def relay_token(token: str | None, tokenfile: str | None, environ) -> str | None:
    """
    The relay token: C{token=}, else C{tokenfile=}, else
    C{PLURESYNC_RELAY_TOKEN} (a path if it starts with C{/}, C{~} or C{.}
    or names an existing file, otherwise the token itself), else C{None}.
    Error messages never include a token.
    """
    import os

    if token is not None and tokenfile is not None:
        raise ConfigurationError("relay endpoint: give either token= or tokenfile=, not both")
    if token is not None:
        if not _valid_token(token):
            raise ConfigurationError("relay endpoint: token= is not a valid relay token (letters, digits, -._~+/ only)")
        return token
    if tokenfile is not None:
        return _read_token_file(tokenfile, "tokenfile")
    value = (environ.get(RELAY_TOKEN_ENVIRONMENT_VARIABLE) or "").strip()
    if not value:
        return None
    if value.startswith(("/", "~", ".")) or os.path.isfile(os.path.expanduser(value)):
        return _read_token_file(value, RELAY_TOKEN_ENVIRONMENT_VARIABLE)
    if not _valid_token(value):
        raise ConfigurationError(
            f"relay endpoint: {RELAY_TOKEN_ENVIRONMENT_VARIABLE} is neither a relay token "
            "nor the path of a file holding one"
        )
    return value


def _number(name: str, value: str | None, default: float, minimum: float = 0.0, *, endpoint: str = "relay") -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigurationError(f"{endpoint} endpoint: {name}= must be a number of seconds, got {value!r}") from None
    if not (number >= minimum) or number == float("inf"):
        raise ConfigurationError(f"{endpoint} endpoint: {name}= must be at least {minimum:g}, got {value!r}")
    return number


def _load_ca(path: str):
    from pathlib import Path

    from twisted.internet.ssl import Certificate

    try:
        text = Path(path).expanduser().read_text("ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigurationError(f"relay endpoint: cannot read ca={path!r}: {getattr(e, 'strerror', e)}") from None
    marker = "-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in text.split(marker)[1:]]
    if not blocks:
        raise ConfigurationError(f"relay endpoint: ca={path!r} holds no PEM certificate")
    try:
        return tuple(Certificate.loadPEM(block) for block in blocks)
    except Exception:
        raise ConfigurationError(f"relay endpoint: ca={path!r} holds a malformed certificate") from None


_CLIENT_ONLY = ("peer", "wait", "reuse")


def _refuse_client_only(prefix: str, kwargs: dict) -> None:
    misplaced = [name for name in _CLIENT_ONLY if name in kwargs]
    if misplaced:
        raise ConfigurationError(
            f"{prefix} endpoint: {', '.join(p + '=' for p in misplaced)} only apply to connecting (client) endpoints"
        )


def relay_config(*args: str, **kwargs: str):
    """
    Build a L{pluresync.endpoints.relay.RelayConfig} from an endpoint
    string's arguments: C{relay:azure:keyfile=...}, C{relay:vercel:...},
    C{relay:url=wss\\://host/:...}.
    """
    import os

    from pluresync.dial.proxy import proxy_for
    from pluresync.endpoints.relay import PIPES, PRESETS, RelayConfig
    from pluresync.keys import PeerIdentity, load_sync_key, parse_peer_id
    from pluresync.pipes.websocket import RelayURL

    unknown = sorted(set(kwargs) - RELAY_PARAMETERS)
    if unknown:
        raise ConfigurationError(
            f"relay endpoint: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(RELAY_PARAMETERS))}"
        )
    if len(args) > 1:
        raise ConfigurationError(f"relay endpoint: expected at most one relay name, got {':'.join(args)!r}")
    preset = args[0] if args else None
    if preset is not None and preset not in PRESETS:
        raise ConfigurationError(f"relay endpoint: unknown relay {preset!r}; use {' or '.join(PRESETS)} or url=")
    url = kwargs.get("url") or (PRESETS[preset] if preset else None)
    if url is None:
        raise ConfigurationError("relay endpoint: name a relay (relay:azure, relay:vercel) or give url=")
    relay = RelayURL.parse(url)
    name = f"relay:{preset}" if preset else f"relay:{relay.host}"
    sync_key = load_sync_key(keyfile=kwargs.get("keyfile"), key=kwargs.get("key"))
    peer = kwargs.get("peer")
    try:
        peer_bytes = parse_peer_id(peer) if peer is not None else None
    except ValueError as e:
        raise ConfigurationError(f"relay endpoint: peer= {e}") from None
    identity_path = kwargs.get("identity")
    identity = PeerIdentity.from_file(identity_path, create=True) if identity_path else PeerIdentity.generate()
    ping = _number("ping", kwargs.get("ping"), 25.0)
    session = _session_params(kwargs)
    proxy = proxy_for(relay.host, relay.port, relay.secure, explicit=kwargs.get("proxy"), environ=os.environ)
    pipe = kwargs.get("pipe", "auto").strip().lower()
    if pipe not in PIPES:
        raise ConfigurationError(f"relay endpoint: pipe= is {', '.join(PIPES)}, got {kwargs['pipe']!r}")
    return RelayConfig(
        name=name,
        relay=relay,
        topic=sync_key.topic(kwargs.get("topic", "")),
        identity=identity,
        peer=peer_bytes,
        wait=_number("wait", kwargs.get("wait"), 30.0),
        timeout=_number("timeout", kwargs.get("timeout"), 30.0, minimum=0.001),
        ca=_load_ca(kwargs["ca"]) if "ca" in kwargs else None,
        ping_interval=ping,
        ping_timeout=min(10.0, ping) if ping else 0.0,
        proxy=proxy,
        token=relay_token(kwargs.get("token"), kwargs.get("tokenfile"), os.environ),
        session=session,
        pipe=pipe,
    )


def _session_params(kwargs: dict, endpoint: str = "relay"):
    """The session's knobs; C{ping=} paces both the WebSocket's and the session's keepalive."""
    from pluresync.session.params import DEFAULT_WINDOW, MAX_WINDOW, MIN_WINDOW, SessionParams

    defaults = SessionParams()
    window = kwargs.get("window")
    if window is None:
        size = DEFAULT_WINDOW
    else:
        try:
            size = int(window)
        except ValueError:
            raise ConfigurationError(
                f"{endpoint} endpoint: window= must be a number of bytes, got {window!r}"
            ) from None
        if not MIN_WINDOW <= size <= MAX_WINDOW:
            raise ConfigurationError(
                f"{endpoint} endpoint: window= must be between {MIN_WINDOW} and {MAX_WINDOW} bytes, got {window!r}"
            )
    ping = kwargs.get("ping")

    def seconds(name: str, value, default: float, minimum: float = 0.0) -> float:
        return _number(name, value, default, minimum, endpoint=endpoint)

    reuse = kwargs.get("reuse")
    share, linger = True, defaults.linger
    if reuse == "off":
        share = False
    elif reuse is not None:
        linger = seconds("reuse", reuse, defaults.linger)
    return SessionParams(
        share=share,
        linger=linger,
        resume=seconds("resume", kwargs.get("resume"), defaults.resume),
        window=size,
        stall=seconds("stall", kwargs.get("stall"), defaults.stall, minimum=0.01),
        ping=seconds("ping", ping, defaults.ping, minimum=0.01) if ping not in (None, "0") else defaults.ping,
        rotate=seconds("rotate", kwargs.get("rotate"), defaults.rotate),
    )


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class RelayClientParser:
    """C{relay:} client endpoints."""

    prefix = "relay"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from pluresync.endpoints.relay import RelayClientEndpoint

        return RelayClientEndpoint(reactor, relay_config(*args, **kwargs))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class RelayServerParser:
    """C{relay:} server endpoints (listeners)."""

    prefix = "relay"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from pluresync.endpoints.relay import RelayServerEndpoint

        _refuse_client_only("relay", kwargs)
        return RelayServerEndpoint(reactor, relay_config(*args, **kwargs))


#: Every parameter a C{direct:} string takes (docs/endpoints.md documents each).
DIRECT_PARAMETERS = frozenset(
    {"keyfile", "key", "topic", "peer", "identity", "wait", "timeout", "ping"}
    | {"resume", "window", "stall", "rotate", "reuse"}
    | {"lan", "port"}
)
#: What C{direct:} takes beside those when it meets its peer through a relay
#: (C{relay=}): where its public address comes from, and how to reach the relay.
DIRECT_RELAY_PARAMETERS = frozenset({"relay", "stun", "ca", "proxy", "token", "tokenfile", "delay"})

_SERVER_ONLY = ("port",)

#: What to install for the direct path (zeroconf is LGPL, so it is an extra).
DIRECT_EXTRA = "pip install 'pluresync[direct]'"


def _refuse_server_only(prefix: str, kwargs: dict) -> None:
    misplaced = [name for name in _SERVER_ONLY if name in kwargs]
    if misplaced:
        raise ConfigurationError(
            f"{prefix} endpoint: {', '.join(p + '=' for p in misplaced)} only apply to listening (server) endpoints"
        )


def zeroconf_installed() -> bool:
    """Whether the direct path's LAN discovery can run here (found without importing it)."""
    from importlib.util import find_spec

    return find_spec("zeroconf") is not None


def _lan_address(value: str | None, prefix: str) -> str | None:
    if value is None:
        return None
    from pluresync.direct.lanadvert import usable_address

    value = value.strip()
    if not usable_address(value):
        raise ConfigurationError(
            f"{prefix} endpoint: lan= is the IPv4 address of this host's LAN interface (e.g. 192.168.1.20), "
            f"got {value!r}"
        )
    return value


def _tcp_port(value: str | None, prefix: str) -> int:
    if value is None:
        return 0
    try:
        port = int(value)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise ConfigurationError(f"{prefix} endpoint: port= is a TCP port from 0 (any) to 65535, got {value!r}")
    return port


def direct_config(*args: str, **kwargs: str):
    """
    Build a L{pluresync.endpoints.direct.DirectConfig} from an endpoint
    string's arguments: C{direct:keyfile=...:topic=...:lan=ADDRESS:port=N}.
    """
    from pluresync.endpoints.direct import DirectConfig
    from pluresync.keys import PeerIdentity, load_sync_key, parse_peer_id

    unknown = sorted(set(kwargs) - DIRECT_PARAMETERS)
    if unknown:
        raise ConfigurationError(
            f"direct endpoint: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(DIRECT_PARAMETERS))}"
        )
    args = tuple(arg for arg in args if arg)  # "direct:" alone parses as one empty argument
    if args:
        raise ConfigurationError(f"direct endpoint: takes only name=value parameters, got {':'.join(args)!r}")
    if not zeroconf_installed():
        raise ConfigurationError(
            "direct endpoint: finding peers on the LAN needs the zeroconf package, which pluresync does not "
            f"install by default: {DIRECT_EXTRA}"
        )
    sync_key = load_sync_key(keyfile=kwargs.get("keyfile"), key=kwargs.get("key"))
    peer = kwargs.get("peer")
    try:
        peer_bytes = parse_peer_id(peer) if peer is not None else None
    except ValueError as e:
        raise ConfigurationError(f"direct endpoint: peer= {e}") from None
    identity_path = kwargs.get("identity")
    identity = PeerIdentity.from_file(identity_path, create=True) if identity_path else PeerIdentity.generate()
    return DirectConfig(
        topic=sync_key.topic(kwargs.get("topic", "")),
        identity=identity,
        peer=peer_bytes,
        wait=_number("wait", kwargs.get("wait"), 30.0, endpoint="direct"),
        timeout=_number("timeout", kwargs.get("timeout"), 30.0, minimum=0.001, endpoint="direct"),
        lan=_lan_address(kwargs.get("lan"), "direct"),
        port=_tcp_port(kwargs.get("port"), "direct"),
        session=_session_params(kwargs, "direct"),
    )


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class DirectClientParser:
    """C{direct:} client endpoints: find the peer on the LAN and connect with no relay."""

    prefix = "direct"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from pluresync.endpoints.direct import DirectClientEndpoint

        _refuse_server_only("direct", kwargs)
        if "relay" in kwargs:
            from pluresync.endpoints.auto import AutoClientEndpoint

            return AutoClientEndpoint(reactor, direct_via_relay_config(*args, **kwargs))
        return DirectClientEndpoint(reactor, direct_config(*args, **kwargs))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class DirectServerParser:
    """C{direct:} server endpoints: listen on the LAN and advertise it."""

    prefix = "direct"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from pluresync.endpoints.direct import DirectServerEndpoint

        _refuse_client_only("direct", kwargs)
        if "relay" in kwargs:
            from pluresync.endpoints.auto import AutoServerEndpoint

            return AutoServerEndpoint(reactor, direct_via_relay_config(*args, **kwargs))
        return DirectServerEndpoint(reactor, direct_config(*args, **kwargs))


def direct_via_relay_config(*args: str, **kwargs: str):
    """
    C{direct:...:relay=azure|vercel|URL[:stun=...]}: a peer anywhere, met
    through a relay that carries only the signals (candidates, certificates)
    until a punched UDP path or the LAN carries the stream; the application
    sees the connection only once it runs direct, and a connection whose
    direct path cannot be opened fails (C{DirectPathError}) instead of
    staying on the relay.  Built as an C{auto:} of the LAN and that relay.
    """
    from dataclasses import replace

    from pluresync.direct.upgrade import DirectParams
    from pluresync.endpoints.auto import DEFAULT_DELAY, AutoConfig
    from pluresync.endpoints.relay import PRESETS

    known = DIRECT_PARAMETERS | DIRECT_RELAY_PARAMETERS
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigurationError(
            f"direct endpoint: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    relay = kwargs["relay"].strip()
    common = {k: kwargs[k] for k in RELAY_PARAMETERS - {"url"} if k in kwargs}
    if relay in PRESETS:
        signal = relay_config(relay, **common)
    else:
        if "://" not in relay:
            raise ConfigurationError(
                f"direct endpoint: relay= is azure, vercel or a relay's URL (wss\\://host), got {relay!r}"
            )
        signal = relay_config(url=relay, **common)
    lan = direct_config(*args, **{k: kwargs[k] for k in DIRECT_PARAMETERS if k in kwargs})
    signal = replace(signal, identity=lan.identity, session=lan.session)
    return AutoConfig(
        paths=(lan, signal),
        delay=_number("delay", kwargs.get("delay"), DEFAULT_DELAY, endpoint="direct"),
        timeout=lan.timeout,
        upgrade=DirectParams(stun=_stun_servers(kwargs.get("stun")), first=0.05, required=True),
        direct_only=True,
    )


#: Every parameter an C{auto:} string takes: C{relay:}'s but C{url=}, its own, and the LAN path's.
_AUTO_PARAMETERS = (
    (RELAY_PARAMETERS - {"url"})
    | {"azure", "vercel", "relays", "delay", "config"}
    | {"direct", "lan", "port", "stun", "upgrade"}
)


def auto_parameters() -> frozenset[str]:
    """Every parameter an C{auto:} string takes (docs/endpoints.md documents each)."""
    return frozenset(_AUTO_PARAMETERS)


#: C{direct=}'s values.
_SWITCH = {"on": True, "off": False}
_lan_skipped: list[bool] = []


def _direct_wanted(value: str | None, seed_direct: bool | None) -> bool:
    """
    Whether C{auto:} races the LAN path: C{direct=} if given, else the
    config file's C{syncDirect}, else whenever zeroconf is installed.
    """
    if value is not None:
        if value.strip().lower() not in _SWITCH:
            raise ConfigurationError(f"auto endpoint: direct= is on or off, got {value!r}")
        wanted = _SWITCH[value.strip().lower()]
    else:
        wanted = seed_direct
    if wanted is None:
        if zeroconf_installed():
            return True
        if not _lan_skipped:
            from twisted.logger import Logger

            _lan_skipped.append(True)
            Logger().debug("auto: the LAN path is off: the zeroconf package is not installed ({how})", how=DIRECT_EXTRA)
        return False
    if wanted and not zeroconf_installed():
        raise ConfigurationError(
            "auto endpoint: direct=on needs the zeroconf package, which pluresync does not install by default: "
            f"{DIRECT_EXTRA}"
        )
    return wanted


def auto_config(*args: str, **kwargs: str):
    """
    Build a L{pluresync.endpoints.auto.AutoConfig} from an endpoint string's
    arguments: C{auto:keyfile=...:azure=URL:vercel=URL:timeout=...:delay=...},
    C{auto:config=PATH} (the seed's JSON config), C{relays=vercel,azure} to
    choose and order the relays, C{direct=off} to leave out the LAN path
    (which comes first when zeroconf is installed). Precedence: the string,
    then the config file, then the environment.
    """
    from dataclasses import replace

    from pluresync.config import read_config
    from pluresync.endpoints.auto import DEFAULT_DELAY, AutoConfig
    from pluresync.endpoints.relay import PRESETS
    from pluresync.keys import KEY_PREFIX, PeerIdentity, SyncKey

    unknown = sorted(set(kwargs) - _AUTO_PARAMETERS)
    if unknown:
        raise ConfigurationError(
            f"auto endpoint: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(_AUTO_PARAMETERS))}"
        )
    args = tuple(arg for arg in args if arg)  # "auto:" alone parses as one empty argument
    if args:
        raise ConfigurationError(f"auto endpoint: takes only name=value parameters, got {':'.join(args)!r}")
    seed = read_config(kwargs["config"]) if "config" in kwargs else None
    if seed is None:
        from pluresync.config import SeedConfig

        seed = SeedConfig()
    seed = seed.with_environment()
    relays = [name.strip() for name in kwargs.get("relays", ",".join(PRESETS)).split(",") if name.strip()]
    bad = [name for name in relays if name not in PRESETS]
    if bad or not relays or len(set(relays)) != len(relays):
        raise ConfigurationError(
            f"auto endpoint: relays= lists {', '.join(PRESETS)} (each at most once), got {kwargs.get('relays')!r}"
        )
    common = {k: kwargs[k] for k in RELAY_PARAMETERS - {"url"} if k in kwargs}
    if "key" not in common and "keyfile" not in common and seed.sync_key:
        text = seed.sync_key.strip()
        common["key"] = text if text.lower().startswith(KEY_PREFIX) else SyncKey.from_passphrase(text).to_text()
    if "timeout" not in common and seed.timeout is not None:
        common["timeout"] = str(seed.timeout)
    slots = {"azure": seed.relay, "vercel": seed.relay_fallback}
    paths = []
    identity = None
    for name in relays:
        url = kwargs.get(name) or slots[name] or PRESETS[name]
        path = relay_config(name, url=url, **common)
        # One identity (peer id) for every path, so peer= means the same listener.
        identity = identity or path.identity
        paths.append(replace(path, identity=identity))
    if not isinstance(identity, PeerIdentity):
        raise ConfigurationError("auto endpoint: no paths configured")
    upgrade = None
    stun = _stun_servers(kwargs.get("stun"))
    if _direct_wanted(kwargs.get("direct"), seed.direct):
        # First: on a LAN it is the fastest path, and where there is none it
        # fails or waits only its head start before the relays begin.
        lan = {k: common[k] for k in DIRECT_PARAMETERS if k in common}
        lan.update({k: kwargs[k] for k in ("lan", "port") if k in kwargs})
        paths.insert(0, replace(direct_config(**lan), identity=identity))
        # And a session that runs over a relay looks for a punched UDP path.
        from pluresync.direct.upgrade import DirectParams

        upgrade = DirectParams(stun=stun)
        if "upgrade" in kwargs:
            # Shorter (or longer) waits before looking for a direct path:
            # the first attempt, and the retry after a failure or a lost
            # direct path (still doubling up to max_retry).
            every = _number("upgrade", kwargs["upgrade"], upgrade.first, minimum=0.01, endpoint="auto")
            upgrade = replace(upgrade, first=every, retry=every)
    elif "stun" in kwargs or "upgrade" in kwargs:
        which = "stun=" if "stun" in kwargs else "upgrade="
        raise ConfigurationError(f"auto endpoint: {which} only serves direct paths, and direct=off turns them off")
    return AutoConfig(
        paths=tuple(paths),
        delay=_number("delay", kwargs.get("delay"), DEFAULT_DELAY),
        timeout=paths[0].timeout,
        upgrade=upgrade,
    )


def _stun_servers(value: str | None) -> tuple[tuple[str, int], ...]:
    """
    C{stun=HOST:PORT,HOST:PORT} (e.g. a relay host's C{--udp-port} N and
    N+1), or C{none} (the default): who tells a peer its public address.
    Colons inside an endpoint string are escaped (C{host\\:3478}).
    """
    if value is None or value.strip().lower() in ("", "none"):
        return ()
    servers = []
    for item in value.split(","):
        host, _, port = item.strip().rpartition(":")
        try:
            number = int(port)
        except ValueError:
            number = 0
        if not host or not 0 < number < 65536:
            raise ConfigurationError(f"auto endpoint: stun= lists HOST:PORT servers, got {item.strip()!r}")
        servers.append((host.strip("[]"), number))
    return tuple(servers)


@implementer(IPlugin, IStreamClientEndpointStringParserWithReactor)
class AutoClientParser:
    """C{auto:} client endpoints: race every path, keep the first that works."""

    prefix = "auto"

    def parseStreamClient(self, reactor, *args, **kwargs):
        from pluresync.endpoints.auto import AutoClientEndpoint

        _refuse_server_only("auto", kwargs)
        return AutoClientEndpoint(reactor, auto_config(*args, **kwargs))


@implementer(IPlugin, IStreamServerEndpointStringParser)
class AutoServerParser:
    """C{auto:} server endpoints: listen on every path at once."""

    prefix = "auto"

    def parseStreamServer(self, reactor, *args, **kwargs):
        from pluresync.endpoints.auto import AutoServerEndpoint

        _refuse_client_only("auto", kwargs)
        return AutoServerEndpoint(reactor, auto_config(*args, **kwargs))
