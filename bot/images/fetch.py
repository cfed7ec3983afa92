"""Downloading images from links in messages: public addresses only, bounded in time and bytes.

A link is untrusted: it may point at the machine itself (`http://127.0.0.1:8080/admin`), the private network,
or the cloud metadata service (`http://169.254.169.254/`), directly, through DNS, or through a redirect. Two
checks close these:

1. Before each request (first URL and every redirect hop): the scheme is http/https, and the host passes
   `bot.images.addresses.check_host` (not a reserved name; an IP literal is public).
2. At connect time: the session's connector resolves names through `bot.images.addresses.PublicOnlyResolver`,
   which refuses the whole name if ANY address it resolves to is not public, and connects only to the
   addresses it checked (no DNS rebinding).

The session must therefore come from `bot.images.addresses.create_session` (or `ImageFetcher.open`); a session
with another connector is refused unless `allow_private=True`, which exists only for tests against loopback
servers. Links are found in text by `bot.images.links.find_image_links`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from aiohttp.abc import AbstractResolver
from yarl import URL

from bot.errors import (
    FetchFailed,
    FetchTimeout,
    ImageTooLarge,
    NotAnImage,
    UnsafeUrl,
    UserInputError,
)
from bot.images.addresses import PublicOnlyConnector, check_host, create_session
from bot.images.check import ImageLimits

log = logging.getLogger(__name__)

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
                raise TypeError("ImageFetcher needs a session from bot.images.addresses.create_session()")
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
