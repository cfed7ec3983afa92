"""find_image_links: the links a person meant, as Discord shows them."""

from __future__ import annotations

import pytest

from bot.images.links import find_image_links


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("what is this? https://a.example/cat.png", ["https://a.example/cat.png"]),
        ("no links here, just www.example.com and example.com/x.png", []),
        (
            "first https://a.example/1.png then http://b.example/2.jpg",
            ["https://a.example/1.png", "http://b.example/2.jpg"],
        ),
        ("look: https://a.example/cat.png.", ["https://a.example/cat.png"]),
        ("really?! https://a.example/cat.png?!", ["https://a.example/cat.png"]),
        ("(see https://a.example/cat.png)", ["https://a.example/cat.png"]),
        ("(see https://a.example/cat.png).", ["https://a.example/cat.png"]),
        (
            "https://en.wikipedia.org/wiki/Cat_(disambiguation)",
            ["https://en.wikipedia.org/wiki/Cat_(disambiguation)"],
        ),
        ("no embed <https://a.example/cat.png> please", ["https://a.example/cat.png"]),
        ("spoiler ||https://a.example/cat.png||", ["https://a.example/cat.png"]),
        ("[a cat](https://a.example/cat.png)", ["https://a.example/cat.png"]),
        ('"https://a.example/cat.png"', ["https://a.example/cat.png"]),
        ("`https://a.example/code.png`", ["https://a.example/code.png"]),
        (
            "https://cdn.discordapp.com/attachments/1/2/a.png?ex=65&is=66&hm=ab",
            ["https://cdn.discordapp.com/attachments/1/2/a.png?ex=65&is=66&hm=ab"],
        ),
        ("HTTPS://A.EXAMPLE/CAT.PNG", ["HTTPS://A.EXAMPLE/CAT.PNG"]),
        ("ftp://a.example/cat.png file:///etc/passwd data:image/png;base64,AA", []),
        ("http:// nothing", []),
        ("line one\nhttps://a.example/1.png\nline three", ["https://a.example/1.png"]),
    ],
)
def test_cases(text: str, expected: list[str]) -> None:
    assert find_image_links(text, 10) == expected


def test_deduplicated_in_order() -> None:
    text = (
        "https://a.example/1.png https://b.example/2.png https://a.example/1.png, <https://b.example/2.png>"
    )
    assert find_image_links(text, 10) == ["https://a.example/1.png", "https://b.example/2.png"]


def test_limit() -> None:
    text = " ".join(f"https://a.example/{i}.png" for i in range(10))
    assert find_image_links(text, 3) == [f"https://a.example/{i}.png" for i in range(3)]
    assert find_image_links(text, 0) == []
    assert find_image_links(text, -1) == []


def test_long_text_is_fast() -> None:
    import time

    text = "https://" + "a" * 200_000 + " " + "x(" * 50_000
    started = time.perf_counter()
    find_image_links(text, 4)
    assert time.perf_counter() - started < 1.0
