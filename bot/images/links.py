"""Finding links in message text: the direct http(s) links a message carries, in order, trimmed of wrappers.

`find_image_links` is pure text work (no I/O): whether a link is an image is decided later by its content
(`bot.images.fetch.ImageFetcher`, then `bot.images.check.check_image`).
"""

from __future__ import annotations

import re

from yarl import URL

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
