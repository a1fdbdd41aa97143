"""
Reaching a relay through an explicit HTTP proxy with C{CONNECT}.

Inside many corporate networks the only way out is an HTTP proxy. A client
then opens TCP to the proxy, asks it for a tunnel with
C{CONNECT relay.example.net:443 HTTP/1.1}, and after the proxy's C{200} runs
TLS (for C{wss://}) and the WebSocket inside that tunnel. The proxy sees the
relay's host name and port, never what flows through the tunnel.

 - L{ProxyConfig} is one proxy (C{http://[user:password@]host:port}); its
   C{str()} and C{repr()} never show the password.
 - L{proxy_for} decides which proxy (if any) to use for a relay: the
   endpoint's C{proxy=} parameter, else the usual environment variables
   (C{HTTPS_PROXY}, C{HTTP_PROXY}, C{ALL_PROXY}, C{NO_PROXY}).
 - L{ProxyTunnelEndpoint} is an C{IStreamClientEndpoint} that connects
   through the tunnel; wrap it with C{wrapClientTLS} for C{wss://}.

Only plain C{http://} proxies are supported (no TLS to the proxy, no SOCKS).
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from twisted.internet.address import HostnameAddress
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from pluresync.dial.tcp import tcp_endpoint
from pluresync.errors import ConfigurationError, RelayUnreachableError

__all__ = ["MAX_RESPONSE_HEADER", "ProxyConfig", "ProxyTunnelEndpoint", "proxy_for"]

#: The largest response header block (status line and headers) we accept
#: from a proxy before giving up on it.
MAX_RESPONSE_HEADER = 16 * 1024

#: Port of an C{http://host} proxy URL without a port (as Python's urllib
#: and requests assume; curl would assume 1080).
DEFAULT_PROXY_PORT = 80

#: Values of C{proxy=} that mean "connect directly, ignore the environment".
_DIRECT = frozenset({"none", "direct"})

_HEADER_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] +([0-9]{3})(?: +([^\r\n]*))?\r?\n")
# A host as it may appear in a CONNECT line: no whitespace, no controls,
# none of the characters that would end or split the request target.
_BAD_HOST = re.compile(r"[\x00-\x20\x7f/?#@\[\]\\]")


def _redacted(url: str) -> str:
    """C{url} with any password replaced by C{***}, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    # The last "@" anywhere: a password may hold "/", "?" or "#" that end
    # the host part for a URL parser; hiding too much is harmless.
    userinfo, at, hostport = rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    shown = f"{userinfo}{at}{hostport}"
    return f"{scheme}://{shown}" if sep else shown


def _authority(host: str, port: int) -> str:
    """C{host:port} as in a URL or a CONNECT line (IPv6 literals in brackets)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ProxyConfig:
    """
    One HTTP proxy.

    @ivar host: the proxy's host name or IP address (no brackets).
    @ivar port: the proxy's TCP port.
    @ivar username: user name for C{Proxy-Authorization: Basic}, or C{None}.
    @ivar password: its password (C{""} if the URL gave a user name only);
        never shown by C{str()}, C{repr()} or any error message.
    @ivar source: where this proxy came from (C{"proxy="}, C{"HTTPS_PROXY"},
        ...), for messages; not part of equality.
    """

    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    source: str = field(default="", compare=False)

    @classmethod
    def parse(cls, url: str, source: str = "") -> ProxyConfig:
        """
        Parse C{http://host:port}, C{http://user:password@host:port} or
        C{host:port}. The user name and password may be percent-encoded
        (C{%40} for C{@}, C{%3A} for C{:}); a missing port means 80.

        @raise ConfigurationError: for anything else (another scheme such as
            C{socks5://} or C{https://}, no host, a bad port, a path); the
            message never contains the password.
        """
        where = f"{source}: " if source else "proxy: "
        text = url.strip()
        if not text:
            raise ConfigurationError(f"{where}the proxy address is empty; give http://HOST:PORT")
        if "://" not in text:
            text = "http://" + text
        shown = _redacted(text)
        try:
            parts = urlsplit(text)
        except ValueError:
            raise ConfigurationError(f"{where}cannot parse the proxy address {shown!r}") from None
        scheme = parts.scheme.lower()
        if scheme != "http":
            raise ConfigurationError(
                f"{where}unsupported proxy scheme {scheme + '://'!r} in {shown!r}: "
                "pluresync supports only HTTP proxies (http://HOST:PORT, tunnelling with CONNECT)"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigurationError(f"{where}a proxy address is http://HOST:PORT, without a path; got {shown!r}")
        host = parts.hostname
        if not host or _BAD_HOST.search(host):
            raise ConfigurationError(f"{where}the proxy address has no valid host: {shown!r}")
        try:
            port = parts.port
        except ValueError:
            raise ConfigurationError(f"{where}the proxy address has a bad port: {shown!r}") from None
        if port == 0:
            raise ConfigurationError(f"{where}the proxy address has a bad port: {shown!r}")
        username = password = None
        if parts.username is not None or parts.password is not None:
            username = unquote(parts.username or "")
            password = unquote(parts.password or "")
        return cls(host, port or DEFAULT_PROXY_PORT, username, password, source)

    @property
    def address(self) -> str:
        """C{http://host:port}, without credentials."""
        return f"http://{_authority(self.host, self.port)}"

    def describe(self) -> str:
        """The address and where it came from, for messages: C{http://h:p (from HTTPS_PROXY)}."""
        return f"{self.address} (from {self.source})" if self.source else self.address

    def authorization(self) -> bytes | None:
        """The C{Proxy-Authorization} header's value, or C{None} without credentials."""
        if self.username is None:
            return None
        token = f"{self.username}:{self.password or ''}".encode()
        return b"Basic " + base64.b64encode(token)

    def __str__(self) -> str:
        if self.username is None:
            return self.address
        user = self.username.replace("%", "%25").replace("@", "%40").replace(":", "%3A")
        return f"http://{user}:***@{_authority(self.host, self.port)}"

    def __repr__(self) -> str:
        source = f", source={self.source!r}" if self.source else ""
        return f"ProxyConfig({str(self)!r}{source})"


# -- which proxy for which relay ---------------------------------------------


def _env(environ: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """
    The variable C{name} in lower or upper case (lower case wins, as in curl
    and Python's urllib); an empty value counts as unset.
    """
    for candidate in (name.lower(), name.upper()):
        value = environ.get(candidate, "").strip()
        if value:
            return candidate, value
    return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def _no_proxy_matches(entry: str, host: str, port: int) -> bool:
    """
    Whether one C{NO_PROXY} entry covers C{host:port}.

    C{host} is already lower case without a trailing dot. Entries: C{*};
    a domain (C{example.com} or C{.example.com}, also C{*.example.com}: the
    domain and every name under it); an exact host; any of these with
    C{:port}; an IP address (C{[v6]:port} with a port); a CIDR range.
    IP and CIDR entries match only a relay given as an IP address (no DNS
    lookup is made, as in curl).
    """
    entry = entry.strip().lower()
    if not entry:
        return False
    if entry == "*":
        return True
    entry_port: int | None = None
    if entry.startswith("["):  # [v6] or [v6]:port
        inside, _, rest = entry[1:].partition("]")
        if rest.startswith(":") and rest[1:].isdigit():
            entry_port = int(rest[1:])
        entry = inside
    elif entry.count(":") == 1:  # name:port or v4:port
        name, _, port_text = entry.partition(":")
        if not port_text.isdigit():
            return False
        entry, entry_port = name, int(port_text)
    if entry_port is not None and entry_port != port:
        return False
    host_ip = _ip(host)
    if "/" in entry:
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            return False
        return host_ip is not None and host_ip.version == network.version and host_ip in network
    entry_ip = _ip(entry)
    if entry_ip is not None or host_ip is not None:
        return entry_ip is not None and entry_ip == host_ip
    domain = entry.removeprefix("*").removeprefix(".").rstrip(".")
    return bool(domain) and (host == domain or host.endswith("." + domain))


def _bypassed(host: str, port: int, no_proxy: str) -> bool:
    host = host.lower().rstrip(".")
    entries = re.split(r"[,\s]+", no_proxy)
    return any(_no_proxy_matches(entry, host, port) for entry in entries)


def proxy_for(
    relay_host: str,
    relay_port: int,
    secure: bool,
    *,
    explicit: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProxyConfig | None:
    """
    The proxy to reach C{relay_host:relay_port} through, or C{None} for a
    direct connection.

    In this order:

     1. C{explicit} (the endpoint's C{proxy=} parameter): C{none} or
        C{direct} means a direct connection; anything else is the proxy's
        URL. C{NO_PROXY} does not apply to it.
     2. For C{wss://} (C{secure}) C{https_proxy}/C{HTTPS_PROXY}, for C{ws://}
        C{http_proxy}/C{HTTP_PROXY} (upper-case C{HTTP_PROXY} is ignored
        when C{REQUEST_METHOD} is set: in a CGI program it can come from a
        request's C{Proxy:} header).
     3. C{all_proxy}/C{ALL_PROXY}.

    An environment proxy is not used when C{no_proxy}/C{NO_PROXY} covers the
    relay. C{localhost} and loopback addresses are I{not} excluded
    implicitly (as in curl); list them in C{NO_PROXY} if needed. Lower case
    variables win over upper case ones; empty ones count as unset.

    @param environ: the environment (default C{os.environ}).
    @raise ConfigurationError: the chosen proxy's URL is unusable; the
        message names the parameter or variable it came from.
    """
    if explicit is not None:
        if explicit.strip().lower() in _DIRECT:
            return None
        if not explicit.strip():
            raise ConfigurationError("proxy=: give http://HOST:PORT (colons escaped as \\:), or none")
        return ProxyConfig.parse(explicit, "proxy=")
    if environ is None:
        environ = os.environ
    names = ["https_proxy"] if secure else ["http_proxy"]
    names.append("all_proxy")
    for name in names:
        found = _env(environ, name)
        if name == "http_proxy" and found and found[0] == "HTTP_PROXY" and "REQUEST_METHOD" in environ:
            found = None
        if found is None:
            continue
        variable, value = found
        no_proxy = _env(environ, "no_proxy")
        if no_proxy is not None and _bypassed(relay_host, relay_port, no_proxy[1]):
            return None
        try:
            return ProxyConfig.parse(value, variable)
        except ConfigurationError as e:
            raise ConfigurationError(
                f"{e}; to connect directly instead, add the relay's host to NO_PROXY or pass proxy=none"
            ) from None
    return None


# -- the tunnel ----------------------------------------------------------------


def _ascii_host(host: str) -> str:
    """C{host} as ASCII for the wire: international names in IDNA form."""
    return host if host.isascii() else host.encode("idna").decode("ascii")


def _printable(data: bytes, limit: int = 100) -> str:
    text = data[:limit].decode("latin-1")
    return "".join(c if " " <= c <= "~" else "?" for c in text)


class _TunnelRequest(Protocol):
    """
    Speaks the CONNECT exchange on the TCP connection to the proxy, then
    hands the connection over to the caller's protocol and steps aside.
    """

    def __init__(self, attempt: _TunnelAttempt) -> None:
        self._attempt: _TunnelAttempt | None = attempt
        self._buffer = b""
        #: the caller's protocol, once the tunnel is open
        self.handedTo: Protocol | None = None

    def detach(self) -> None:
        """
        The attempt is over (tunnel open, failed or cancelled): report nothing
        more to it, so a late answer or loss cannot fire its result twice.
        """
        self._attempt = None

    def connectionMade(self) -> None:
        self._attempt.tcpConnected(self)

    def dataReceived(self, data: bytes) -> None:
        if self.handedTo is not None:
            # Only with a transport that has no C{protocol} to replace.
            self.handedTo.dataReceived(data)
            return
        if self._attempt is None:
            return
        self._buffer += data
        end = _HEADER_END.search(self._buffer, 0, MAX_RESPONSE_HEADER)
        if end is None:
            if len(self._buffer) >= MAX_RESPONSE_HEADER:
                self._buffer = b""
                self._attempt.responseTooLarge()
            return
        header, rest = self._buffer[: end.end()], self._buffer[end.end() :]
        self._buffer = b""
        self._attempt.responseReceived(header, rest)

    def connectionLost(self, reason: Failure) -> None:
        if self.handedTo is not None:
            self.handedTo.connectionLost(reason)
        elif self._attempt is not None:
            self._attempt.tcpLost(reason)


class _TunnelFactory(Factory):
    noisy = False

    def __init__(self, attempt: _TunnelAttempt) -> None:
        self._attempt = attempt

    def buildProtocol(self, addr) -> _TunnelRequest:
        return _TunnelRequest(self._attempt)


class _TunnelAttempt:
    """
    One C{connect()}: a small state machine.

     - C{tcp}: connecting to the proxy;
     - C{response}: CONNECT sent, reading the proxy's answer;
     - C{tunnel}: the proxy said 2xx; the caller's protocol owns the connection;
     - C{failed}: it failed or was cancelled; nothing more happens.

    The result Deferred fires exactly once, when leaving C{tcp} or
    C{response}.
    """

    def __init__(self, endpoint: ProxyTunnelEndpoint, factory) -> None:
        self._endpoint = endpoint
        self._factory = factory
        self._state = "tcp"
        self._request: _TunnelRequest | None = None
        self.result: Deferred = Deferred(self._cancel)
        proxy = endpoint.proxy
        connecting = tcp_endpoint(endpoint.reactor, proxy.host, proxy.port).connect(_TunnelFactory(self))
        connecting.addErrback(self._tcpFailed)
        self._connecting = connecting

    # events

    def tcpConnected(self, request: _TunnelRequest) -> None:
        if self._state != "tcp":  # cancelled while the connection was being made
            request.transport.abortConnection()
            return
        self._state = "response"
        self._request = request
        request.transport.write(self._endpoint.request())

    def _tcpFailed(self, failure: Failure) -> None:
        if self._state != "tcp":
            return None
        self._fail(
            f"could not connect to the HTTP proxy {self._endpoint.proxy.describe()}: {failure.getErrorMessage()} "
            "(the proxy, not the relay, is unreachable: check the proxy's address)"
        )
        return None

    def responseReceived(self, header: bytes, rest: bytes) -> None:
        if self._state != "response":
            return
        endpoint = self._endpoint
        status = _STATUS_LINE.match(header)
        if status is None:
            first = header.split(b"\n", 1)[0]
            self._fail(
                f"the HTTP proxy {endpoint.proxy.describe()} gave a malformed answer to CONNECT: {_printable(first)!r}"
            )
            return
        code = int(status.group(1))
        reason = _printable(status.group(2) or b"")
        if 200 <= code < 300:
            self._enterTunnel(rest)
        elif code in (401, 407):
            self._fail(endpoint.authenticationMessage(code, reason))
        else:
            self._fail(endpoint.refusalMessage(code, reason))

    def responseTooLarge(self) -> None:
        if self._state == "response":
            self._fail(
                f"the HTTP proxy {self._endpoint.proxy.describe()} sent a response header block "
                f"larger than {MAX_RESPONSE_HEADER} bytes to CONNECT; giving up on it"
            )

    def tcpLost(self, reason: Failure) -> None:
        if self._state == "response":
            self._fail(
                f"the HTTP proxy {self._endpoint.proxy.describe()} closed the connection before answering "
                f"CONNECT {self._endpoint.authority}"
            )

    # transitions

    def _enterTunnel(self, rest: bytes) -> None:
        request = self._request
        transport = request.transport
        self._state = "tunnel"
        self._request = None
        request.detach()
        try:
            protocol = self._factory.buildProtocol(self._endpoint.address)
            if protocol is None:
                raise ValueError(f"{self._factory!r} built no protocol for {self._endpoint.authority}")
            # From now on the transport delivers to the caller's protocol
            # directly (Twisted's TCP transport calls self.protocol.dataReceived
            # and .connectionLost): the tunnel request is out of the path.
            # A transport without .protocol keeps calling the request, which
            # then forwards.
            request.handedTo = protocol
            if hasattr(transport, "protocol"):
                transport.protocol = protocol
            protocol.makeConnection(transport)
        except Exception:
            self._state = "failed"
            failure = Failure()
            transport.abortConnection()
            self.result.errback(failure)
            return
        self.result.callback(protocol)
        if rest and not getattr(transport, "disconnected", False):
            protocol.dataReceived(rest)

    def _fail(self, message: str) -> None:
        request = self._request
        self._state = "failed"
        self._request = None
        if request is not None:
            request.detach()
            request.transport.abortConnection()
        self.result.errback(Failure(RelayUnreachableError(message)))

    def _cancel(self, result: Deferred) -> None:
        state, request = self._state, self._request
        self._state = "failed"
        self._request = None
        if request is not None:
            request.detach()
        if state == "tcp":
            self._connecting.cancel()  # its failure ends in _tcpFailed, ignored
        elif request is not None:
            request.transport.abortConnection()
        result.errback(Failure(ConnectingCancelledError(self._endpoint.address)))


@implementer(IStreamClientEndpoint)
class ProxyTunnelEndpoint:
    """
    Connects to C{host:port} through an HTTP proxy's C{CONNECT} tunnel.

    C{connect(factory)} opens TCP to the proxy, sends::

        CONNECT host:port HTTP/1.1
        Host: host:port
        Proxy-Authorization: Basic ...      (with credentials only)

    and on a 2xx answer gives the TCP connection to the protocol that
    C{factory} builds (the Deferred fires with it, as with
    C{HostnameEndpoint}); bytes that came after the proxy's header block
    are delivered to it. For TLS inside the tunnel (so the proxy sees only
    the host name) wrap this endpoint:
    C{wrapClientTLS(optionsForClientTLS(host), ProxyTunnelEndpoint(...))}.

    Failures are L{RelayUnreachableError}s saying whether the proxy could
    not be reached, wants credentials, or refused the tunnel (with its
    status); cancelling the Deferred aborts the connection and fails it
    with C{ConnectingCancelledError}.
    """

    def __init__(self, reactor, proxy: ProxyConfig, host: str, port: int) -> None:
        self.reactor = reactor
        self.proxy = proxy
        self.host = host
        self.port = port

    @property
    def authority(self) -> str:
        """The CONNECT target, C{host:port}."""
        return _authority(self.host, self.port)

    @property
    def address(self) -> HostnameAddress:
        """The tunnel's far end, as given to C{factory.buildProtocol}."""
        return HostnameAddress(_ascii_host(self.host).encode("ascii"), self.port)

    def request(self) -> bytes:
        """The CONNECT request's bytes."""
        if not self.host or _BAD_HOST.search(self.host.replace(":", "")) or not 0 < self.port < 65536:
            raise ValueError(f"not a host and port to CONNECT to: {self.authority!r}")
        authority = _authority(_ascii_host(self.host), self.port).encode("ascii")
        lines = [b"CONNECT " + authority + b" HTTP/1.1", b"Host: " + authority]
        authorization = self.proxy.authorization()
        if authorization is not None:
            lines.append(b"Proxy-Authorization: " + authorization)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def authenticationMessage(self, code: int, reason: str) -> str:
        proxy = self.proxy
        if proxy.source not in ("", "proxy="):
            variable = proxy.source
        else:
            variable = "HTTPS_PROXY (HTTP_PROXY for ws:// relays)"
        authority = _authority(proxy.host, proxy.port)
        escaped = authority.replace(":", "\\:")
        how = (
            f"give credentials as proxy=http\\://USER\\:PASSWORD@{escaped} in the endpoint string "
            f"or as http://USER:PASSWORD@{authority} in {variable} (percent-encode @ and : in them)"
        )
        status = f"{code} {reason}".strip()
        if proxy.username is None:
            return f"the HTTP proxy {proxy.describe()} requires authentication ({status}): {how}"
        return (
            f"the HTTP proxy {proxy.describe()} refused the credentials of user {proxy.username!r} "
            f"({status}): check the user name and password; {how}"
        )

    def refusalMessage(self, code: int, reason: str) -> str:
        status = f"{code} {reason}".strip()
        message = f"the HTTP proxy {self.proxy.describe()} refused to open a tunnel to {self.authority}: {status}"
        if code == 403:
            message += f" (its rules may not allow CONNECT to this host or to port {self.port})"
        elif code in (502, 503, 504):
            message += " (the proxy could not reach the relay)"
        return message

    def connect(self, protocolFactory) -> Deferred:
        """See L{IStreamClientEndpoint.connect}; never raises."""
        try:
            self.request()  # refuse an impossible target before any I/O
            return _TunnelAttempt(self, protocolFactory).result
        except BaseException:
            return fail()

    def __repr__(self) -> str:
        return f"ProxyTunnelEndpoint({self.proxy!r}, {self.authority!r})"
