"""IDEFICS v1 prompts reach the model as the token ids of release time (legacy LLaMA tokenization).

The golden ids are those of transformers' own IDEFICS integration test of the release, for the guide's few-shot
prompt; the tiny checkpoints carry the real LLaMA-1 vocabulary, so these are the ids the 9B/80B checkpoints get.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from model_server.encoding import encode
from model_server.loading import load_processor
from model_server.prompt import prompt_text
from model_server.tasks import fewshot
from tests.fakes.build_llama_vocab import VECTORS, read_vectors
from tests.fakes.tiny_idefics import LLAMA_TOKENIZER
from tests.model_server.prompt.helpers import IMG, image

GOLDEN_TEXT = ("<s>User:" + IMG + "Describe this image.\nAssistant: An image of two dogs.\nUser:" + IMG
               + "Describe this image.\nAssistant:")
GOLDEN_IDS = [1, 4911, 29901, 32000, 32001, 32000, 20355, 915, 445, 1967, 29889, 13, 7900, 22137, 29901, 530, 1967,
              310, 1023, 26361, 29889, 13, 2659, 29901, 32000, 32001, 32000, 20355, 915, 445, 1967, 29889, 13, 7900,
              22137, 29901]


def _golden_prompt():
    return fewshot([(image(1), "An image of two dogs.")], image(2))


def test_the_guides_fewshot_prompt_is_the_golden_text() -> None:
    assert prompt_text(_golden_prompt().items) == GOLDEN_TEXT


def test_golden_ids_through_the_models_own_processor(loaded_model) -> None:
    # What the executor feeds the model: `encode` with the processor `load_model` gave it.
    batch = encode(loaded_model.processor, [_golden_prompt()], pixels=False)
    assert batch.input_ids[0].tolist() == GOLDEN_IDS
    assert loaded_model.count_tokens(GOLDEN_TEXT) == len(GOLDEN_IDS)


def test_golden_ids_on_a_base_checkpoint(tiny_base_model_path: Path) -> None:
    processor = load_processor(str(tiny_base_model_path), local_only=True)
    assert processor.tokenizer(GOLDEN_TEXT, add_special_tokens=False).input_ids == GOLDEN_IDS


def test_transformers_alone_would_drop_the_leading_space(tiny_model_path: Path) -> None:
    """Why the loading code sets the tokenization itself: the saved checkpoint has no `legacy` key, and
    transformers 5 then builds the non-legacy tokenizer ("User" 2659 after `<s>` instead of "▁User" 4911)."""
    from transformers import AutoTokenizer

    config = json.loads((tiny_model_path / "tokenizer_config.json").read_text())
    assert "legacy" not in config
    plain = AutoTokenizer.from_pretrained(tiny_model_path)
    assert plain("<s>User:", add_special_tokens=False).input_ids == [1, 2659, 29901]


@pytest.mark.parametrize("legacy", [True, False, None])
def test_release_ids_whatever_the_config_says(tiny_model_path: Path, tmp_path: Path, legacy: bool | None) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "processor_config.json"):
        shutil.copyfile(tiny_model_path / name, tmp_path / name)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("legacy", None)
    if legacy is not None:
        config["legacy"] = legacy
    config_path.write_text(json.dumps(config))
    processor = load_processor(str(tmp_path), local_only=True)
    assert processor.tokenizer(GOLDEN_TEXT, add_special_tokens=False).input_ids == GOLDEN_IDS


def test_added_tokens_as_released(llama_tokenizer) -> None:
    tokenizer = llama_tokenizer
    assert len(tokenizer) == 32003
    assert [tokenizer.convert_tokens_to_ids(t) for t in ("<fake_token_around_image>", "<image>",
                                                         "<end_of_utterance>")] == [32000, 32001, 32002]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token) == (1, 2, "<unk>")
    assert tokenizer.padding_side == "left"
    assert tokenizer.convert_ids_to_tokens([278, 15043, 29871]) == ["▁the", "▁Hello", "▁"]


def test_llama_cpp_vectors(llama_tokenizer) -> None:
    """llama.cpp's own test vectors for this vocabulary (SentencePiece's ids). Texts that start with a space are
    the one known difference of the release fast tokenizer (it merges the leading "▁▁"): they round-trip."""
    vectors = read_vectors(LLAMA_TOKENIZER, VECTORS)
    assert len(vectors) > 40
    for text, ids in vectors:
        got = llama_tokenizer(text, add_special_tokens=False).input_ids
        if text.startswith(" "):
            assert llama_tokenizer.decode(got) == text
        else:
            assert got == ids, text


def test_a_dry_run_counts_with_the_checkpoints_tokenizer(tiny_model_path: Path) -> None:
    """`--dry-run` loads no weights, but a local folder's tokenizer files give the exact count."""
    from bot.pipeline.services import model_info_without_weights

    info = model_info_without_weights(str(tiny_model_path))
    assert info.instruct
    assert info.count_tokens is not None and info.count_tokens(GOLDEN_TEXT) == len(GOLDEN_IDS)


def test_the_rebuild_script_writes_the_shipped_model() -> None:
    """`tests/fakes/build_llama_vocab.py` turns pieces, scores and types into exactly the shipped `tokenizer.model`."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    from tests.fakes.build_llama_vocab import build_model_proto

    shipped = (LLAMA_TOKENIZER / "tokenizer.model").read_bytes()
    proto = sp_pb2.ModelProto.FromString(shipped)
    pieces = list(proto.pieces)
    assert len(pieces) == 32000
    rebuilt = build_model_proto([p.piece for p in pieces], [p.score for p in pieces], [p.type for p in pieces])
    assert rebuilt == shipped


def test_special_tokens_are_matched_on_the_raw_text() -> None:
    """A special token matched after normalization would leave the next stretch without its "▁": such tokens
    (older tokenizer files mark some `normalized`) are matched on the raw text instead."""
    from tokenizers import AddedToken

    from model_server.loading import use_release_tokenization
    from tests.fakes.tiny_idefics import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.backend_tokenizer.add_special_tokens([AddedToken("<image>", special=True, normalized=True)])
    assert tokenizer.backend_tokenizer.get_added_tokens_decoder()[32001].normalized
    use_release_tokenization(tokenizer)
    assert not tokenizer.backend_tokenizer.get_added_tokens_decoder()[32001].normalized
    assert tokenizer("<image>Describe", add_special_tokens=False).input_ids == [32001, 20355, 915]
