"""A tiny LLaMA checkpoint in GGUF, written with the `gguf` package, for a real llama.cpp server in the tests.

Architecture `llama` (2 blocks, width 64, 4 heads, 512 positions) with the real LLaMA-1 vocabulary
(`tests/fakes/data/llama_tokenizer/tokenizer.model`: pieces, scores and types as llama.cpp's own converter writes
them) and a chat template in the IDEFICS layout (`User:...<end_of_utterance>\\nAssistant:`), so the server renders
chat messages as the bot's own prompts read. About 17 MB, written in a second.

The weights are random and small, except that every position's hidden state leans one way (the embeddings share
a constant part) and the output row of one word (`FAVOURITE`, "▁cat") points that way: greedy decoding writes
that word again and again, so a test can know what the real server will answer, stop it with a stop string, and
see a category picked by the model's answer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

TOKENIZER = Path(__file__).parent / "data" / "llama_tokenizer" / "tokenizer.model"
FAVOURITE = "▁cat"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
    "{% elif message['role'] == 'user' %}User:{{ message['content'] }}<end_of_utterance>\n"
    "{% else %}Assistant: {{ message['content'] }}<end_of_utterance>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
WIDTH, BLOCKS, HEADS, FEED_FORWARD, POSITIONS = 64, 2, 4, 128, 512


def _vocabulary() -> tuple[list[bytes], list[float], list[int]]:
    import sentencepiece
    from gguf import TokenType

    sp = sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    pieces, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        if sp.is_unknown(i):
            types.append(TokenType.UNKNOWN)
        elif sp.is_control(i):
            types.append(TokenType.CONTROL)
        elif sp.is_byte(i):
            types.append(TokenType.BYTE)
        elif sp.is_unused(i):
            types.append(TokenType.UNUSED)
        else:
            types.append(TokenType.NORMAL)
    return pieces, scores, [int(t) for t in types]


def write_tiny_llama_gguf(path: Path, *, seed: int = 0) -> Path:
    """Write the checkpoint to `path` (a `.gguf` file) and return it."""
    import gguf

    pieces, scores, types = _vocabulary()
    vocab = len(pieces)
    rng = np.random.default_rng(seed)

    def noise(*shape: int, scale: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_context_length(POSITIONS)
    writer.add_embedding_length(WIDTH)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FEED_FORWARD)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(WIDTH // HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)

    lean = np.ones(WIDTH, dtype=np.float32)
    writer.add_tensor("token_embd.weight", noise(vocab, WIDTH, scale=0.1) + lean)
    for block in range(BLOCKS):
        prefix = f"blk.{block}"
        writer.add_tensor(f"{prefix}.attn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            writer.add_tensor(f"{prefix}.{name}.weight", noise(WIDTH, WIDTH))
        writer.add_tensor(f"{prefix}.ffn_norm.weight", np.ones(WIDTH, dtype=np.float32))
        writer.add_tensor(f"{prefix}.ffn_gate.weight", noise(FEED_FORWARD, WIDTH))
        writer.add_tensor(f"{prefix}.ffn_up.weight", noise(FEED_FORWARD, WIDTH))
        writer.add_tensor(f"{prefix}.ffn_down.weight", noise(WIDTH, FEED_FORWARD))
    writer.add_tensor("output_norm.weight", np.ones(WIDTH, dtype=np.float32))
    output = noise(vocab, WIDTH)
    output[pieces.index(FAVOURITE.encode("utf-8"))] = lean * 0.5
    writer.add_tensor("output.weight", output)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
