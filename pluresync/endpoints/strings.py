"""
Checks on endpoint strings that Twisted's own parser does not make.

C{twisted.internet.endpoints.clientFromString} splits a string before any
plugin sees it, and two of its habits reach users as wrong errors: a
trailing backslash escapes nothing and ends its tokenizer with
C{RuntimeError: generator raised StopIteration}, and a parameter given twice
(C{keyfile=A:keyfile=B}) is taken silently, the last one winning.  The
plugin cannot tell either from the keyword arguments it gets, so
pluresync's own entry points (the C{pluresync} command, L{client_from_string},
L{server_from_string}) check the string first with L{check_endpoint_string}.
"""

from __future__ import annotations

from twisted.internet.endpoints import clientFromString, serverFromString

from pluresync.errors import ConfigurationError


def split_endpoint_string(description: str) -> tuple[list[str], dict[str, str]]:
    """
    Split C{description} as Twisted does (C{:} between pieces, C{=} between a
    name and its value, a backslash makes the next character literal), but
    refuse what Twisted mishandles.

    @return: the positional pieces (the prefix first) and the named ones.
    @raise ConfigurationError: (a C{ValueError}) for a trailing backslash or
        a parameter given more than once; the message names the parameter,
        never its value (it may be a secret).
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    pieces: list[list[str]] = [[""]]
    escaped = False
    for char in description:
        if escaped:
            pieces[-1][-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            pieces.append([""])
        elif char == "=" and len(pieces[-1]) == 1:
            pieces[-1].append("")
        else:
            pieces[-1][-1] += char
    if escaped:
        raise ConfigurationError(
            "the endpoint string ends with a backslash, which escapes nothing: "
            "write \\\\ for a backslash in a value, \\: for a colon"
        )
    for piece in pieces:
        if len(piece) == 1:
            args.append(piece[0])
        elif piece[0] in kwargs:
            raise ConfigurationError(f"the endpoint string gives {piece[0]}= more than once: give it once")
        else:
            kwargs[piece[0]] = piece[1]
    return args, kwargs


def check_endpoint_string(description: str) -> str:
    """L{split_endpoint_string}'s checks alone; returns C{description}."""
    split_endpoint_string(description)
    return description


def client_from_string(reactor, description: str):
    """C{clientFromString}, after L{check_endpoint_string}."""
    return clientFromString(reactor, check_endpoint_string(description))


def server_from_string(reactor, description: str):
    """C{serverFromString}, after L{check_endpoint_string}."""
    return serverFromString(reactor, check_endpoint_string(description))
