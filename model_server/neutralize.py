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

Role lines. A line of user text that reads `Assistant: ...` or `User: ...` is, token for token, a turn of that
role (`"\nUser:"` is [13, 2659, 29901] wherever it comes from). The same holds for the task prompts' own markers
(`Question:`, `Answer:`, ...). Every line that starts (after any spaces) with one of `ROLE_WORDS`, in any case,
then optional spaces and a colon, gets a U+200B after the word's first letter: the role word is no longer one
token (`U`, the three bytes of U+200B, `ser`), and a person reads the same line. The start of the text counts as
a line start, since callers put it after a marker or a name. This runs last and only separates characters, so
it cannot form a special string; its own output no longer matches, so neutralizing twice changes nothing.
`tests/model_server/prompt/test_neutralize.py` checks both with hypothesis, and with the real tokenizer.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

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

ROLE_WORDS: tuple[str, ...] = ("User", "Assistant", "Question", "Answer", "Instruction", "Category", "Story")
"""Words that open a turn in our prompts (chat and the guide's tasks) when a line starts with them and a colon."""

# Line breaks the model may read as such; other C0 breaks (\v, \f, \r, \x1c-\x1e) are removed before this runs.
_BREAKS = "\n\x85\u2028\u2029"
_ROLE_LINE = re.compile(
    rf"(?<![^{_BREAKS}])[^\S{_BREAKS}]*({'|'.join(ROLE_WORDS)})[^\S{_BREAKS}]*[:\uff1a]", re.IGNORECASE
)

# C0 controls except \t and \n: NUL and friends have no business in a prompt, and \r only doubles line ends.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f]")


def neutralize(text: str) -> str:
    """Return `text` with control characters removed, and every special-token string and role line broken by
    U+200B.

    Text without special strings, role lines or control characters comes back unchanged.
    """
    text = _CONTROL.sub("", text)
    return neutralize_role_lines(_SPECIAL_START.sub("<" + ZERO_WIDTH_SPACE, text))


def _break_role_word(match: re.Match[str]) -> str:
    cut = match.start(1) - match.start() + 1
    return match[0][:cut] + ZERO_WIDTH_SPACE + match[0][cut:]


def neutralize_role_lines(text: str) -> str:
    """Put U+200B after the first letter of every role word that opens a line of `text` (see the module doc).

    For text composed of pieces that were neutralized alone, e.g. a name and a message joined as "name: text":
    the name "User" is harmless alone but opens a role line there.
    """
    return _ROLE_LINE.sub(_break_role_word, text)


def has_role_line(text: str) -> bool:
    """Whether a line of `text` (the first included) reads as a turn marker."""
    return _ROLE_LINE.search(text) is not None


def contains_special(text: str) -> bool:
    """Whether `text` holds any string the tokenizer would turn into a special token."""
    return any(s in text for s in SPECIAL_STRINGS)


def neutralize_strings(text: str, specials: Sequence[str]) -> str:
    """Break every occurrence of `specials` (a model's own added tokens) with a U+200B after its first character.

    For the newer checkpoints, whose tokenizers add strings of their own (`<global-img>`, `<row_1_col_1>`,
    `<|im_start|>`, ...): read from the tokenizer at load, not listed here. The argument of the module doc holds for
    strings that start with `<` and hold no other `<` (all of these); one pass, left to right, judges every start
    position on its own, and a string that does not start with `<` gets its U+200B after its first character too.
    """
    if not specials:
        return text
    return _specials_pattern(tuple(sorted(set(specials)))).sub(
        lambda m: m[0][0] + ZERO_WIDTH_SPACE, text)


@functools.cache
def _specials_pattern(specials: tuple[str, ...]) -> re.Pattern[str]:
    # Only the first character is consumed, so overlapping candidates are each judged at their own start.
    return re.compile("|".join(f"{re.escape(s[0])}(?={re.escape(s[1:])})" for s in specials if s))
