"""Tiny random Idefics2, Idefics3 and SmolVLM checkpoints, built offline with the real transformers classes.

Like `tiny_idefics` (IDEFICS v1): real config, model, image processor and processor classes with small sizes,
saved with `save_pretrained` and loaded through the same code users run. Idefics2 gets the LLaMA-1 vocabulary
(Idefics2's own is Mistral's, a LLaMA-style SentencePiece), Idefics3 and SmolVLM a byte-level BPE (theirs are
GPT-2 style). The chat templates are the ones the hub checkpoints ship (HuggingFaceM4/idefics2-8b,
HuggingFaceTB/SmolVLM-256M-Instruct), so prompts read as the real models' do.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from tests.fakes.tiny_idefics import _CORPUS, _llama_base

CHAT_TEMPLATE = (
    "{% for message in messages %}{{message['role'].capitalize()}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""Idefics2's template (HuggingFaceM4/idefics2-8b)."""
SMOLVLM_CHAT_TEMPLATE = "<|im_start|>" + CHAT_TEMPLATE
"""Idefics3's and SmolVLM's: the same, after `<|im_start|>`."""

ARCHITECTURES = ("idefics2", "idefics3", "smolvlm")
GRID = 2
"""Tiny Idefics3/SmolVLM images split into at most GRID x GRID tiles (plus the global image)."""
TILE = 16
PATCH = 4


def _byte_level_tokenizer() -> Any:
    """A byte-level BPE with Idefics3's added tokens (`<|im_start|>`, `<global-img>`, `<row_1_col_1>`, ...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    base = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=base, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    grid = [f"<row_{r}_col_{c}>" for r in range(1, GRID + 1) for c in range(1, GRID + 1)]
    extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>", *grid]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|im_end|>", additional_special_tokens=["<|im_start|>", "<|im_end|>", *extra],
        padding_side="left", model_max_length=2048,
    )


def _llama_style_tokenizer() -> Any:
    """The LLaMA-1 SentencePiece vocabulary with Idefics2's added tokens; `<unk>` pads on the left."""
    tokenizer = copy.deepcopy(_llama_base())
    tokenizer.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                                "<end_of_utterance>"]})
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "left"
    tokenizer.model_max_length = 2048
    return tokenizer


def _text_config(tokenizer: Any, model_type: str) -> dict[str, Any]:
    return {
        "model_type": model_type, "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048,
        # A wide spread makes greedy choices clear-cut (batched == one at a time exactly), as in tiny_idefics.
        "initializer_range": 0.2, "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id, "tie_word_embeddings": False,
    }


def _vision_config() -> dict[str, Any]:
    return {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": TILE, "patch_size": PATCH, "initializer_range": 0.2}


def _idefics2(path: Path) -> tuple[Any, Any]:
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil

    tokenizer = _llama_style_tokenizer()
    latents = 4
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": TILE, "longest_edge": 2 * TILE})
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=latents,
                                  chat_template=CHAT_TEMPLATE)
    config = Idefics2Config(
        text_config=_text_config(tokenizer, "mistral"), vision_config=_vision_config(),
        perceiver_config={"resampler_n_latents": latents, "resampler_depth": 1, "resampler_n_heads": 2,
                          "resampler_head_dim": 16, "num_key_value_heads": 1,
                          "hidden_size": 64, "rms_norm_eps": 1e-6, "initializer_range": 0.2},
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
    )
    return Idefics2ForConditionalGeneration(config), processor


def _idefics3(path: Path, smolvlm: bool) -> tuple[Any, Any]:
    import transformers as tf
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = _byte_level_tokenizer()
    scale = 2
    seq_len = (TILE // PATCH) ** 2 // scale**2
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": GRID * TILE},
                                                max_image_size={"longest_edge": TILE})
    # SmolVLM (model_type "smolvlm", SmolVLM2) gets Idefics3's processor: its own lays images out the same way
    # but, in transformers 5, cannot be built without torchvision (for its video processor).
    processor = tf.Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=seq_len,
                                     chat_template=SMOLVLM_CHAT_TEMPLATE)
    prefix = "SmolVLM" if smolvlm else "Idefics3"
    config = getattr(tf, f"{prefix}Config")(
        text_config=_text_config(tokenizer, "llama"), vision_config=_vision_config(), scale_factor=scale,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return getattr(tf, f"{prefix}ForConditionalGeneration")(config), processor


def build_tiny_family(path: str | Path, architecture: str, *, seed: int | None = None) -> Path:
    """Write a tiny random checkpoint of `architecture` (idefics2, idefics3 or smolvlm) to `path`.

    Each architecture gets its own default seed, so Idefics3 and SmolVLM (the same layers) differ in weights."""
    import torch

    path = Path(path)
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}")
    torch.manual_seed(ARCHITECTURES.index(architecture) if seed is None else seed)
    model, processor = _idefics2(path) if architecture == "idefics2" else _idefics3(path, architecture == "smolvlm")
    model.eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a tiny random Idefics2/Idefics3/SmolVLM checkpoint.")
    parser.add_argument("architecture", choices=ARCHITECTURES)
    parser.add_argument("path")
    args = parser.parse_args()
    print(build_tiny_family(args.path, args.architecture))


if __name__ == "__main__":
    main()
