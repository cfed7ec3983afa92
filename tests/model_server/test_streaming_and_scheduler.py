"""Pure pieces of the executor: text assembly with stop strings, and batch picking."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from model_server.scheduler import Waiting, pick_batch, split_in_halves
from model_server.streaming import TextAssembler, cut_at_stop


def _assembler(pieces: list[str], stops=("\nUser:",)) -> tuple[TextAssembler, list[str]]:
    # Token ids index into `pieces`; decoding concatenates them, like a tokenizer would.
    asm = TextAssembler(lambda ids: "".join(pieces[i] for i in ids), stops)
    deltas = []
    for i in range(len(pieces)):
        deltas.append(asm.add(i))
        if asm.stopped:
            break
    tail = asm.finish()
    if tail:
        deltas.append(tail)
    return asm, deltas


def test_deltas_concatenate_to_the_answer():
    asm, deltas = _assembler([" Hello", ",", " world", "!"])
    assert "".join(deltas) == asm.text == "Hello, world!"


def test_stop_string_cuts_the_answer_and_is_never_streamed():
    asm, deltas = _assembler([" A dog", ".", "\n", "Us", "er:", " more"])
    assert asm.stopped
    assert asm.text == "A dog."
    assert "".join(deltas) == "A dog."
    assert not any("\n" in d or "Us" in d for d in deltas)


def test_partial_stop_prefix_is_released_when_it_turns_out_harmless():
    asm, deltas = _assembler([" line one", "\n", "Usually", " fine"])
    assert not asm.stopped
    assert asm.text == "line one\nUsually fine"
    assert "".join(deltas) == asm.text


def test_incomplete_utf8_is_held_back():
    # "é" split over two byte tokens decodes to a replacement character until complete.
    pieces = ["caf", "\ufffd", "é"]
    asm = TextAssembler(lambda ids: "caf\ufffd" if ids == [0, 1] else "".join(pieces[i] for i in ids if i != 1))
    assert asm.add(0) == "caf"
    assert asm.add(1) == ""
    assert asm.add(2) == "é"


def test_retry_does_not_resend_text():
    asm = TextAssembler(lambda ids: " Hello world"[: 6 * len(ids)], (), already_sent="Hello")
    assert asm.add(0) == ""
    assert asm.add(1) == " world"


def test_cut_at_stop():
    assert cut_at_stop("abc\nUser: x", ["\nUser:"]) == ("abc", True)
    assert cut_at_stop("abc", ["\nUser:"]) == ("abc", False)


def _w(name: str, key: str, weight: int = 1) -> Waiting[str]:
    return Waiting(name, key, weight)


def test_pick_batch_takes_oldest_and_compatible_followers():
    waiting = [_w("a", "greedy"), _w("b", "sample"), _w("c", "greedy"), _w("d", "greedy")]
    assert [w.item for w in pick_batch(waiting, 8)] == ["a", "c", "d"]


def test_pick_batch_respects_the_row_limit_and_weights():
    waiting = [_w(str(i), "greedy") for i in range(10)]
    assert len(pick_batch(waiting, 4)) == 4
    beams = [_w("a", "beam", 2), _w("b", "beam", 2), _w("c", "beam", 2)]
    assert [w.item for w in pick_batch(beams, 4)] == ["a", "b"]


def test_pick_batch_empty_and_oversized_head():
    assert pick_batch([], 4) == []
    # A request heavier than the limit still runs, alone, rather than waiting forever.
    assert [w.item for w in pick_batch([_w("big", "beam", 8), _w("x", "beam", 1)], 4)] == ["big"]


def test_split_in_halves():
    assert split_in_halves([1, 2, 3]) == [[1, 2], [3]]
    assert split_in_halves([1]) == [[1], []]


def _codecs():
    """(encode, decode) pairs of a byte-level BPE tokenizer (as Idefics2/3 and SmolVLM decode) and the real
    LLaMA-1 one (sentencepiece style: ▁ for spaces, byte fallback, leading space stripped), as IDEFICS v1 has it."""
    from tests.fakes.tiny_idefics import build_byte_level_tokenizer, build_tokenizer

    byte_level = build_byte_level_tokenizer()
    llama = build_tokenizer()
    return [
        (lambda text: byte_level(text, add_special_tokens=False).input_ids,
         lambda ids: byte_level.decode(ids, skip_special_tokens=True)),
        (lambda text: llama(text, add_special_tokens=False).input_ids,
         lambda ids: llama.decode(ids, skip_special_tokens=True)),
    ]


CODECS = _codecs()


@settings(max_examples=300, deadline=None)
@given(which=st.sampled_from([0, 1]), text=st.text(max_size=60),
       stops=st.sampled_from([(), ("\nUser:",), ("the",)]))
def test_incremental_decoding_gives_the_full_decodes_text(which: int, text: str, stops: tuple[str, ...]):
    """Decoding only the newest tokens each step streams the same answer as decoding all of them, for any
    text a model can write (emoji and other characters split over several byte tokens included)."""
    encode, decode = CODECS[which]
    ids = encode(text)
    answers = []
    for incremental in (False, True):
        asm = TextAssembler(decode, stops, incremental=incremental)
        deltas = []
        for token in ids:
            deltas.append(asm.add(token))
            if asm.stopped:
                break
        deltas.append(asm.finish())
        assert "".join(deltas) == asm.text
        answers.append(asm.text)
    assert answers[0] == answers[1]
