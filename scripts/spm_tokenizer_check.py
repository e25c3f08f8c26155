"""Which tokenizer of a SentencePiece-style GGUF is faithful: jaxinfer's, transformers' (both
from the GGUF) and SentencePiece itself on a model proto rebuilt from the GGUF's pieces, scores
and types, compared paragraph by paragraph on the CPython docs text. Needs `sentencepiece`
(not a dependency of jaxinfer).

    python scripts/spm_tokenizer_check.py --model gemma-3-270m
"""

from __future__ import annotations

import argparse

import sentencepiece
from sentencepiece import sentencepiece_model_pb2 as pb
from transformers import AutoTokenizer

from jaxinfer.bench import english_text
from jaxinfer.loading import resolve_source
from jaxinfer.loading.gguf import GGUFFile
from jaxinfer.tokenizer import Tokenizer

USER_DEFINED, UNKNOWN = 4, 2


def sentencepiece_from_gguf(md: dict) -> sentencepiece.SentencePieceProcessor:
    """A BPE SentencePiece model with the GGUF's vocabulary (user-defined pieces with their
    spaces escaped as SentencePiece stores them), no dummy prefix, whitespace kept."""
    m = pb.ModelProto()
    pieces = zip(md["tokenizer.ggml.tokens"], md["tokenizer.ggml.scores"],
                 md["tokenizer.ggml.token_type"], strict=True)
    for i, (text, score, kind) in enumerate(pieces):
        p = m.pieces.add()
        p.piece = text.replace(" ", "\u2581") if kind == USER_DEFINED else text
        p.score, p.type = score, UNKNOWN if i == md["tokenizer.ggml.unknown_token_id"] else kind
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id = md["tokenizer.ggml.unknown_token_id"]
    m.trainer_spec.bos_id = md["tokenizer.ggml.bos_token_id"]
    m.trainer_spec.eos_id = md["tokenizer.ggml.eos_token_id"]
    m.trainer_spec.pad_id = md.get("tokenizer.ggml.padding_token_id", -1)
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    return sentencepiece.SentencePieceProcessor(model_proto=m.SerializeToString())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    args = p.parse_args()
    path = resolve_source(args.model)
    md = GGUFFile(path).metadata
    sp = sentencepiece_from_gguf(md)
    ours = Tokenizer.from_gguf_metadata(md, str(path))
    ref = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    paragraphs = english_text().split("\n\n")
    differ = {"jaxinfer": 0, "transformers": 0}
    for text in paragraphs:
        truth = sp.encode(text)
        differ["jaxinfer"] += ours.encode(text) != truth
        differ["transformers"] += ref.encode(text, add_special_tokens=False) != truth
    print(f"{args.model}: {len(paragraphs)} paragraphs; differing from SentencePiece: "
          f"jaxinfer {differ['jaxinfer']}, transformers {differ['transformers']}")
    print(f"33 spaces: sentencepiece {sp.encode(' ' * 33)}, jaxinfer {ours.encode(' ' * 33)}, "
          f"transformers {ref.encode(' ' * 33, add_special_tokens=False)}")


if __name__ == "__main__":
    main()
