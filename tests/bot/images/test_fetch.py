"""ImageFetcher against loopback aiohttp servers; no test touches a real network or real DNS."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

import bot.images.addresses
from bot.errors import (
    FetchFailed,
    FetchTimeout,
    ImageTooLarge,
    NotAnImage,
    UnsafeUrl,
    UserInputError,
)
from bot.images.addresses import create_session, is_public_address
from bot.images.check import ImageLimits, check_image
from bot.images.fetch import ImageFetcher
from tests.fakes.images import encode

PNG = encode(Image.new("RGB", (8, 8), (255, 0, 0)), "PNG")
FAST = ImageLimits(timeout_s=0.5, max_bytes=256 * 1024)


@dataclass
class Server:
    """A loopback server: its base URL, and what reached it."""

    host: str
    port: int
    hits: list[str] = field(default_factory=list)
    streamed: list[int] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"http://{self.host}:{self.port}{path}"


def build_app(server: Server) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def never(request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response(body=PNG)

    async def stalls_mid_body(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        await resp.write(PNG[:10])
        await asyncio.sleep(60)
        return resp

    async def endless(request: web.Request) -> web.StreamResponse:
        # No Content-Length: only counting while reading can stop this.
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        await resp.prepare(request)
        sent = 0
        try:
            while sent < 500 * 1024 * 1024:
                await resp.write(b"\0" * 65536)
                sent += 65536
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        finally:
            server.streamed.append(sent)
        return resp

    async def declared_huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(10**9)})
        await resp.prepare(request)
        try:
            await resp.write(b"\0" * 1024)
            await asyncio.sleep(60)
        except (ConnectionError, asyncio.CancelledError):
            pass
        return resp

    async def missing(request: web.Request) -> web.Response:
        return web.Response(status=404, text="no")

    async def html(request: web.Request) -> web.Response:
        return web.Response(text="<html>a page</html>", content_type="text/html")

    async def redirect(request: web.Request) -> web.Response:
        # /redirect/N redirects N times before the image.
        n = int(request.match_info["n"])
        target = "/ok.png" if n <= 1 else f"/redirect/{n - 1}"
        raise web.HTTPFound(target)

    async def redirect_to(request: web.Request) -> web.Response:
        raise web.HTTPFound(request.query["to"])

    @web.middleware
    async def count(request: web.Request, handler: Callable) -> web.StreamResponse:
        server.hits.append(request.path)
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.router.add_get("/ok.png", ok)
    app.router.add_get("/never", never)
    app.router.add_get("/stalls", stalls_mid_body)
    app.router.add_get("/endless", endless)
    app.router.add_get("/declared-huge", declared_huge)
    app.router.add_get("/missing", missing)
    app.router.add_get("/page", html)
    app.router.add_get("/redirect/{n}", redirect)
    app.router.add_get("/redirect-to", redirect_to)
    return app


async def start_server(host: str, port: int = 0) -> tuple[Server, web.AppRunner]:
    server = Server(host=host, port=port)
    runner = web.AppRunner(build_app(server), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server.port = runner.addresses[0][1]
    return server, runner


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    srv, runner = await start_server("127.0.0.1")
    yield srv
    await runner.cleanup()


@pytest.fixture
async def fetcher() -> AsyncIterator[ImageFetcher]:
    async with ImageFetcher.open(FAST, allow_private=True) as f:
        yield f


class FakeResolver(AbstractResolver):
    """DNS we control: name -> addresses. Unknown names fail like NXDOMAIN."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.asked.append(host)
        if host not in self.table:
            raise OSError(f"NXDOMAIN {host}")
        return [
            ResolveResult(
                hostname=host,
                host=addr,
                port=port,
                family=socket.AF_INET6 if ":" in addr else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for addr in self.table[host]
        ]

    async def close(self) -> None:
        pass


@dataclass
class Traced:
    """Counts what the client did: requests started, connections opened."""

    requests: int = 0
    connections: int = 0

    def config(self) -> aiohttp.TraceConfig:
        async def on_request(session: object, ctx: SimpleNamespace, params: object) -> None:
            self.requests += 1

        async def on_connection(session: object, ctx: SimpleNamespace, params: object) -> None:
            self.connections += 1

        tc = aiohttp.TraceConfig()
        tc.on_request_start.append(on_request)
        tc.on_connection_create_end.append(on_connection)
        return tc


@pytest.fixture
def traced() -> Traced:
    return Traced()


def make_resolver(server: Server) -> FakeResolver:
    del server  # names map to addresses only; the port comes from the URL
    return FakeResolver(
        {
            "loopback.example": ["127.0.0.1"],
            "loopback6.example": ["::1"],
            "private.example": ["10.0.0.7"],
            "metadata.example": ["169.254.169.254"],
            # One public and one loopback address: EVERY address must be public.
            "mixed.example": ["93.184.215.14", "127.0.0.1"],
            "mapped.example": ["::ffff:127.0.0.1"],
        }
    )


@pytest.fixture
def resolver(server: Server) -> FakeResolver:
    return make_resolver(server)


@pytest.fixture
async def safe_fetcher(resolver: FakeResolver, traced: Traced) -> AsyncIterator[ImageFetcher]:
    session = create_session(resolver=resolver, trace_configs=[traced.config()])
    async with session:
        yield ImageFetcher(session, FAST)


# --- good and bad answers from a loopback server (allow_private=True) ---------------------------------


async def test_good_image(fetcher: ImageFetcher, server: Server) -> None:
    data = await fetcher.fetch(server.url("/ok.png"))
    assert data == PNG
    assert check_image(data, FAST).width == 8


async def test_server_that_never_answers_times_out_quickly(fetcher: ImageFetcher, server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(FetchTimeout) as info:
        await fetcher.fetch(server.url("/never"))
    assert time.monotonic() - started < 2.0
    assert info.value.user_message == "the image download took too long"


async def test_timeout_covers_the_body(fetcher: ImageFetcher, server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(FetchTimeout):
        await fetcher.fetch(server.url("/stalls"))
    assert time.monotonic() - started < 2.0


async def test_connect_that_never_completes_times_out(server: Server) -> None:
    # A listening socket with a full backlog never accepts; the total timeout must still hold.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    try:
        port = listener.getsockname()[1]
        async with ImageFetcher.open(ImageLimits(timeout_s=0.3), allow_private=True) as f:
            started = time.monotonic()
            with pytest.raises((FetchTimeout, FetchFailed)):
                await f.fetch(f"http://127.0.0.1:{port}/x.png")
            assert time.monotonic() - started < 2.0
    finally:
        listener.close()


async def test_body_over_the_cap_is_cut_early(fetcher: ImageFetcher, server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLarge) as info:
        await fetcher.fetch(server.url("/endless"))
    assert time.monotonic() - started < 2.0
    assert info.value.user_message == "the image is too large (max 0.2 MB)"
    for _ in range(50):  # the server notices the closed connection shortly after
        if server.streamed:
            break
        await asyncio.sleep(0.02)
    # 500 MB were on offer; only what sat in socket buffers left the server.
    assert server.streamed and server.streamed[0] < 64 * 1024 * 1024


async def test_declared_length_over_the_cap_is_refused_before_reading(
    fetcher: ImageFetcher, server: Server
) -> None:
    started = time.monotonic()
    with pytest.raises(ImageTooLarge):
        await fetcher.fetch(server.url("/declared-huge"))
    assert time.monotonic() - started < 0.4  # did not wait for the body


async def test_not_found(fetcher: ImageFetcher, server: Server) -> None:
    with pytest.raises(FetchFailed) as info:
        await fetcher.fetch(server.url("/missing"))
    assert info.value.status == 404
    assert info.value.user_message == "the image could not be downloaded (HTTP 404)"


async def test_html_page_is_not_an_image(fetcher: ImageFetcher, server: Server) -> None:
    with pytest.raises(NotAnImage) as info:
        await fetcher.fetch(server.url("/page"))
    assert info.value.user_message == "that link does not point to an image"


async def test_three_redirects_are_followed(fetcher: ImageFetcher, server: Server) -> None:
    assert await fetcher.fetch(server.url("/redirect/3")) == PNG
    assert server.hits == ["/redirect/3", "/redirect/2", "/redirect/1", "/ok.png"]


async def test_more_than_three_redirects_refused(fetcher: ImageFetcher, server: Server) -> None:
    with pytest.raises(FetchFailed) as info:
        await fetcher.fetch(server.url("/redirect/4"))
    assert info.value.user_message == "the link redirects too many times"
    assert "/ok.png" not in server.hits
    assert len(server.hits) == 4


async def test_redirect_to_another_scheme_refused(fetcher: ImageFetcher, server: Server) -> None:
    with pytest.raises(UnsafeUrl):
        await fetcher.fetch(server.url("/redirect-to?to=file:///etc/passwd"))


async def test_connection_refused_is_fetch_failed(fetcher: ImageFetcher) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    with pytest.raises(FetchFailed) as info:
        await fetcher.fetch(f"http://127.0.0.1:{port}/x.png")
    assert info.value.user_message == "the image could not be downloaded"


async def test_fetcher_owning_its_session(server: Server) -> None:
    f = ImageFetcher(None, FAST, allow_private=True)
    try:
        assert await f.fetch(server.url("/ok.png")) == PNG
    finally:
        await f.aclose()


async def test_logs_carry_host_not_url(
    fetcher: ImageFetcher, server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="bot.images.fetch")
    await fetcher.fetch(server.url("/ok.png?token=SECRET123"))
    with pytest.raises(FetchFailed) as info:
        await fetcher.fetch(server.url("/missing?token=SECRET123"))
    assert "127.0.0.1" in caplog.text
    assert "SECRET123" not in caplog.text
    assert "SECRET123" not in str(info.value) and "SECRET123" not in info.value.user_message


# --- unsafe targets (allow_private=False) -------------------------------------------------------------


UNSAFE_LITERALS = [
    "http://127.0.0.1:{port}/ok.png",
    "http://127.8.9.10:{port}/ok.png",
    "http://10.0.0.1:{port}/ok.png",
    "http://192.168.1.1:{port}/ok.png",
    "http://172.16.0.1:{port}/ok.png",
    "http://172.31.255.255/ok.png",
    "http://169.254.169.254/latest/meta-data/",
    "http://[::1]:{port}/ok.png",
    "http://[fe80::1]/ok.png",
    "http://[fe80::1%25eth0]/ok.png",
    "http://[::ffff:127.0.0.1]:{port}/ok.png",
    "http://[::ffff:169.254.169.254]/",
    "http://[::ffff:10.0.0.1]/",
    "http://[64:ff9b::7f00:1]/",  # NAT64 form of 127.0.0.1
    "http://[2002:7f00:1::]/",  # 6to4 form of 127.0.0.1
    "http://[fc00::1]/",
    "http://[fd12:3456::1]/",
    "http://[ff02::1]/",
    "http://[::]:{port}/",
    "http://100.64.0.1/ok.png",
    "http://100.127.255.254/ok.png",
    "http://0.0.0.0:{port}/ok.png",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://255.255.255.255/",
    "http://2130706433:{port}/ok.png",  # 127.0.0.1 as one number
    "http://0x7f.1:{port}/ok.png",
    "http://0177.0.0.1:{port}/ok.png",
    "http://127.1:{port}/ok.png",
    "http://localhost:{port}/ok.png",
    "http://LOCALHOST:{port}/ok.png",
    "http://localhost.:{port}/ok.png",
    "http://app.localhost:{port}/ok.png",
    "http://metadata.google.internal/computeMetadata/v1/",
    "http://metadata/computeMetadata/v1/",
    "http://printer.local/",
    "http://intranet:{port}/ok.png",
    "https://127.0.0.1:{port}/ok.png",
]


@pytest.mark.parametrize("template", UNSAFE_LITERALS)
async def test_unsafe_hosts_refused_before_any_request(
    template: str, safe_fetcher: ImageFetcher, resolver: FakeResolver, server: Server, traced: Traced
) -> None:
    with pytest.raises(UnsafeUrl) as info:
        await safe_fetcher.fetch(template.format(port=server.port))
    assert info.value.user_message == "that link is not allowed"
    assert traced.requests == 0 and traced.connections == 0
    assert resolver.asked == []
    assert server.hits == []


@pytest.mark.parametrize(
    "name",
    [
        "loopback.example",
        "loopback6.example",
        "private.example",
        "metadata.example",
        "mixed.example",
        "mapped.example",
    ],
)
async def test_names_resolving_to_unsafe_addresses_refused_without_connecting(
    name: str, safe_fetcher: ImageFetcher, resolver: FakeResolver, server: Server, traced: Traced
) -> None:
    with pytest.raises(UnsafeUrl):
        await safe_fetcher.fetch(f"http://{name}:{server.port}/ok.png")
    assert resolver.asked == [name]  # refused by the connect-time check, on the addresses it would use
    assert traced.connections == 0
    assert server.hits == []


async def test_system_resolver_results_are_checked_too(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The default (threaded getaddrinfo) path: a name we make resolve to loopback through getaddrinfo.
    real = socket.getaddrinfo
    asked: list[str] = []

    def fake_getaddrinfo(host: str, port: object, *args: object, **kwargs: object) -> list:
        if host == "rebind.example":
            asked.append(host)
            return real("127.0.0.1", port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "unknown name in this test")

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    async with ImageFetcher.open(FAST) as f:
        with pytest.raises(UnsafeUrl):
            await f.fetch(f"http://rebind.example:{server.port}/ok.png")
    assert asked == ["rebind.example"]
    assert server.hits == []


async def test_public_name_redirecting_to_loopback_refused(
    server: Server, traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    # "public.example" is served from 127.0.0.2, which this test (only) treats as a public address; it
    # redirects to the real loopback server, which must never be contacted.
    monkeypatch.setattr(
        bot.images.addresses, "is_public_address", lambda ip: str(ip) == "127.0.0.2" or is_public_address(ip)
    )
    front, runner = await start_server("127.0.0.2")
    try:
        resolver = FakeResolver({"public.example": ["127.0.0.2"], "loopback.example": ["127.0.0.1"]})
        async with create_session(resolver=resolver, trace_configs=[traced.config()]) as session:
            f = ImageFetcher(session, FAST)
            for target in (
                server.url("/ok.png"),
                f"http://loopback.example:{server.port}/ok.png",
                f"http://localhost:{server.port}/ok.png",
                f"http://[::ffff:127.0.0.1]:{server.port}/ok.png",
            ):
                with pytest.raises(UnsafeUrl):
                    await f.fetch(f"http://public.example:{front.port}/redirect-to?to={target}")
        assert front.hits == ["/redirect-to"] * 4
        assert server.hits == []
    finally:
        await runner.cleanup()


async def test_redirect_chain_through_public_hops_works(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same pretend-public address: the safe path really fetches when every hop is allowed.
    monkeypatch.setattr(
        bot.images.addresses, "is_public_address", lambda ip: str(ip) == "127.0.0.2" or is_public_address(ip)
    )
    front, runner = await start_server("127.0.0.2")
    try:
        resolver = FakeResolver({"public.example": ["127.0.0.2"]})
        async with create_session(resolver=resolver) as session:
            data = await ImageFetcher(session, FAST).fetch(f"http://public.example:{front.port}/redirect/2")
        assert data == PNG
    finally:
        await runner.cleanup()


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/cat.png",
        "data:image/png;base64,iVBORw0KGgo=",
        "javascript:alert(1)",
        "gopher://example.com/",
        "//example.com/cat.png",
        "example.com/cat.png",
        "",
    ],
)
async def test_other_schemes_refused(url: str, safe_fetcher: ImageFetcher, traced: Traced) -> None:
    with pytest.raises(UnsafeUrl) as info:
        await safe_fetcher.fetch(url)
    assert info.value.user_message in (
        "only http and https links can be downloaded",
        "that is not a valid link",
    )
    assert traced.requests == 0


async def test_unknown_name_is_fetch_failed(safe_fetcher: ImageFetcher) -> None:
    with pytest.raises(FetchFailed):
        await safe_fetcher.fetch("http://does-not-exist.example/cat.png")


async def test_session_without_the_public_only_connector_is_refused() -> None:
    async with aiohttp.ClientSession() as plain:
        with pytest.raises(TypeError):
            ImageFetcher(plain, FAST)
        ImageFetcher(plain, FAST, allow_private=True)  # tests only


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("1.1.1.1", True),
        ("2606:4700:4700::1111", True),
        ("::ffff:1.1.1.1", True),
        ("64:ff9b::101:101", True),  # NAT64 of 1.1.1.1
        ("127.0.0.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("192.0.0.192", False),
        ("198.18.0.1", False),
        ("::1", False),
        ("::", False),
        ("::127.0.0.1", False),
        ("fe80::1", False),
        ("fec0::1", False),
        ("2001:db8::1", False),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("ff0e::1", False),
    ],
)
def test_is_public_address(address: str, public: bool) -> None:
    import ipaddress

    assert is_public_address(ipaddress.ip_address(address)) is public


def test_fetch_errors_are_user_input_errors() -> None:
    for err in (UnsafeUrl(), FetchTimeout(), FetchFailed(status=500), FetchFailed()):
        assert isinstance(err, UserInputError)
        assert 0 < len(err.user_message) <= 80


class RebindingResolver(FakeResolver):
    """First answer pretend-public, every later answer loopback: the classic DNS-rebinding attack."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        self.table = {host: ["127.0.0.2" if not self.asked else "127.0.0.1"]}
        return await super().resolve(host, port, family)


async def test_dns_rebinding_cannot_switch_the_connected_address(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A check-then-connect design resolves twice (check: public, connect: loopback). Here the one
    # resolution the connector uses is the checked one, so the loopback server is never reached.
    monkeypatch.setattr(
        bot.images.addresses, "is_public_address", lambda ip: str(ip) == "127.0.0.2" or is_public_address(ip)
    )
    # Same port on both addresses, so a second resolution would land on the loopback server.
    front, runner = await start_server("127.0.0.2", server.port)
    try:
        resolver = RebindingResolver({})
        async with create_session(resolver=resolver) as session:
            assert (
                await ImageFetcher(session, FAST).fetch(f"http://rebind.example:{server.port}/ok.png") == PNG
            )
        assert resolver.asked == ["rebind.example"]
        assert front.hits == ["/ok.png"]
        assert server.hits == []
    finally:
        await runner.cleanup()
