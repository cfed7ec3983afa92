"""Rebuild `tests/fakes/data/llama_tokenizer/`: the LLaMA-1 SentencePiece vocabulary, from llama.cpp's copy of it.

The real IDEFICS checkpoints use the LLaMA-1 tokenizer (32000 pieces). It cannot be downloaded here, but the
source distribution of `llama-cpp-python` (MIT) carries it as `vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf`,
with llama.cpp's own test vectors beside it (`.gguf.inp`: texts, `.gguf.out`: their ids). This script:

1. reads pieces, scores and piece types from the gguf file (the `gguf` package);
2. writes them as a SentencePiece `tokenizer.model` (BPE, byte fallback, digits split, dummy prefix, no
   whitespace folding: the settings of Meta's file);
3. checks it with `sentencepiece` against the test vectors and a few known ids ("Hello" is 15043, 278 is "▁the");
4. converts it as the tests do (transformers' converter, then `model_server.loading.use_release_tokenization`)
   and checks the same ids;
5. copies the test vectors beside it (`tests/model_server/prompt/test_release_tokens.py` checks them at every run).

The tests convert `tokenizer.model` once per session (`sentencepiece` and `protobuf`, in the `dev` extra); this
rebuild also needs `gguf` (also in `dev`).

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-*.tar.gz -C /tmp/lcp
    python -m tests.fakes.build_llama_vocab /tmp/lcp/llama_cpp_python-*/vendor/llama.cpp/models
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

OUT = Path(__file__).parent / "data" / "llama_tokenizer"
GGUF_NAME = "ggml-vocab-llama-spm.gguf"
VOCAB_SIZE = 32000
KNOWN_IDS = {"Hello": [15043], "Hello world": [15043, 3186], "the cat": [278, 6635]}
KNOWN_PIECES = {0: "<unk>", 1: "<s>", 2: "</s>", 3: "<0x00>", 13: "<0x0A>", 278: "▁the", 29871: "▁"}
VECTORS = "vectors"
"""The shipped copies of the test vectors: `vectors.inp`, `vectors.out`."""
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"


def parse_vectors(inputs: str, outputs: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test vectors: each text of a `.inp` file with its ids (one line of the `.out`), without BOS."""
    texts = inputs.split(VECTOR_SEPARATOR)
    texts[-1] = texts[-1].removesuffix("\n__ggml_vocab_test__\n").removesuffix("\n__ggml_vocab_test__")
    lines = outputs.split("\n")
    ids = [[int(i) for i in line.split()] for line in lines[: len(texts)]]
    return list(zip(texts, ids, strict=True))


def read_vectors(models_dir: Path, stem: str = GGUF_NAME) -> list[tuple[str, list[int]]]:
    return parse_vectors((models_dir / f"{stem}.inp").read_text(encoding="utf-8"),
                         (models_dir / f"{stem}.out").read_text(encoding="utf-8"))


def read_gguf(path: Path) -> tuple[list[str], list[float], list[int]]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    assert reader.fields["tokenizer.ggml.model"].contents() == "llama"
    pieces = list(reader.fields["tokenizer.ggml.tokens"].contents())
    scores = [float(s) for s in reader.fields["tokenizer.ggml.scores"].contents()]
    types = [int(t) for t in reader.fields["tokenizer.ggml.token_type"].contents()]
    return pieces, scores, types


def build_model_proto(pieces: list[str], scores: list[float], types: list[int]) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    # gguf's token types use SentencePiece's numbering (1 normal, 2 unknown, 3 control, 6 byte).
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        proto.pieces.add(piece=piece, score=score, type=kind)
    spec = proto.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = len(pieces)
    spec.byte_fallback = True
    spec.split_digits = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return proto.SerializeToString()


def check_sentencepiece(model_path: Path, vectors: list[tuple[str, list[int]]]) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    assert sp.get_piece_size() == VOCAB_SIZE, sp.get_piece_size()
    for piece_id, piece in KNOWN_PIECES.items():
        assert sp.id_to_piece(piece_id) == piece, (piece_id, sp.id_to_piece(piece_id))
    for text, ids in [*KNOWN_IDS.items(), *vectors]:
        assert sp.encode(text) == ids, (text, sp.encode(text), ids)


def check_transformers(model_path: Path, vectors: list[tuple[str, list[int]]]) -> None:
    """The file as the tests load it: transformers' own SentencePiece conversion, with the release pipeline.

    It agrees with SentencePiece on every vector except those whose text starts with a space: there the release
    fast tokenizer (no whitespace pre-split) merges the dummy prefix with the space into "▁▁", where SentencePiece
    keeps "▁" apart. Those must still decode back to their text.
    """
    from transformers import LlamaTokenizer

    from model_server.loading import use_release_tokenization

    with tempfile.TemporaryDirectory() as folder:  # a folder with the .model alone: from_pretrained converts it
        shutil.copyfile(model_path, Path(folder) / "tokenizer.model")
        tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=True)
    use_release_tokenization(tokenizer)
    assert len(tokenizer) == VOCAB_SIZE, len(tokenizer)
    for text, ids in [*KNOWN_IDS.items(), *vectors]:
        got = tokenizer(text, add_special_tokens=False).input_ids
        if text.startswith(" "):
            assert tokenizer.decode(got) == text, (text, got)
        else:
            assert got == ids, (text, got, ids)


def build(models_dir: Path, out: Path = OUT) -> None:
    out.mkdir(parents=True, exist_ok=True)
    vectors = read_vectors(models_dir)
    pieces, scores, types = read_gguf(models_dir / GGUF_NAME)
    assert len(pieces) == VOCAB_SIZE, len(pieces)
    model_path = out / "tokenizer.model"
    model_path.write_bytes(build_model_proto(pieces, scores, types))
    check_sentencepiece(model_path, vectors)
    check_transformers(model_path, vectors)
    for suffix in (".inp", ".out"):
        shutil.copyfile(models_dir / f"{GGUF_NAME}{suffix}", out / f"{VECTORS}{suffix}")
    print(f"wrote {out}: {VOCAB_SIZE} pieces, {len(vectors)} test vectors pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models_dir", type=Path, help="llama.cpp's models/ folder (holds the gguf and its vectors)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    build(args.models_dir, args.out)


if __name__ == "__main__":
    main()
