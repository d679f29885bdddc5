"""Coordinator URLs: ``etcd://host:port,host:port/namespace`` or
``zookeeper://...``, parsed and checked (``InvalidInput`` saying what is
wrong).  The backends and the factory in ``keepcount.coordination`` read them
from here (so no backend imports its own package).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from keepcount.errors import InvalidInput

__all__ = ["DEFAULT_NAMESPACE", "DEFAULT_PORTS", "CoordinatorURL", "parse_coordinator_url"]

DEFAULT_NAMESPACE = "default"
DEFAULT_PORTS = {"etcd": 2379, "zookeeper": 2181}
_NAMESPACE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_EXAMPLE = "e.g. etcd://127.0.0.1:2379,127.0.0.1:22379/myapp or zookeeper://127.0.0.1:2181/myapp"


@dataclass(frozen=True, slots=True)
class CoordinatorURL:
    """A parsed coordinator URL."""

    scheme: str
    """``etcd`` or ``zookeeper``."""
    endpoints: tuple[tuple[str, int], ...]
    """(host, port) in the order given; IPv6 hosts without brackets."""
    namespace: str

    @property
    def prefix(self) -> str:
        """Where this namespace's claims live: ``/keepcount/<namespace>/nodes``."""
        return f"/keepcount/{self.namespace}/nodes"

    def hostports(self) -> list[str]:
        """``host:port`` strings (IPv6 in brackets)."""
        return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.endpoints]

    def __str__(self) -> str:
        return f"{self.scheme}://{','.join(self.hostports())}/{self.namespace}"


def _bad(url: object, why: str) -> InvalidInput:
    return InvalidInput(f"invalid coordinator URL {url!r}: {why} ({_EXAMPLE})")


def _endpoint(url: str, item: str, default_port: int) -> tuple[str, int]:
    if not item:
        raise _bad(url, "empty host in the host list")
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        if not sep:
            raise _bad(url, f"unclosed '[' in {item!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise _bad(url, f"{host!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise _bad(url, f"unexpected {rest!r} after ']' in {item!r}")
        port_text = rest[1:] if rest else None
    else:
        if item.count(":") > 1:
            raise _bad(url, f"IPv6 address {item!r} must be in brackets, e.g. [::1]:2379")
        host, sep, port_text_ = item.partition(":")
        port_text = port_text_ if sep else None
        if not _HOSTNAME.fullmatch(host):
            raise _bad(url, f"{host!r} is not a host name or address")
    if port_text is None:
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"port {port_text!r} of {item!r} is not a number in 1-65535")
    return host, int(port_text)


def parse_coordinator_url(url: str) -> CoordinatorURL:
    """Split a coordinator URL; ``InvalidInput`` saying what is wrong with it."""
    if not isinstance(url, str) or "://" not in url:
        raise _bad(url, "expected scheme://host:port,...[/namespace]")
    scheme, rest = url.split("://", 1)
    if scheme not in DEFAULT_PORTS:
        raise _bad(url, f"unknown scheme {scheme!r}; known: etcd, zookeeper")
    if any(c in rest for c in "?#@ "):
        raise _bad(url, "query strings, fragments, credentials and spaces are not supported")
    hosts, _, namespace = rest.partition("/")
    if not hosts:
        raise _bad(url, "no host given")
    if namespace == "":
        namespace = DEFAULT_NAMESPACE
    elif not _NAMESPACE.fullmatch(namespace):
        raise _bad(
            url,
            f"namespace {namespace!r} must be 1-63 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit",
        )
    endpoints = tuple(_endpoint(url, item, DEFAULT_PORTS[scheme]) for item in hosts.split(","))
    if len(set(endpoints)) != len(endpoints):
        raise _bad(url, "a host is listed twice")
    return CoordinatorURL(scheme, endpoints, namespace)
