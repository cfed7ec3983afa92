"""Images of a Discord message: attachments, images of embeds Discord unfurled, and direct links in its text.

Every image is checked by content (`bot.images.check.check_image`, on a worker thread). An image that cannot be
used (too large, damaged, a link that fails) is reported back so that a request can tell its author. An attached
file that is no image (a PDF, an SVG, a voice message, an empty file) is reported as `UnreadableFile`: not a
reason to refuse the message, but named back to its author beside the answer. A link in the text that is no
image (a web page) is skipped without a word.
"""

from __future__ import annotations

import asyncio
import logging

import discord

from bot.discord_app.forwards import attachments_of, contents_of, embeds_of
from bot.errors import FetchFailed, FetchTimeout, ImageTooLarge, NotAnImage, UnreadableFile, UserInputError
from bot.images.check import CheckedImage, ImageLimits, check_image
from bot.images.fetch import ImageFetcher
from bot.images.links import find_image_links

log = logging.getLogger(__name__)


async def image_from_attachment(attachment: discord.Attachment, limits: ImageLimits) -> CheckedImage:
    """Download and check one attachment; raise a `bot.errors.ImageError` (or `FetchError`) if unusable."""
    # Discord tells the size up front: a 500 MB video is refused without downloading a byte of it.
    if attachment.size > limits.max_bytes:
        raise ImageTooLarge(limits.max_bytes, detail=f"attachment {attachment.id}: {attachment.size} bytes")
    try:
        data = await asyncio.wait_for(attachment.read(), limits.timeout_s)
    except TimeoutError as exc:
        raise FetchTimeout(detail=f"attachment {attachment.id}") from exc
    except discord.HTTPException as exc:
        raise FetchFailed(status=exc.status, detail=f"attachment {attachment.id}") from exc
    return await asyncio.to_thread(check_image, data, limits)


async def image_from_url(url: str, fetcher: ImageFetcher, limits: ImageLimits) -> CheckedImage:
    data = await fetcher.fetch(url)
    return await asyncio.to_thread(check_image, data, limits)


def _looks_like_image(attachment: discord.Attachment) -> bool:
    # Only used to decide whether an oversized file deserves an image error; acceptance is by content.
    kind = attachment.content_type or ""
    return not kind or kind.startswith("image/")


def sent_as_spoiler(message: discord.Message) -> bool:
    """Whether an attachment of `message` (or of the message it forwards) was sent as a spoiler: a `SPOILER_`
    file name or the IS_SPOILER attachment flag (`discord.Attachment.is_spoiler` reads both)."""
    return any(a.is_spoiler() for a in attachments_of(message))
def _surely_not_image(attachment: discord.Attachment) -> bool:
    """Sound or video by its declared type (a voice message, a clip): not downloaded at all."""
    kind = attachment.content_type or ""
    return attachment.is_voice_message() or kind.startswith(("audio/", "video/"))


def embed_image_urls(message: discord.Message) -> list[str]:
    """Image URLs of the embeds Discord unfurled from links (the image, else the thumbnail), a forwarded
    message's included."""
    urls: list[str] = []
    for embed in embeds_of(message):
        url = embed.image.url or embed.thumbnail.url
        if url and url not in urls:
            urls.append(url)
    return urls


async def images_from_message(
    message: discord.Message, fetcher: ImageFetcher, limits: ImageLimits
) -> tuple[list[CheckedImage], list[UserInputError]]:
    """Every usable image of `message`, in order (attachments, embeds, links), at most `limits.max_count`; a
    forward's are those of the message it forwards.

    Returns the images and the errors of images that could not be used, attached files that are no image among
    them as `UnreadableFile`; never raises for bad input. Links in the text to no image are skipped silently.
    """
    images: list[CheckedImage] = []
    errors: list[UserInputError] = []
    attachments = attachments_of(message)
    for attachment in attachments:
        if len(images) >= limits.max_count:
            break
        if _surely_not_image(attachment) or (attachment.size > limits.max_bytes and not _looks_like_image(attachment)):
            errors.append(UnreadableFile(attachment.filename, detail=f"attachment {attachment.id}: "
                                         f"{attachment.content_type}, {attachment.size} bytes, not read"))
            continue
        try:
            images.append(await image_from_attachment(attachment, limits))
        except NotAnImage as exc:
            log.debug("attachment %s of message %s is not an image", attachment.id, message.id)
            errors.append(UnreadableFile(attachment.filename, detail=f"attachment {attachment.id}: {exc.detail}"))
        except UserInputError as exc:
            log.info("attachment %s of message %s unusable: %s", attachment.id, message.id, exc.detail)
            errors.append(exc)
    embed_urls = embed_image_urls(message)
    # A link Discord unfurled shows up twice (text and embed); the embed's image is the one to take.
    text_links = find_image_links("\n".join(contents_of(message)), limits.max_count)
    for url in [*embed_urls, *(u for u in text_links if u not in embed_urls)]:
        if len(images) >= limits.max_count:
            break
        try:
            images.append(await image_from_url(url, fetcher, limits))
        except NotAnImage:
            log.debug("a link in message %s is not an image", message.id)
        except UserInputError as exc:
            log.info("a link in message %s unusable: %s", message.id, exc.detail)
            errors.append(exc)
    skipped = len(attachments) + len(embed_urls) + len(text_links) - len(images) - len(errors)
    if images or errors:
        log.info("message %s: %d images, %d errors, %d skipped", message.id, len(images), len(errors),
                 max(skipped, 0))
    return images, errors
