"""Downloading images from links in messages: public addresses only, bounded in time and bytes.

A link is untrusted: it may point at the machine itself (`http://127.0.0.1:8080/admin`), the private network,
or the cloud metadata service (`http://169.254.169.254/`), directly, through DNS, or through a redirect. Two
checks close these:

1. Before each request (first URL and every redirect hop): the scheme is http/https, the host is not a
   reserved name (`localhost`, `*.internal`, single-label names, ...), and an IP literal is public.
2. At connect time: the session's connector resolves names through `PublicOnlyResolver`, which refuses the
   whole name if ANY address it resolves to is not public. The connector connects only to addresses this
   resolver returned, so a name that resolves to a public address when checked and a private one when
   connected (DNS rebinding) is impossible: there is one resolution, and it is the checked one.

The session must therefore come from `create_session` (or `ImageFetcher.open`); a session with another
connector is refused unless `allow_private=True`, which exists only for tests against loopback servers.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from bot.errors import (
    FetchFailed,
    FetchTimeout,
    ImageTooLarge,
    NotAnImage,
    UnsafeUrl,
    UserInputError,
)
from bot.images.check import ImageLimits

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_REDIRECTS = 3
"""Redirects followed per link; each hop is checked like the first URL."""

_CHUNK = 64 * 1024
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_ALLOWED_SCHEMES = frozenset({"http", "https"})

_REQUEST_HEADERS = {
    "User-Agent": "idefics-bot (image fetch)",
    "Accept": "image/*",
    # Images gain nothing from gzip, and identity keeps Content-Length the real size we cap.
    "Accept-Encoding": "identity",
}

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


class ImageFetcher:
    """Downloads the bytes behind a link, within `limits.max_bytes` and `limits.timeout_s`.

    Give it a session from `create_session` (owned by `main()`), or None to let it make and own one (close
    it with `aclose`, or use `ImageFetcher.open`). The bytes still need `check_image`.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession | None,
        limits: ImageLimits,
        *,
        allow_private: bool = False,
    ) -> None:
        if session is not None and not allow_private:
            if not isinstance(session.connector, PublicOnlyConnector) or session.trust_env:
                raise TypeError("ImageFetcher needs a session from bot.images.fetch.create_session()")
        self._session = session
        self._owns_session = session is None
        self._limits = limits
        self._allow_private = allow_private

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        limits: ImageLimits,
        *,
        allow_private: bool = False,
        resolver: AbstractResolver | None = None,
    ) -> AsyncIterator[ImageFetcher]:
        """A fetcher with its own session, closed on exit (terminal commands, tests)."""
        session = create_session(resolver=resolver, allow_private=allow_private)
        try:
            yield cls(session, limits, allow_private=allow_private)
        finally:
            await session.close()

    async def aclose(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> bytes:
        """Download `url`; raise `FetchError` (or `ImageTooLarge`/`NotAnImage`) for anything wrong."""
        started = time.monotonic()
        state = _FetchState()
        try:
            async with asyncio.timeout(self._limits.timeout_s):
                data = await self._fetch(url, state)
        except TimeoutError as exc:
            # From asyncio.timeout (whole fetch) or aiohttp's own timeout: both are "too slow".
            log.info("fetch timed out: host %s after %.1f s", state.host, time.monotonic() - started)
            raise FetchTimeout(detail=f"host {state.host} after {self._limits.timeout_s} s") from exc
        log.info(
            "fetched %d bytes from %s in %.0f ms (%d redirects)",
            len(data),
            state.host,
            (time.monotonic() - started) * 1000,
            state.redirects,
        )
        return data

    async def _fetch(self, url: str, state: _FetchState) -> bytes:
        current = self._parse(url)
        session = self._get_session()
        timeout = aiohttp.ClientTimeout(total=self._limits.timeout_s)
        while True:
            self._check_url(current)
            state.host = current.raw_host or "?"
            try:
                async with session.get(
                    current, allow_redirects=False, timeout=timeout, headers=_REQUEST_HEADERS
                ) as resp:
                    if resp.status in _REDIRECT_STATUSES:
                        if state.redirects >= MAX_REDIRECTS:
                            raise FetchFailed(
                                "the link redirects too many times",
                                status=resp.status,
                                detail=f"more than {MAX_REDIRECTS} redirects, last host {state.host}",
                            )
                        current = self._next_hop(resp)
                        state.redirects += 1
                        continue
                    if not 200 <= resp.status < 300:
                        raise FetchFailed(status=resp.status, detail=f"host {state.host}")
                    return await self._read_body(resp, state)
            except (UserInputError, TimeoutError):
                raise
            except aiohttp.ClientResponseError as exc:
                # Only when the session was made with raise_for_status=True.
                raise FetchFailed(status=exc.status, detail=f"host {state.host}") from exc
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise FetchFailed(detail=f"host {state.host}: {type(exc).__name__}") from exc

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = create_session(allow_private=self._allow_private)
        return self._session

    def _parse(self, url: str) -> URL:
        try:
            parsed = URL(url.strip())
        except (ValueError, TypeError) as exc:
            raise UnsafeUrl("that is not a valid link", detail="unparsable URL") from exc
        return parsed

    def _check_url(self, url: URL) -> None:
        if url.scheme not in _ALLOWED_SCHEMES:
            raise UnsafeUrl("only http and https links can be downloaded", detail=f"scheme {url.scheme!r}")
        host = url.raw_host
        if not host:
            raise UnsafeUrl("that is not a valid link", detail="no host")
        if not self._allow_private:
            check_host(host)

    def _next_hop(self, resp: aiohttp.ClientResponse) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise FetchFailed(status=resp.status, detail="redirect without Location")
        try:
            # Relative locations are resolved against the URL that answered, as browsers do.
            return resp.url.join(URL(location))
        except ValueError as exc:
            raise FetchFailed(status=resp.status, detail="unparsable redirect Location") from exc

    async def _read_body(self, resp: aiohttp.ClientResponse, state: _FetchState) -> bytes:
        max_bytes = self._limits.max_bytes
        declared = resp.content_length
        if declared is not None and declared > max_bytes:
            resp.close()  # drop the connection rather than drain a body we will not use
            raise ImageTooLarge(max_bytes, detail=f"host {state.host} declared {declared} bytes")
        if resp.content_type.startswith("text/"):
            resp.close()
            raise NotAnImage("that link does not point to an image", detail=f"type {resp.content_type}")
        # Read at most max_bytes + 1: one byte over the cap is proof enough, the rest is never read.
        cap = max_bytes + 1
        body = bytearray()
        while len(body) < cap:
            chunk = await resp.content.read(min(_CHUNK, cap - len(body)))
            if not chunk:
                break
            body += chunk
        if len(body) > max_bytes:
            resp.close()
            raise ImageTooLarge(max_bytes, detail=f"host {state.host} sent more than {max_bytes} bytes")
        return bytes(body)


@dataclass
class _FetchState:
    """What one fetch has reached so far, for logs and error details."""

    host: str = "?"
    """Host of the hop in progress (never the full URL: paths and queries may carry tokens)."""
    redirects: int = 0
    """Redirects followed so far."""


_LINK_RE = re.compile(r"https?://[^\s<>`|\"]+", re.IGNORECASE)
_TRAILING_PUNCTUATION = ".,;:!?'*_~"
_CLOSERS = {")": "(", "]": "[", "}": "{"}


def find_image_links(text: str, limit: int) -> list[str]:
    """Direct http(s) links in message text, in order, without duplicates, at most `limit`.

    Every link is returned, whatever its file name: whether it is an image is decided by its content
    (`check_image`), and many image links have no extension. Discord's `<https://...>` (no embed) and
    `||...||` (spoiler) wrappers and trailing sentence punctuation are not part of the link.
    """
    if limit <= 0:
        return []
    links: list[str] = []
    seen: set[str] = set()
    for match in _LINK_RE.finditer(text):
        link = _trim(match.group(0))
        if link in seen or not _has_host(link):
            continue
        seen.add(link)
        links.append(link)
        if len(links) >= limit:
            break
    return links


def _trim(link: str) -> str:
    # Strip sentence punctuation and unbalanced closing brackets from the end: "(see https://x/a.png)."
    # ends the link at ".png", while "https://en.wikipedia.org/wiki/Foo_(bar)" keeps its ")".
    while link:
        last = link[-1]
        if last in _TRAILING_PUNCTUATION:
            link = link[:-1]
        elif last in _CLOSERS and link.count(last) > link.count(_CLOSERS[last]):
            link = link[:-1]
        else:
            break
    return link


def _has_host(link: str) -> bool:
    try:
        return bool(URL(link).raw_host)
    except ValueError:
        return False
