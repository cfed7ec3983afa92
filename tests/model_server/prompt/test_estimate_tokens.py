"""`estimate_tokens` never under-counts: checked against the real LLaMA-1 tokenizer (release tokenization) on
text made of what under-counted before (digits, hex, code, URLs) and what byte fallback splits (emoji, CJK)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_server.prompt import estimate_tokens

PIECES = [
    "<s>", "</s>", "<unk>", "<image>", "<fake_token_around_image>", "<end_of_utterance>", "<pad>", "<", ">",
    " ", "  ", "\n", "\t", "0123456789", "deadbeef", "0x7f", "https://example.com/a?b=1&c=%20", "def f(x):",
    "😀", "日本語", "é", "\u200b", "▁", "The quick brown fox", "User:", "Assistant:",
]
texts = st.lists(st.sampled_from(PIECES) | st.text(max_size=12), max_size=20).map("".join)
SLOW = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _real(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


@SLOW
@given(texts)
def test_never_below_the_instruct_tokenizer(llama_tokenizer, text: str) -> None:
    assert estimate_tokens(text) >= _real(llama_tokenizer, text)


@SLOW
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40))
def test_never_below_on_any_characters(llama_tokenizer, text: str) -> None:
    assert estimate_tokens(text) >= _real(llama_tokenizer, text)


def test_never_below_the_base_tokenizer(tiny_base_model_path) -> None:
    """A base checkpoint reads `<end_of_utterance>` as text (7 tokens), which the bound covers too."""
    from model_server.loading import load_processor

    tokenizer = load_processor(str(tiny_base_model_path), local_only=True).tokenizer
    for text in ["<end_of_utterance>", "a<end_of_utterance>\nUser:<end_of_utterance>", *PIECES, "".join(PIECES)]:
        assert estimate_tokens(text) >= _real(tokenizer, text), text


def test_digits_are_counted_in_full(llama_tokenizer) -> None:
    # The old estimate said 667 for these: LLaMA splits every digit.
    digits = "1234567890" * 200
    real = _real(llama_tokenizer, digits)
    assert real >= 2000
    assert real <= estimate_tokens(digits) <= real + 1
