"""Where a request goes: authority parsing and upstream URLs. Pure functions.

The rule that matters: inside an intercepted tunnel the CONNECT target is the
only authority. A Host header or absolute-form target that names another host
is refused (421), never followed, so a caller cannot steer a credential that
sidekey attaches for one provider to another host.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping

from proxy.errors import BadRequest
from proxy.policy import Provider, normalize_host

_HOST = re.compile(r"[A-Za-z0-9._\-]{1,253}\Z")
DEFAULT_PORTS = {"https": 443, "http": 80}


def _valid_host(host: str) -> bool:
    if _HOST.match(host):
        return True
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def parse_authority(authority: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port`` (RFC 9112 §3.2.3 authority-form) or ``[v6]:port``."""
    if "@" in authority:
        raise BadRequest(reason="userinfo is not allowed in an authority")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise BadRequest(reason="invalid IPv6 authority")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise BadRequest(reason="invalid authority")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = authority.rpartition(":") if ":" in authority else (authority, "", "")
    if not port_text:
        if default_port is None:
            raise BadRequest(reason="CONNECT target needs host:port")
        port = default_port
    elif port_text.isascii() and port_text.isdigit() and 0 < int(port_text) < 65536:  # isdigit() alone takes "²"
        port = int(port_text)
    else:
        raise BadRequest(reason="invalid port")
    host = normalize_host(host)
    if not host or not _valid_host(host):
        raise BadRequest(reason="invalid host")
    return host, port


def split_absolute(uri: str) -> tuple[str, str, int, str]:
    """``scheme://authority/path?query`` to (scheme, host, port, origin-form)."""
    scheme, sep, rest = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise BadRequest(reason="request target must be http:// or https:// absolute-form")
    cut = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < cut:
            cut = i
    authority, path = rest[:cut], rest[cut:]
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path
    host, port = parse_authority(authority, DEFAULT_PORTS[scheme])
    return scheme, host, port, path


def authority_matches(value: str, host: str, port: int, default_port: int = 443) -> bool:
    """Does a Host header / URI authority name exactly the CONNECT target?"""
    try:
        h, p = parse_authority(value, default_port)
    except BadRequest:
        return False
    return h == host and p == port


def format_authority(host: str, port: int, scheme: str = "https") -> str:
    shown = f"[{host}]" if ":" in host else host
    return shown if DEFAULT_PORTS.get(scheme) == port else f"{shown}:{port}"


def upstream_url(provider: Provider | None, scheme: str, host: str, port: int, path: str) -> str:
    """The URL the forwarder uses. Providers always go over https; only an
    unmatched plain-HTTP request (no credential attached) keeps ``http``."""
    if provider is None:
        return f"{scheme}://{format_authority(host, port, scheme)}{path}"
    up = provider.upstream
    if up is None:
        return f"https://{format_authority(host, port)}{path}"
    return f"https://{format_authority(up.host, up.port)}{up.path_prefix}{path}"


def caller_name(headers: Mapping[str, str], caller_header: str | None, proxy_user: str | None) -> str | None:
    """The caller named by the policy's header, else by the Proxy-Authorization
    user (the CONNECT's, or this request's); None: the client address names it.
    Only printable ASCII, at most 64 characters (it is a key in limit state)."""
    name = headers.get(caller_header) if caller_header else None
    if name is None:
        name = proxy_user or basic_user(headers.get("proxy-authorization"))
    if not name:
        return None
    name = "".join(c for c in name[:64] if " " < c <= "~")
    return name or None


def basic_user(value: str | None) -> str | None:
    """The user of ``Basic base64(user:password)``; never the password."""
    if not value or value[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None
