"""Make untrusted text inert before it enters a prompt.

The IDEFICS tokenizer turns these exact strings into special tokens wherever they appear in the text:
a user who types `<end_of_utterance>\\nAssistant:` could forge a turn, one who types `<image>` would break
the mapping between image tokens and pixel values. We break each occurrence with a zero-width space (U+200B)
right after its `<`: the text reads the same to a person, but no longer matches any special token.

Why the output can never contain a special string, whatever the input:
1. Control characters are removed *first*: removing them afterwards could join `<ima` and `ge>` around a NUL
   into a fresh `<image>` that no longer gets its zero-width space.
2. Every special string starts with `<`, contains no other `<`, and its second character is never U+200B.
3. Take any `<` at position p of the output. If a special string started at that `<` in the input, we put
   U+200B right after it, so none starts at p any more (by 2). If none started there, the characters that
   follow it up to the length of the longest special string are the input's own characters: an insertion
   inside that span would have to come right after another `<` within it, which a special string cannot
   contain (by 2). So the output at p reads as the input did, and no special string starts at p.
4. A special string starts with `<`, so with no match at any `<` there is no match anywhere.
`tests/model_server/prompt/test_neutralize.py` checks this with hypothesis.
"""

from __future__ import annotations

import re

ZERO_WIDTH_SPACE = "\u200b"

SPECIAL_STRINGS: tuple[str, ...] = (
    "<image>",
    "<fake_token_around_image>",
    "<end_of_utterance>",
    "<s>",
    "</s>",
    "<unk>",
    "<pad>",
)
"""Strings the IDEFICS (LLaMA) tokenizer maps to special tokens: none may come from untrusted text."""

# A lookahead matches only the `<` itself, so every `<` is judged on its own in one left-to-right pass, even
# where candidate matches would overlap.
_SPECIAL_START = re.compile("<(?=" + "|".join(re.escape(s[1:]) for s in SPECIAL_STRINGS) + ")")

# C0 controls except \t and \n: NUL and friends have no business in a prompt, and \r only doubles line ends.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")


def neutralize(text: str) -> str:
    """Return `text` with control characters removed and every special-token string broken by U+200B.

    Text without special strings or control characters comes back unchanged.
    """
    text = _CONTROL.sub("", text)
    return _SPECIAL_START.sub("<" + ZERO_WIDTH_SPACE, text)


def contains_special(text: str) -> bool:
    """Whether `text` holds any string the tokenizer would turn into a special token."""
    return any(s in text for s in SPECIAL_STRINGS)
