"""A mention whose text links to private, loopback, link-local or metadata addresses: through the real bot
with the production downloader (public addresses only), nothing is fetched, the message is stored, and its
author gets one short reply. The downloader's own refusals (redirects, DNS names, rebinding, schemes) are
tested in tests/bot/images/test_fetch.py."""

from __future__ import annotations

from aiohttp import web

from bot.images.addresses import create_session
from bot.images.fetch import ImageFetcher
from tests.bot.discord_app.conftest import answer_to, run_bot


async def test_private_links_in_a_mention_are_not_fetched(fake_discord, bot_settings, services_factory) -> None:
    hits: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=b"\x89PNG\r\n\x1a\n", content_type="image/png")

    app = web.Application()
    app.router.add_get("/{tail:.*}", anything)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    world = fake_discord.world
    links = [f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/b.png", f"http://[::1]:{port}/c.png",
             "http://169.254.169.254/latest/meta-data/iam.png", "http://10.0.0.7/d.png",
             "http://metadata.google.internal/computeMetadata/v1/e.png"]
    try:
        async with services_factory(bot_settings) as services:
            session = create_session()  # the production session: public addresses only
            services.fetcher = ImageFetcher(session, bot_settings.image_limits())
            try:
                async with run_bot(fake_discord, services) as running:
                    asked = await fake_discord.send_message_as(world.member, world.general,
                                                               "look at these: " + " ".join(links),
                                                               mentions_bot=True)
                    reply = await answer_to(running, world.general, asked)
                    stored = await running.store.get_message(str(asked.id))
            finally:
                await session.close()
    finally:
        await runner.cleanup()
    assert hits == []
    assert stored is not None and stored.images == ()
    assert reply.content == "that link is not allowed"
    assert reply.allowed_mentions == {"parse": []}
