"""A tiny random IDEFICS checkpoint, built offline, saved like a hub checkpoint.

Tests, the benchmark and `idefics-bot ... --model <folder>` load it through the same loading code users
run, so the whole pipeline (processor, model, generation) is the real transformers code with small
weights. `alpha_initializer="ones"` opens the gated cross-attention so images change the output.
"""

from __future__ import annotations

import argparse
import copy
import functools
from pathlib import Path

LLAMA_TOKENIZER = Path(__file__).parent / "data" / "llama_tokenizer"
"""The LLaMA-1 SentencePiece vocabulary (32000 pieces), rebuilt by `tests/fakes/build_llama_vocab.py`.

Only `tokenizer.model` (0.6 MB) is shipped, not the 1.6 MB `tokenizer.json` transformers makes of it: converting it
takes `sentencepiece` and `protobuf` (both in the `dev` extra) once per test session, and the checkpoints built
here are saved with a `tokenizer.json`, so loading them (as users load theirs) needs no converter."""
IDEFICS_TOKENS = ["<fake_token_around_image>", "<image>"]
"""Added to the LLaMA vocabulary by IDEFICS: ids 32000 and 32001; instruct checkpoints add `<end_of_utterance>`,
32002."""
END_OF_UTTERANCE = "<end_of_utterance>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<image>", "<fake_token_around_image>", "<end_of_utterance>"]

_CORPUS = [
    "User: What is in this image? Assistant: This picture depicts a dog running on the grass.",
    "This is an image of the Eiffel Tower in Paris, France.",
    "Instruction: Provide an answer to the question. Use the image to answer.",
    "Question: Where are these people and what's the weather like? Answer: in a park, sunny.",
    "Instruction: Classify the following image into a single category from the following list:",
    "['animals', 'vegetables', 'city landscape', 'cars', 'office'] Category: Vegetables",
    "Instruction: Use the image to write a story. Story: Once upon a time, there was a little girl.",
    "Describe this image. An image of the Statue of Liberty. Fun fact: it is 151 feet tall.",
    "A puppy in a flower bed. The quick brown fox jumps over the lazy dog 0123456789.",
]


@functools.cache
def _llama_base():
    from transformers import LlamaTokenizer

    return LlamaTokenizer.from_pretrained(LLAMA_TOKENIZER, legacy=True)


def build_tokenizer(*, end_of_utterance: bool = True):
    """The IDEFICS tokenizer as the hub checkpoints have it: LLaMA-1, bos 1, eos 2, `<unk>` pads on the left.

    Its `tokenizer.json` holds the release pipeline, as the hub's does; transformers 5 still rebuilds its own
    when loading it, which is why `model_server.loading` sets the release one again.
    """
    from model_server.loading import use_release_tokenization

    tokenizer = copy.deepcopy(_llama_base())
    use_release_tokenization(tokenizer)
    added = [*IDEFICS_TOKENS, *([END_OF_UTTERANCE] if end_of_utterance else [])]
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 2048
    assert [tokenizer.convert_tokens_to_ids(t) for t in added] == list(range(32000, 32000 + len(added)))
    return tokenizer


def build_byte_level_tokenizer(*, end_of_utterance: bool = True):
    """A byte-level BPE tokenizer trained in-process, with IDEFICS's special tokens.

    Not IDEFICS's vocabulary: the GPT-2 style of byte handling (Idefics2/3 and SmolVLM tokenizers decode this
    way), for tests of decoding that must hold for both kinds.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in SPECIAL_TOKENS if end_of_utterance or t != "<end_of_utterance>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    extra = [t for t in specials if t not in ("<unk>", "<s>", "</s>")]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
        additional_special_tokens=extra,
        padding_side="left",
        model_max_length=2048,
    )


def build_tiny_idefics(path: str | Path, *, instruct: bool = True, seed: int = 0, image_size: int = 32) -> Path:
    """Write a tiny random IDEFICS checkpoint (model + processor) to `path` and return it."""
    import torch
    from transformers import IdeficsConfig, IdeficsForVisionText2Text, IdeficsProcessor
    from transformers.models.idefics.image_processing_pil_idefics import IdeficsImageProcessorPil

    path = Path(path)
    tokenizer = build_tokenizer(end_of_utterance=instruct)
    image_processor = IdeficsImageProcessorPil(image_size=image_size)
    processor = IdeficsProcessor(image_processor=image_processor, tokenizer=tokenizer, image_size=image_size)

    # IDEFICS keeps the extra tokens (<image>, <fake_token_around_image>, ...) in a separate trainable
    # embedding: vocab_size covers the base vocabulary, additional_vocab_size the rest.
    base_vocab = tokenizer.convert_tokens_to_ids("<fake_token_around_image>")
    config = IdeficsConfig(
        vocab_size=base_vocab,
        additional_vocab_size=len(tokenizer) - base_vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=2048,
        cross_layer_interval=1,
        alpha_initializer="ones",
        # The default 0.02 gives near-uniform logits and images that barely move them; a wider spread
        # makes greedy choices clear-cut (batched == one-by-one exactly) and outputs depend on images.
        initializer_range=0.2,
        use_resampler=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        freeze_text_layers=False,
        freeze_vision_layers=False,
        vision_config={
            "embed_dim": 32,
            "image_size": image_size,
            "patch_size": 8,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 64,
        },
        perceiver_config={
            "resampler_n_latents": 8,
            "resampler_depth": 1,
            "resampler_n_heads": 2,
            "resampler_head_dim": 16,
            "qk_layer_norms_perceiver": False,
        },
    )
    torch.manual_seed(seed)
    model = IdeficsForVisionText2Text(config)
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random IDEFICS checkpoint for offline tests.")
    parser.add_argument("path")
    parser.add_argument("--base", action="store_true", help="a base checkpoint (no <end_of_utterance>)")
    args = parser.parse_args()
    print(build_tiny_idefics(args.path, instruct=not args.base))


if __name__ == "__main__":
    main()
