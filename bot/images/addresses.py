"""Which hosts and addresses an image link may reach: public ones only, checked by name and at connect time.

A link is untrusted: it may point at the machine itself (`http://127.0.0.1:8080/admin`), the private network,
or the cloud metadata service (`http://169.254.169.254/`), directly, through DNS, or through a redirect. Two
checks close these:

1. Before each request (first URL and every redirect hop, `bot.images.fetch.ImageFetcher`): `check_host`
   refuses a reserved name (`localhost`, `*.internal`, single-label names, ...) and an IP literal that is not
   public (`is_public_address`).
2. At connect time: the session's connector (`PublicOnlyConnector`) resolves names through
   `PublicOnlyResolver`, which refuses the whole name if ANY address it resolves to is not public. The
   connector connects only to addresses this resolver returned, so a name that resolves to a public address
   when checked and a private one when connected (DNS rebinding) is impossible: there is one resolution, and
   it is the checked one.

`create_session` builds the one kind of session `ImageFetcher` accepts; `allow_private=True` exists only for
tests against loopback servers.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from bot.errors import UnsafeUrl

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BLOCKED_NAMES = frozenset(
    {
        "localhost",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data.ec2.internal",
    }
)
"""Names that point at this machine or a cloud metadata service whatever DNS says."""

_BLOCKED_SUFFIXES = (".localhost", ".internal", ".local", ".localdomain", ".home.arpa", ".lan", ".intranet")
"""Suffixes reserved for local networks (RFC 6761, 6762, 8375) or used by clouds for internal names."""

_HOSTNAME_RE = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)+$")
"""An IDNA-encoded DNS name with at least two labels: single-label names resolve through the local search
domain (intranet hosts, `metadata` on some clouds), never to a public site."""

_BLOCKED_NETWORKS: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        # IPv4
        "0.0.0.0/8",  # "this network", 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",  # private
        "100.64.0.0/10",  # carrier-grade NAT (cloud VPCs use it too)
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local, incl. 169.254.169.254 cloud metadata
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments (incl. 192.0.0.192 Oracle metadata)
        "192.0.2.0/24",  # documentation
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation
        "203.0.113.0/24",  # documentation
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, incl. 255.255.255.255 broadcast
        # IPv6
        "::/96",  # unspecified, loopback, deprecated IPv4-compatible forms
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments, incl. Teredo 2001::/32
        "2001:db8::/32",  # documentation
        "fc00::/7",  # unique local (private)
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routed by some stacks)
        "ff00::/8",  # multicast
    )
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def is_public_address(ip: IPAddress) -> bool:
    """True when `ip` is a globally routable unicast address, judged by its IPv4 form if it embeds one."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(ip)
        if embedded is not None:
            return is_public_address(embedded)
        if ip.scope_id:
            # A zone id only makes sense for link-scoped addresses.
            return False
    if any(ip in net for net in _BLOCKED_NETWORKS if net.version == ip.version):
        return False
    # The explicit list above is the policy; Python's flags are a second opinion that also follows
    # IANA registry updates.
    return ip.is_global and not (
        ip.is_multicast
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_reserved
        or ip.is_unspecified
    )


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    # ::ffff:127.0.0.1 (mapped), 2002:7f00:1:: (6to4) and 64:ff9b::7f00:1 (NAT64) all reach the IPv4
    # address inside them: judge that one.
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return None


def check_host(host: str) -> None:
    """Refuse a URL host (IDNA-encoded, IPv6 without brackets) that is not a public name or address.

    Names are checked for shape only here; their addresses are checked by `PublicOnlyResolver` when the
    connection is made.
    """
    host = host.lower()
    ip = _parse_ip_literal(host)
    if ip is not None:
        if not is_public_address(ip):
            raise UnsafeUrl(detail=f"address {ip} is not public")
        return
    name = host.removesuffix(".")
    if name in _BLOCKED_NAMES or name.endswith(_BLOCKED_SUFFIXES):
        raise UnsafeUrl(detail=f"reserved name {name}")
    if not _HOSTNAME_RE.match(name):
        raise UnsafeUrl(detail=f"not a public DNS name: {name[:100]!r}")


def _parse_ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if ":" in host:
        # Brackets/colons but not a valid IPv6 address: nothing legitimate looks like that.
        raise UnsafeUrl(detail="malformed IPv6 literal")
    # Legacy IPv4 spellings (2130706433, 0x7f.1, 0177.0.0.1, 127.1) that the C resolver accepts: read them
    # the way it will, so they are judged as the address they reach.
    if re.fullmatch(r"[0-9a-fx.]+", host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


class PublicOnlyResolver(AbstractResolver):
    """Resolves through `inner` and refuses a name when any address it resolves to is not public."""

    def __init__(self, inner: AbstractResolver | None = None, *, allow_private: bool = False) -> None:
        self._inner = inner
        self._allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            # Created lazily: ThreadedResolver binds the running loop, which may not exist at __init__.
            self._inner = aiohttp.ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        if self._allow_private:
            return results
        if not results:
            raise OSError(f"no addresses for {host}")
        for result in results:
            try:
                ip = ipaddress.ip_address(result["host"])
            except ValueError as exc:
                raise UnsafeUrl(detail=f"{host} resolved to an unparsable address") from exc
            if not is_public_address(ip):
                log.warning("refused host %s: resolves to non-public address %s", host, ip)
                raise UnsafeUrl(detail=f"{host} resolves to non-public address {ip}")
        return results

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


class PublicOnlyConnector(aiohttp.TCPConnector):
    """A TCPConnector whose every name resolution goes through `PublicOnlyResolver`."""

    def __init__(
        self, *, resolver: AbstractResolver | None = None, allow_private: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(resolver=PublicOnlyResolver(resolver, allow_private=allow_private), **kwargs)


def create_session(
    *, resolver: AbstractResolver | None = None, allow_private: bool = False, **kwargs: Any
) -> aiohttp.ClientSession:
    """A session fit for `ImageFetcher`: public-only connector, no proxy from the environment, no cookies.

    `resolver` replaces the system resolver under the public-only check (tests use it to control DNS).
    Extra keyword arguments go to `aiohttp.ClientSession` (e.g. `trace_configs`).
    """
    return aiohttp.ClientSession(
        connector=PublicOnlyConnector(resolver=resolver, allow_private=allow_private),
        # A proxy would resolve and connect on our behalf, past the resolver check.
        trust_env=False,
        # Links come from many users: one site must not see cookies another link set.
        cookie_jar=aiohttp.DummyCookieJar(),
        **kwargs,
    )
