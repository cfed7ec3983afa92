"""Small real images and the guide's example lists, for the prompt tests."""

from __future__ import annotations

from PIL import Image

EIFFEL_ANSWER = (
    "An image of the Eiffel Tower at night. Fun fact: the Eiffel Tower is the same height as an 81-storey building."
)
IDEFIX_ANSWER = "This picture depicts Idefix, the dog of Obelix in Asterix and Obelix. Idefix is running on the ground."

FAKE = "<fake_token_around_image>"
IMG = f"{FAKE}<image>{FAKE}"
"""The text of one image that does not follow another image."""


def image(shade: int = 0, size: tuple[int, int] = (8, 6)) -> Image.Image:
    """A tiny RGB image; the shade tells images apart in failure messages and identity checks."""
    return Image.new("RGB", size, (shade % 256, 40, 200))


def images(n: int) -> list[Image.Image]:
    return [image(10 * i) for i in range(n)]
