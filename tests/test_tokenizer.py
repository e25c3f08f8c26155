"""Tokenizer and chat-template tests against transformers' tokenizer for the same GGUF.

The reference is ``AutoTokenizer.from_pretrained(dir, gguf_file=name)`` on the built-in SmolLM2
GGUF. It matches ours everywhere except one place where transformers is not faithful to the model.

SmolLM2's GGUF says ``tokenizer.ggml.pre = "smollm"``. llama.cpp (src/llama-vocab.cpp) splits that
type with two regexes in turn, ``\\p{N}`` and then GPT-2's: every number character is its own piece
before the GPT-2 split -- the same as the original SmolLM2 ``tokenizer.json`` pre-tokenizer,
``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)]``.
transformers 5.x (integrations/gguf/gguf_tokenizer_mapping.py, GGUF_PRE_TOKENIZER_SPLITS) has no
"smollm" entry and falls back to plain GPT-2 ByteLevel. The vocabulary holds no multi-digit
tokens, so digit runs still come out one digit per token, but GPT-2's ``\\s+(?!\\S)`` and
`` ?\\p{N}+`` cut whitespace differently right before a number:

    text        model (and us)     transformers
    "a  1"      a ĠĠ 1             a Ġ Ġ 1
    "\\n\\n2."  ĊĊ 2 .             Ċ Ċ 2 .
    " ½"        Ġ Â½               ĠÂ ½

So encode is compared with transformers only on text without whitespace runs before numbers; the
faithful behaviour is pinned separately, and checked on all text against transformers' own
vocabulary and merges with the original pre-tokenizer put back (``faithful_ref``).
"""

import json
import os
import random
import shutil
from hashlib import sha256

import pytest
import tokenizers
from tokenizers import pre_tokenizers

from jaxinfer.chat_template import render_chat_template
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.loading.gguf import GGUFFile
from jaxinfer.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# Text on which transformers' GGUF tokenizer and the model's real tokenizer agree.
TEXTS = [
    "Hello, world! How are you doing today?",
    "The quick brown fox jumps over the lazy dog. I'm sure they'll say it's fine, don't you?",
    "Café naïve résumé façade Ångström Übermaß",
    "你好，世界！这是一个测试。日本語のテキストとカタカナ",
    "مرحبا بالعالم، كيف حالك؟",
    "Emoji: 😀👍🏽🇺🇸 ❤️ family 👨‍👩‍👧‍👦 coder 🧑🏽‍💻 🦙🦙",
    "  leading spaces\tand\ttabs\n\n\nthree newlines   trailing   ",
    "\t\t\n \n",
    "def square(x):\n    return x ** 2  # comment\n\nprint(square(3))\n",
    'if (a && b) { console.log("ok"); } // <tag attr="v">',
    "1234567 and 3.14159 and 1,000,000 and -42 and 2024-01-15",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more <repo_name> and <|im_end|>",
    "",
]
# Text where they differ: whitespace runs (or a space before a non-ASCII number) before numbers.
NUMBER_TEXTS = ["a  1", "x =    42\n    10", "\n\n2. Second item", "   3", "½ and  ² ①②", " ٣"]
# llama.cpp's convert_hf_to_gguf.py pre-tokenizer probe; sha256 of str(ids) identifies "smollm".
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis "
    "concatenated) ✅ 🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 "
    "កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= нещо на Български "
    "''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)
SMOLLM_CHKHSH = "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"

CHATS = {
    "single": [{"role": "user", "content": "What is 2+2?"}],
    "system": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a color."},
    ],
    "multi": [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke about 🦙."},
    ],
    "multi_system": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hey"},
        {"role": "user", "content": "Bye"},
    ],
}


@pytest.fixture(scope="module")
def metadata(smollm2_gguf_path):
    return GGUFFile(smollm2_gguf_path).metadata


@pytest.fixture(scope="module")
def tok(metadata, smollm2_gguf_path):
    return Tokenizer.from_gguf_metadata(metadata, str(smollm2_gguf_path))


@pytest.fixture(scope="module")
def ref(smollm2_gguf_path):
    path = str(smollm2_gguf_path)
    return transformers.AutoTokenizer.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path)
    )


@pytest.fixture(scope="module")
def faithful_ref(ref):
    """transformers' vocabulary, merges and special tokens with SmolLM2's real pre-tokenizer."""
    backend = tokenizers.Tokenizer.from_str(ref.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return backend


@pytest.fixture(scope="module")
def hf_dir(ref, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2_hf")
    ref.save_pretrained(path)
    return path


def _fuzz_texts(count=400, seed=0):
    alphabet = "ab Z1\t\n27½é世😀.-'  "
    rng = random.Random(seed)
    return ["".join(rng.choices(alphabet, k=rng.randint(1, 14))) for _ in range(count)]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, ref, text):
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == ref.decode(ids) == text
    assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


def test_decode_matches_transformers_everywhere(tok, ref):
    for text in NUMBER_TEXTS + _fuzz_texts():
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(tok.encode(text)) == text


def test_numbers_split_like_the_original_tokenizer(tok, faithful_ref):
    def pieces(text):
        return [tok.id_to_token(i) for i in tok.encode(text)]

    assert pieces("1234567") == list("1234567")
    assert pieces("pi=3.14159") == ["pi", "=", "3", ".", "1", "4", "1", "5", "9"]
    # Where transformers' GGUF tokenizer differs (see the module docstring):
    assert pieces("a  1") == ["a", "ĠĠ", "1"]  # transformers: a, Ġ, Ġ, 1
    assert pieces("\n\n2.") == ["ĊĊ", "2", "."]  # transformers: Ċ, Ċ, 2, .
    assert pieces("x =    42") == ["x", "Ġ=", "ĠĠĠĠ", "4", "2"]  # transformers: ĠĠĠ, Ġ, 4, 2
    assert pieces(" ½") == ["Ġ", "Â½"]  # transformers: ĠÂ, ½
    for text in TEXTS + NUMBER_TEXTS + _fuzz_texts(seed=1) + [CHKTXT]:
        assert tok.encode(text) == faithful_ref.encode(text, add_special_tokens=False).ids, text


def test_llama_cpp_pretokenizer_probe(tok):
    """llama.cpp names SmolLM's pre-tokenizer "smollm" from the hash of its ids for CHKTXT."""
    assert sha256(str(tok.encode(CHKTXT)).encode()).hexdigest() == SMOLLM_CHKHSH


def test_special_tokens(tok, ref):
    assert tok.vocab_size == len(ref) == 49152
    assert tok.bos_token_id == ref.bos_token_id == 1
    assert tok.eos_token_id == ref.eos_token_id == 2
    assert tok.pad_token_id == ref.pad_token_id == 2
    assert tok.eos_token_ids == (2, 0)  # <|im_end|>, then <|endoftext|> which also ends a turn
    assert not tok.add_bos_token
    assert tok.token_to_id("<|im_start|>") == 1 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.encode("<|im_start|>") == [1] and tok.encode("<jupyter_code>") == [13]
    assert tok.id_to_token(10**6) is None and tok.token_to_id("no such token") is None
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    with pytest.raises(InputError, match="str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("chat", sorted(CHATS))
def test_chat_template_matches_transformers(tok, ref, chat, add_generation_prompt):
    messages = CHATS[chat]
    expected = ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == expected
    assert tok.apply_chat_template(messages) == ref.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


FEATURE_TEMPLATE = """\
{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    {% generation %}[{{ m.role }}] {{ m.content | tojson }} {{ m | tojson(indent=2, sort_keys=True) }}{% endgeneration %}
{% endfor %}
n={{ ns.n }} {{ dict(a=1) | tojson }} {{ bos_token }}{{ eos_token }} {{ extra_flag }} {{ tools }}
{% if add_generation_prompt %}GO{% endif %}
"""  # noqa: E501


def test_template_features_match_transformers(tok, ref):
    messages = [
        {"role": "user", "content": 'Ünï <b>"&"</b>', "name": None},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
    ]
    expected = ref.apply_chat_template(
        messages, chat_template=FEATURE_TEMPLATE, tokenize=False, extra_flag="yes"
    )
    got = render_chat_template(
        FEATURE_TEMPLATE, messages, add_generation_prompt=False,
        special_tokens={"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, extra_flag="yes",
    )
    assert got == expected
    assert render_chat_template("{{ strftime_now('%Y') }}", [{"role": "user", "content": ""}])


def test_from_hf_dir_matches_transformers(ref, hf_dir):
    loaded = Tokenizer.from_hf_dir(hf_dir)
    assert loaded is not None
    # The saved tokenizer.json is transformers' own, so it agrees on every text, numbers included.
    for text in TEXTS + NUMBER_TEXTS + _fuzz_texts(100):
        ids = loaded.encode(text)
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert loaded.decode(ids) == ref.decode(ids)
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id) == (1, 2, 2)
    assert loaded.eos_token_ids == (2, 0) and loaded.vocab_size == len(ref)
    assert not loaded.add_bos_token
    for messages in CHATS.values():
        for gen in (True, False):
            assert loaded.apply_chat_template(messages, add_generation_prompt=gen) == (
                ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            )


def test_from_hf_dir_reads_config_files(hf_dir, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(hf_dir / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    template = (hf_dir / "chat_template.jinja").read_text()
    config["chat_template"] = [{"name": "default", "template": template}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    loaded = Tokenizer.from_hf_dir(tmp_path)
    assert loaded.chat_template == template
    assert loaded.eos_token_ids == (2, 5, 0)
    assert Tokenizer.from_hf_dir(tmp_path / "missing") is None
    (tmp_path / "tokenizer.json").unlink()
    assert Tokenizer.from_hf_dir(tmp_path) is None


@pytest.mark.parametrize("skip", [False, True])
def test_stream_decoder(tok, skip):
    text = "Hi 👨‍👩‍👧‍👦 家族 🇯🇵 naïve — “quotes” <|im_end|> 日本語 😀😀\n\n1. x"
    ids = tok.encode(text)
    stream = tok.stream_decoder(skip_special_tokens=skip)
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces  # the emoji bytes span several tokens and are held back
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + stream.flush() == tok.decode(ids, skip_special_tokens=skip)
    for n in range(len(ids) + 1):  # any prefix, including one ending mid-character
        stream = tok.stream_decoder()
        pieces = [stream.push(i) for i in ids[:n]]
        assert "".join(pieces) + stream.flush() == tok.decode(ids[:n])


def test_gguf_errors(metadata):
    def build(**changes):
        md = {k: v for k, v in {**metadata, **changes}.items() if v is not None}
        return Tokenizer.from_gguf_metadata(md, "m.gguf")

    with pytest.raises(CheckpointError, match=r"m\.gguf.*tokenizer\.ggml\.tokens"):
        build(**{"tokenizer.ggml.tokens": None})
    with pytest.raises(CheckpointError, match=r"m\.gguf.*tokenizer\.ggml\.model"):
        build(**{"tokenizer.ggml.model": None})
    with pytest.raises(CheckpointError, match="unsupported tokenizer model 'bert'"):
        build(**{"tokenizer.ggml.model": "bert"})
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.merges"):
        build(**{"tokenizer.ggml.merges": None})
    with pytest.raises(CheckpointError, match="unsupported pre-tokenizer 'mystery'"):
        build(**{"tokenizer.ggml.pre": "mystery"})
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.token_type"):
        build(**{"tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.eos_token_id should be int"):
        build(**{"tokenizer.ggml.eos_token_id": "2"})
    no_template = build(**{"tokenizer.chat_template": None})
    with pytest.raises(InputError, match=r"m\.gguf has no chat template"):
        no_template.apply_chat_template(CHATS["single"])


def test_corrupt_hf_files(hf_dir, tmp_path):
    shutil.copy(hf_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="tokenizer_config.json: not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab"')
    with pytest.raises(CheckpointError, match="tokenizer.json: not valid JSON"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "Nonsense"}}')
    with pytest.raises(CheckpointError, match="tokenizer.json: not a usable tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_template_errors(tok):
    chat = CHATS["single"]
    with pytest.raises(InputError, match="Only user and assistant roles"):
        render_chat_template("{{ raise_exception('Only user and assistant roles') }}", chat)
    with pytest.raises(InputError, match="failed to parse"):
        render_chat_template("{% for m in messages %}{{ m.content }}", chat)
    with pytest.raises(InputError, match="chat template error"):
        render_chat_template("{{ messages[0].content + 1 }}", chat)
    with pytest.raises(InputError, match="underscore"):
        render_chat_template("{% set ns = namespace(_x=1) %}", chat)
    with pytest.raises(InputError, match="non-empty list"):
        tok.apply_chat_template([])


def _write_spm_gguf(path):
    """A tiny SentencePiece-style ("llama") GGUF: byte tokens, scored pieces, one added token."""
    import gguf
    import numpy as np

    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types, scores = [2, 3, 3] + [6] * 256, [0.0] * 259
    pieces = "▁ h e l o w r d a n t é he ll llo hello ▁hello ▁w or ▁wor ld ▁world ▁h an ▁an "
    pieces += "▁and ▁t th ▁th ▁the ▁▁ ▁▁▁▁ lo ▁he ▁hel"
    for i, piece in enumerate(pieces.split()):
        tokens.append(piece)
        types.append(1)
        scores.append(-float(i) if len(piece) == 1 else -0.5 * i - 1)
    tokens, types, scores = tokens + ["<|user|>"], types + [4], scores + [0.0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_sentencepiece_gguf_matches_transformers(tmp_path):
    _write_spm_gguf(tmp_path / "spm.gguf")
    ours = Tokenizer.from_gguf_metadata(GGUFFile(tmp_path / "spm.gguf").metadata, "spm.gguf")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    texts = ["hello world", " hello  world", "the and hello", "héllo\nworld", "   the", "日本 x",
             "<|user|>hello</s>x", ""]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True
        )
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos_token) == (1, (2,), True)
    # A run of <0xXX> tokens decodes as a whole, so streaming must hold it back until it ends.
    ids = ours.encode("hello 日本 world é")
    for n in range(len(ids) + 1):
        stream = ours.stream_decoder()
        pieces = [stream.push(i) for i in ids[:n]]
        assert "".join(pieces) + stream.flush() == ours.decode(ids[:n])
