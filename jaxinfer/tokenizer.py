"""Text to token ids and back, built from a Hugging Face directory or from GGUF metadata.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` with what generation needs: BOS, end-of-generation
and padding ids, the chat template and a streaming decoder. ``encode`` never adds special tokens.

A GGUF has no ``tokenizer.json``, so the tokenizer is rebuilt from llama.cpp's metadata: ``gpt2``
is byte-level BPE from tokens and merges, split first as ``tokenizer.ggml.pre`` names; ``llama``
is SentencePiece-style BPE from tokens and scores with byte fallback. Control tokens become
special tokens and user-defined ones plain added tokens: both are matched whole in text, and only
control tokens are dropped by ``decode(..., skip_special_tokens=True)`` (as in llama.cpp).
"""
from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.loading.hf_dir import read_json

_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
# Special tokens that end a turn or a document; llama.cpp ends generation on these as well.
_EOG_TEXTS = frozenset(
    "<|endoftext|> <|im_end|> <|eot_id|> <|eom_id|> <|end_of_text|> <|end|> <end_of_turn> <EOT> "
    "<|return|> <|end▁of▁sentence|>".split()
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre (llama.cpp's names) -> the split before byte-level BPE. None: GPT-2's regex
# alone. "digits": each number character is its own piece, then GPT-2's regex -- what llama.cpp
# does for these types and what their tokenizer.json says (Digits(individual_digits), ByteLevel).
_PRE_SPLITS = {
    name: split
    for names, split in (
        ("default gpt-2 gpt2 mpt olmo jais phi-2 roberta-bpe", None),
        ("smollm starcoder refact command-r codeshell exaone minerva", "digits"),
        ("llama3 llama-v3 llama-bpe falcon3 pixtral smaug-bpe dbrx", _LLAMA3_SPLIT),
        ("qwen2 deepseek-r1-qwen stablelm2 megrez", _LLAMA3_SPLIT.replace("{1,3}", "")),
    )
    for name in names.split()
}


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character standing for each byte 0..255."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _field(metadata: dict, key: str, kind: type, source: str, required: bool = False):
    value = metadata.get(key)
    if value is None and required:
        raise CheckpointError(f"{source}: tokenizer metadata lacks {key}")
    wrong = not isinstance(value, kind) or (kind is int and isinstance(value, bool))
    if value is not None and wrong:
        raise CheckpointError(f"{source}: {key} should be {kind.__name__}, got {value!r:.80}")
    return value


def _gguf_bpe(metadata: dict, tokens: list[str], types: list[int], source: str):
    merges = _field(metadata, "tokenizer.ggml.merges", list, source, required=True)
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_SPLITS:
        raise CheckpointError(f"{source}: unsupported pre-tokenizer {pre!r} (tokenizer.ggml.pre)")
    alphabet = _byte_chars()
    vocab = {}
    for i, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind not in (_CONTROL, _USER_DEFINED) and not set(token) <= set(alphabet):
            token = "".join(alphabet[b] for b in token.encode("utf-8"))  # stored as raw text
        vocab[token] = i
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else () for m in merges]
    if any(len(p) != 2 for p in pairs):
        raise CheckpointError(f"{source}: tokenizer.ggml.merges holds an entry that is not 'a b'")
    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab, pairs))
    except Exception as e:
        raise CheckpointError(f"{source}: tokenizer.ggml.merges do not fit the tokens: {e}") from e
    split = _PRE_SPLITS[pre]
    level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split in (None, "digits"))
    backend.pre_tokenizer = level
    if split is not None:
        first = pre_tokenizers.Digits(individual_digits=True) if split == "digits" else None
        first = first or pre_tokenizers.Split(Regex(split), behavior="isolated")
        backend.pre_tokenizer = pre_tokenizers.Sequence([first, level])
    backend.decoder = decoders.ByteLevel()
    return backend


def _gguf_spm(metadata: dict, tokens: list[str], types: list[int], source: str):
    scores = _field(metadata, "tokenizer.ggml.scores", list, source, required=True)
    if len(scores) != len(tokens):
        raise CheckpointError(f"{source}: tokenizer.ggml.scores and tokens differ in length")
    vocab = {token: i for i, token in enumerate(tokens)}
    # SentencePiece joins the adjacent pair whose joined piece scores highest: BPE whose merges
    # build each normal piece, ranked by that piece's score.
    ranked = []
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types, strict=True)):
        for cut in range(1, len(piece) if kind == _NORMAL else 0):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-score, -cut, cut, index, vocab[left], vocab[right]))
    merges = [(tokens[a], tokens[b]) for *_, a, b in sorted(ranked)]
    unk = _field(metadata, "tokenizer.ggml.unknown_token_id", int, source)
    unk = tokens[unk] if unk is not None and 0 <= unk < len(tokens) else None
    model = models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    prefix = metadata.get("tokenizer.ggml.add_space_prefix", True)
    scheme = "first" if prefix else "never"
    backend.pre_tokenizer = pre_tokenizers.Metaspace("▁", prepend_scheme=scheme, split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return backend


def _is_id(value, size: int) -> bool:
    return type(value) is int and 0 <= value < size


class Tokenizer:
    """A checkpoint's tokenizer: ``encode``/``decode``, special ids and the chat template.

    ``eos_token_ids`` holds every id that ends generation: the checkpoint's EOS id(s) first, then
    special tokens that end a turn or document (``<|im_end|>``, ``<|endoftext|>``, ...).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_token_id=None, eos_token_ids=(),
                 pad_token_id=None, unk_token_id=None, chat_template: str | None = None,
                 add_bos_token: bool = False, vocab_size: int | None = None,
                 source: str = "tokenizer"):
        self.backend, self.source = backend, source
        self.vocab_size = size = vocab_size or backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id, self.pad_token_id, self.unk_token_id = (
            i if _is_id(i, size) else None for i in (bos_token_id, pad_token_id, unk_token_id)
        )
        ends = [*eos_token_ids, *(i for i, t in backend.get_added_tokens_decoder().items()
                                  if t.special and t.content in _EOG_TEXTS)]
        ends = [i for i in ends if _is_id(i, size)]
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ends))
        self.chat_template = chat_template or None
        self.add_bos_token = bool(add_bos_token)
        # <0xXX> tokens of a byte-fallback vocabulary: a run of them decodes as a whole.
        fallback = getattr(backend.model, "byte_fallback", False)
        byte_ids = (backend.token_to_id(f"<0x{b:02X}>") for b in range(256 if fallback else 0))
        self._byte_ids = frozenset(i for i in byte_ids if i is not None)

    @property
    def eos_token_id(self) -> int | None:
        """The main end-of-sequence id (the first of ``eos_token_ids``)."""
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @classmethod
    def from_gguf_metadata(cls, metadata: dict, source: str) -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes; CheckpointError names ``source`` and the key."""
        kind = _field(metadata, "tokenizer.ggml.model", str, source, required=True)
        tokens = _field(metadata, "tokenizer.ggml.tokens", list, source, required=True)
        if not tokens or not all(isinstance(t, str) for t in tokens):
            raise CheckpointError(f"{source}: tokenizer.ggml.tokens must be a non-empty str list")
        types = _field(metadata, "tokenizer.ggml.token_type", list, source) or [1] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{source}: tokenizer.ggml.token_type and tokens differ in size")
        builders = {"gpt2": _gguf_bpe, "llama": _gguf_spm}
        if kind not in builders:
            raise CheckpointError(f"{source}: unsupported tokenizer model {kind!r} "
                                  "(tokenizer.ggml.model); supported: gpt2, llama")
        backend = builders[kind](metadata, tokens, types, source)
        for kind_id, special in ((_CONTROL, True), (_USER_DEFINED, False)):
            added = [t for t, k in zip(tokens, types, strict=True) if k == kind_id]
            add = backend.add_special_tokens if special else backend.add_tokens
            add([AddedToken(t, special=special, normalized=False) for t in added])
        ids = {name: _field(metadata, f"tokenizer.ggml.{name}_token_id", int, source)
               for name in ("bos", "eos", "eot", "eom", "padding", "unknown")}
        return cls(
            backend, bos_token_id=ids["bos"], eos_token_ids=(ids["eos"], ids["eot"], ids["eom"]),
            pad_token_id=ids["padding"], unk_token_id=ids["unknown"], vocab_size=len(tokens),
            add_bos_token=metadata.get("tokenizer.ggml.add_bos_token", kind == "llama"),
            chat_template=metadata.get("tokenizer.chat_template"), source=source,
        )

    _STATE_FIELDS = ("bos_token_id", "eos_token_ids", "pad_token_id", "unk_token_id",
                     "chat_template", "add_bos_token", "vocab_size")

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The ``tokenizers.Tokenizer`` (from ``from_state``: parsed on first use)."""
        if self._backend is None:
            try:
                self._backend = tokenizers.Tokenizer.from_str(self._pending)
            except Exception as e:
                raise CheckpointError(f"{self.source}: the cached tokenizer cannot be rebuilt "
                                      f"({e})") from None
            self._pending = None
        return self._backend

    @backend.setter
    def backend(self, value: tokenizers.Tokenizer) -> None:
        self._backend, self._pending = value, None

    def state(self) -> dict:
        """Everything ``from_state`` needs to rebuild this tokenizer, as a JSON-able dict (the
        backend as its tokenizer.json text)."""
        state = {name: getattr(self, name) for name in self._STATE_FIELDS}
        state["eos_token_ids"] = list(self.eos_token_ids)
        return {**state, "byte_ids": sorted(self._byte_ids), "backend": self.backend.to_str(),
                "tokenizers": tokenizers.__version__}

    @classmethod
    def from_state(cls, state: dict, source: str) -> Tokenizer:
        """The tokenizer ``state()`` described. Its backend (~0.2 s for a 49k vocabulary) is
        parsed on first use, so loading a model costs nothing for it. ValueError if the state
        was written by another version of the tokenizers library or lacks a field (the caller
        rebuilds it then)."""
        if state.get("tokenizers") != tokenizers.__version__:
            raise ValueError(f"tokenizer state from tokenizers {state.get('tokenizers')}")
        missing = {*cls._STATE_FIELDS, "byte_ids", "backend"} - set(state)
        if missing:
            raise ValueError(f"tokenizer state lacks {sorted(missing)}")
        self = cls.__new__(cls)
        for name in cls._STATE_FIELDS:
            setattr(self, name, state[name])
        self.eos_token_ids = tuple(state["eos_token_ids"])
        self._byte_ids, self.source = frozenset(state["byte_ids"]), source
        self._backend, self._pending = None, state["backend"]
        return self

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer | None:
        """Load ``tokenizer.json`` and the config files beside it; None without tokenizer.json."""
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            return None
        read_json(file, missing_ok=True)
        try:
            backend = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: not a usable tokenizer.json ({e})") from e
        config = read_json(path / "tokenizer_config.json", missing_ok=True)
        special_map = read_json(path / "special_tokens_map.json", missing_ok=True)
        generation = read_json(path / "generation_config.json", missing_ok=True)
        model_config = read_json(path / "config.json", missing_ok=True)
        model_config = {**model_config.get("text_config", {}), **model_config}
        known = backend.get_added_tokens_decoder()
        for index, spec in (config.get("added_tokens_decoder") or {}).items():
            content = spec.get("content") if isinstance(spec, dict) else None
            # Added tokens the config lists but tokenizer.json lacks (ids must agree).
            if content and int(index) not in known and backend.token_to_id(content) == int(index):
                keys = ("single_word", "lstrip", "rstrip", "normalized", "special")
                backend.add_tokens([AddedToken(content, **{k: spec[k] for k in keys if k in spec})])

        def ids(name: str) -> list:
            text = config.get(f"{name}_token") or special_map.get(f"{name}_token")
            text = text.get("content") if isinstance(text, dict) else text
            found = [backend.token_to_id(text) if isinstance(text, str) else None]
            for cfg in (generation, model_config):
                value = cfg.get(f"{name}_token_id")
                found += value if isinstance(value, list) else [value]
            return [i for i in found if i is not None] or [None]

        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default", next(iter(named.values()), None))
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        bos = ids("bos")[0]
        add_bos = config.get("add_bos_token")
        if not isinstance(add_bos, bool):  # ask the post-processor
            add_bos = bos is not None and backend.encode("a").ids[:1] == [bos]
        return cls(
            backend, bos_token_id=bos, eos_token_ids=ids("eos"), pad_token_id=ids("pad")[0],
            unk_token_id=ids("unk")[0], chat_template=template, add_bos_token=add_bos,
            source=str(path),
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens written in it are matched, none are added."""
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; ``skip_special_tokens`` drops control tokens (``<|im_end|>``)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (spelled as in the vocabulary), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id, or None if out of range."""
        return self.backend.id_to_token(int(token_id))

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        """Render ``messages`` with the checkpoint's chat template (InputError if it has none)."""
        from jaxinfer.chat_template import render_chat_template  # jinja2 only when chatting

        names = {"bos_token": self.bos_token_id, "eos_token": self.eos_token_id,
                 "unk_token": self.unk_token_id, "pad_token": self.pad_token_id}
        special = {name: self.id_to_token(i) for name, i in names.items() if i is not None}
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            special_tokens=special, source=self.source, **extra,
        )

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder that turns generated ids into text as soon as the text is complete."""
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Incremental detokenizer: ``push`` ids one at a time, then ``flush``.

    Each ``push`` decodes a short window (the ids not yet emitted, after the ids of the last emitted
    piece for context) and returns the text the new id completed. Text ending in an incomplete
    UTF-8 sequence is held back until an id completes it, and so is a run of byte-fallback tokens
    until it ends (one bad byte turns the whole run into U+FFFD). The pushes and ``flush``
    concatenate to ``decode(all_ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._ids: list[int] = []
        self._start = self._read = 0  # window start; end of the ids already emitted
        self._emitted: list[str] = []

    def _decode(self, ids) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one id; return the newly completed text ("" if none yet)."""
        self._ids.append(int(token_id))
        if self._ids[-1] in self._tokenizer._byte_ids:
            return ""
        before = self._decode(self._ids[self._start : self._read])
        after = self._decode(self._ids[self._start :])
        if len(after) <= len(before) or after.endswith("\ufffd") or not after.startswith(before):
            return ""
        self._start, self._read = self._read, len(self._ids)
        self._emitted.append(after[len(before) :])
        return self._emitted[-1]

    def flush(self) -> str:
        """Return the text still held back (an incomplete character decodes as U+FFFD)."""
        full, done = self._decode(self._ids), "".join(self._emitted)
        rest = full[len(done) :] if full.startswith(done) else ""
        self._emitted.append(rest)
        return rest
