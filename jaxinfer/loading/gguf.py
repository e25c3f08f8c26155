"""Reading GGUF checkpoints (llama.cpp's file format) and mapping them to Hugging Face Llama.

`GGUFFile` parses the header with our own reader (gguf_reader.py) and memory-maps the file:
tensor bytes are read only when a tensor is loaded. Dequantization is done here in numpy, block
by block, following the ggml block layouts (see the `_deq_*` functions). Shapes are given in
numpy/PyTorch order, the reverse of GGML's `ne` order, so a 2-D weight is `(out_features, in_features)`.

`hf_config_from_gguf` and `hf_tensor_items` turn a llama or gemma3 GGUF into a Hugging Face
`config.json`-style dict and a `LlamaForCausalLM` / `Gemma3ForCausalLM` state dict (float32, one
tensor at a time), undoing what llama.cpp's converter changed: the row permutation of a llama's
Q and K projections, the 1 added to Gemma's norm weights.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from jaxinfer.errors import CheckpointError
from jaxinfer.loading.convert import NAMES, gguf_name, hf_name
from jaxinfer.loading.gguf_reader import GGUFByteOrderError, GGUFFormatError, map_file, read_header

_CHUNK_BLOCKS = 1 << 16  # blocks dequantized per numpy pass, bounds temporary memory


# ----------------------------------------------------------------------------- dequantization
# Each function takes `b`, a uint8 array (n_blocks, type_size) of packed blocks, and returns
# float32 (n_blocks, block_size) in the order ggml's reference dequantize_row_* writes them.


def _f16(b: np.ndarray) -> np.ndarray:
    """(n, 2k) uint8 little-endian halves -> (n, k) float32."""
    return b.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, m) uint8 -> (n, 2m): all low nibbles, then all high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _deq_f32(b: np.ndarray) -> np.ndarray:
    return b.view(np.float32).copy()


def _deq_bf16(b: np.ndarray) -> np.ndarray:
    return (b.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def _deq_q8_0(b: np.ndarray) -> np.ndarray:
    """block_q8_0: f16 d, int8 qs[32]; x = d * q."""
    return b[:, 2:].view(np.int8).astype(np.float32) * _f16(b[:, :2])


def _deq_q4_0(b: np.ndarray) -> np.ndarray:
    """block_q4_0: f16 d, qs[16] (x[j] low nibble, x[j+16] high nibble); x = d * (q - 8)."""
    q = _nibbles(b[:, 2:]).astype(np.float32) - 8.0
    return _f16(b[:, :2]) * q


def _deq_q4_1(b: np.ndarray) -> np.ndarray:
    """block_q4_1: f16 d, f16 m, qs[16]; x = d * q + m."""
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).astype(np.float32) + _f16(b[:, 2:4])


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(n, 4) uint8 qh of a Q5_0/Q5_1 block -> (n, 32) uint8: 16 where bit j of the
    little-endian 32-bit qh is set (value j's fifth bit), else 0."""
    word = qh.copy().view("<u4")  # (n, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8) << 4


def _deq_q5_0(b: np.ndarray) -> np.ndarray:
    """block_q5_0: f16 d, qh[4] (bit j: the 5th bit of value j), qs[16] (as Q4_0);
    x = d * (q - 16)."""
    q = (_nibbles(b[:, 6:]) | _fifth_bits(b[:, 2:6])).astype(np.float32) - 16.0
    return _f16(b[:, :2]) * q


def _deq_q5_1(b: np.ndarray) -> np.ndarray:
    """block_q5_1: f16 d, f16 m, qh[4], qs[16] (as Q5_0); x = d * q + m."""
    q = (_nibbles(b[:, 8:]) | _fifth_bits(b[:, 4:8])).astype(np.float32)
    return _f16(b[:, :2]) * q + _f16(b[:, 2:4])


def _q4_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes of packed 6-bit (scale, min) pairs per block -> two (n, 8) uint8 arrays.

    Sub-blocks 0..3 use the low 6 bits of bytes 0..3 (scale) and 4..7 (min); sub-blocks 4..7 take
    their low 4 bits from bytes 8..11 (scale: low nibble, min: high nibble) and their top 2 bits
    from the top 2 bits of bytes 0..3 (scale) and 4..7 (min).
    """
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scale = np.concatenate([s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)], axis=1)
    minimum = np.concatenate([s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)], axis=1)
    return scale, minimum


def _deq_q4_k(b: np.ndarray) -> np.ndarray:
    """block_q4_K (256 values, 8 sub-blocks of 32): f16 d, f16 dmin, scales[12], qs[128].

    Each 32-byte run of qs holds two sub-blocks: low nibbles first, then high nibbles.
    x = d * scale[j] * q - dmin * min[j].
    """
    n = b.shape[0]
    scale, minimum = _q4_k_scales(b[:, 4:16])
    q = b[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (q & 0x0F).reshape(n, 8, 32).astype(np.float32)
    d = (_f16(b[:, 0:2]) * scale.astype(np.float32))[:, :, None]
    m = (_f16(b[:, 2:4]) * minimum.astype(np.float32))[:, :, None]
    return (d * q - m).reshape(n, 256)


def _deq_q5_k(b: np.ndarray) -> np.ndarray:
    """block_q5_K (256 values, 8 sub-blocks of 32): f16 d, f16 dmin, scales[12] (as Q4_K),
    qh[32], qs[128] (as Q4_K). Value l of sub-block j takes bit j of qh[l] as its 5th bit;
    x = d * scale[j] * q - dmin * min[j]."""
    n = b.shape[0]
    scale, minimum = _q4_k_scales(b[:, 4:16])
    low = b[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    high = (b[:, 16:48][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = ((low & 0x0F).reshape(n, 8, 32) | (high << 4)).astype(np.float32)
    d = (_f16(b[:, 0:2]) * scale.astype(np.float32))[:, :, None]
    m = (_f16(b[:, 2:4]) * minimum.astype(np.float32))[:, :, None]
    return (d * q - m).reshape(n, 256)


def _deq_q6_k(b: np.ndarray) -> np.ndarray:
    """block_q6_K (256 values): ql[128], qh[64], int8 scales[16], f16 d.

    Each half of 128 values uses 64 bytes of ql and 32 of qh: value 32k + l (k = 0..3) takes the
    low (k < 2) or high nibble of ql[l + 32 * (k % 2)] and bits 2k..2k+1 of qh[l] as its top two
    bits; q - 32 is scaled by d * scales[i // 16] for value i.
    """
    n = b.shape[0]
    ql = b[:, :128].reshape(n, 2, 2, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (n, half, k, l)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = (low | ((qh & 3) << 4)).astype(np.float32) - 32.0
    d = _f16(b[:, 208:210]) * b[:, 192:208].view(np.int8).astype(np.float32)
    return (d[:, :, None] * q.reshape(n, 16, 16)).reshape(n, 256)


# type name -> (values per block, bytes per block, dequantizer)
_DEQUANTIZERS: dict[str, tuple[int, int, Callable[[np.ndarray], np.ndarray]]] = {
    "F32": (1, 4, _deq_f32),
    "F16": (1, 2, _f16),
    "BF16": (1, 2, _deq_bf16),
    "Q8_0": (32, 34, _deq_q8_0),
    "Q4_0": (32, 18, _deq_q4_0),
    "Q4_1": (32, 20, _deq_q4_1),
    "Q5_0": (32, 22, _deq_q5_0),
    "Q5_1": (32, 24, _deq_q5_1),
    "Q4_K": (256, 144, _deq_q4_k),
    "Q5_K": (256, 176, _deq_q5_k),
    "Q6_K": (256, 210, _deq_q6_k),
}
SUPPORTED_TYPES: tuple[str, ...] = tuple(_DEQUANTIZERS)


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """Packed bytes (any shape, uint8) of a tensor of `type_name` -> flat float32 values."""
    block_size, type_size, fn = _DEQUANTIZERS[type_name]
    blocks = raw.reshape(-1, type_size)
    out = np.empty((blocks.shape[0], block_size), np.float32)
    for start in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        out[start : start + _CHUNK_BLOCKS] = fn(blocks[start : start + _CHUNK_BLOCKS])
    return out.reshape(-1)


# ----------------------------------------------------------------------------- GGUF file


class GGUFFile:
    """A memory-mapped GGUF file: metadata, tensor directory, and per-tensor loading.

    The header is parsed by `gguf_reader.read_header`. Raises `CheckpointError` if the path is
    missing, not a GGUF file, truncated or corrupt.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is not a file")
        try:
            with open(self.path, "rb") as f:
                magic = f.read(4)
            if magic != b"GGUF":
                raise CheckpointError(f"{self.path} is not a GGUF file (bad magic number)")
            self._mmap, self._data = map_file(self.path)
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read file ({e.strerror})") from None
        try:
            self.header = read_header(self._mmap)
        except GGUFByteOrderError as e:
            raise CheckpointError(f"{self.path}: {e}") from None
        except GGUFFormatError as e:
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF file: {e}") from None
        self.metadata: dict[str, object] = self.header.metadata
        self._tensors = self.header.tensors

    def header_bytes(self) -> bytes:
        """Bytes [0, end of the tensor directory): everything that describes the file."""
        return bytes(self._mmap[: self.header.header_end])

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r})"

    @property
    def architecture(self) -> str:
        """`general.architecture`, e.g. "llama"."""
        return str(self.require("general.architecture"))

    def require(self, key: str) -> object:
        """The metadata value for `key`; CheckpointError naming the key if it is missing."""
        if key not in self.metadata:
            raise CheckpointError(f"{self.path}: required metadata key {key} is missing")
        return self.metadata[key]

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named {name!r}") from None

    def tensor_names(self) -> list[str]:
        """Tensor names in file order."""
        return list(self._tensors)

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """Shape in numpy order (reversed GGML ne): a 2-D weight is (out, in)."""
        return tuple(reversed(self._tensor(name).ne))

    def tensor_type(self, name: str) -> str:
        """GGML type name, e.g. "Q4_1", "F32"."""
        return self._tensor(name).type_name

    def raw(self, name: str) -> np.ndarray:
        """The packed bytes as a read-only uint8 view of the mapped file (no copy).

        Shape (*tensor_shape[:-1], bytes_per_row); a row is a whole number of blocks.
        """
        t = self._tensor(name)
        shape = self.tensor_shape(name)
        data = self._data[t.offset : t.offset + t.n_bytes]
        return data.reshape(*shape[:-1], -1) if shape else data

    def release(self, name: str) -> None:
        """Drop tensor `name`'s pages of the mapped file from this process's resident memory
        (after its bytes were copied): they are read again, from the page cache, if touched."""
        t = self._tensor(name)
        if not isinstance(self._mmap, mmap.mmap) or t.n_bytes == 0:
            return
        start = t.offset // mmap.PAGESIZE * mmap.PAGESIZE
        self._mmap.madvise(mmap.MADV_DONTNEED, start, t.offset + t.n_bytes - start)

    def load(self, name: str) -> np.ndarray:
        """Dequantized float32 array of shape `tensor_shape(name)` (a fresh copy)."""
        type_name = self.tensor_type(name)
        if type_name not in _DEQUANTIZERS:
            raise CheckpointError(
                f"{self.path}: tensor {name} has unsupported type {type_name}; "
                f"supported types: {', '.join(SUPPORTED_TYPES)}"
            )
        return dequantize(self.raw(name), type_name).reshape(self.tensor_shape(name))


# ----------------------------------------------------------------------------- Hugging Face view

def _as_file(gguf_file: GGUFFile | str | os.PathLike[str]) -> GGUFFile:
    return gguf_file if isinstance(gguf_file, GGUFFile) else GGUFFile(gguf_file)


def _number(f: GGUFFile, key: str, kind: type = int, default: float | None = None):
    """Metadata `key` as a positive int or float; `default` if absent, else it is required."""
    value = f.require(key) if default is None else f.metadata.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and value > 0
    if not ok or (kind is int and value != int(value)):
        raise CheckpointError(
            f"{f.path}: metadata {key} = {value!r} is not a positive {kind.__name__}"
        )
    return kind(value)


def _token_id(f: GGUFFile, key: str) -> int | None:
    value = f.metadata.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
        raise CheckpointError(f"{f.path}: metadata {key} = {value!r} is not a token id")
    return value


ARCHITECTURES = ("llama", "gemma3")
ROPE_FREQS = "rope_freqs.weight"  # per-frequency RoPE factors, read into the config
# Gemma 3 hyper-parameters llama.cpp does not store but fixes in its code (llama-model.cpp):
# every 6th layer global, a RoPE base of 10000 on the sliding-window layers.
_GEMMA3_PATTERN, _GEMMA3_LOCAL_THETA = 6, 10000.0


def _rope_scaling(f: GGUFFile, arch: str) -> dict | None:
    """HF `rope_scaling` from {arch}.rope.scaling.* (or the old {arch}.rope.scale_linear)."""
    kind = f.metadata.get(f"{arch}.rope.scaling.type")
    if kind is None and f"{arch}.rope.scale_linear" in f.metadata:
        return {"rope_type": "linear", "factor": _number(f, f"{arch}.rope.scale_linear", float)}
    if kind in (None, "none"):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _number(f, f"{arch}.rope.scaling.factor", float)}
    raise CheckpointError(
        f"{f.path}: unsupported {arch}.rope.scaling.type {kind!r}; supported: none, linear"
    )


def hf_config_from_gguf(gguf_file: GGUFFile | str | os.PathLike[str]) -> dict:
    """A Hugging Face `config.json`-style dict for a llama GGUF (LlamaForCausalLM) or a gemma3
    one (Gemma3ForCausalLM, "gemma3_text")."""
    f = _as_file(gguf_file)
    arch = f.architecture
    if arch not in ARCHITECTURES:
        raise CheckpointError(
            f"{f.path}: unsupported architecture {arch} (general.architecture); supported: "
            f"{', '.join(ARCHITECTURES)}"
        )
    hidden = _number(f, f"{arch}.embedding_length")
    heads = _number(f, f"{arch}.attention.head_count")
    head_dim = _number(f, f"{arch}.attention.key_length", default=hidden // heads or 1)
    if head_dim * heads != hidden and f"{arch}.attention.key_length" not in f.metadata:
        raise CheckpointError(
            f"{f.path}: {arch}.embedding_length {hidden} is not divisible by "
            f"{arch}.attention.head_count {heads} and {arch}.attention.key_length is missing"
        )
    value_dim = _number(f, f"{arch}.attention.value_length", default=head_dim)
    if head_dim % 2 or value_dim != head_dim:
        raise CheckpointError(
            f"{f.path}: head dimension {head_dim} is odd or differs between keys and values"
        )
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": _vocab_size(f, arch),
        "hidden_size": hidden,
        "intermediate_size": _number(f, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _number(f, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _number(f, f"{arch}.attention.head_count_kv", default=heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _number(f, f"{arch}.attention.layer_norm_rms_epsilon", float),
        "rope_theta": _number(f, f"{arch}.rope.freq_base", float, default=10000.0),
        "max_position_embeddings": _number(f, f"{arch}.context_length"),
        "tie_word_embeddings": "output.weight" not in f.tensor_names(),
        "bos_token_id": _token_id(f, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _token_id(f, "tokenizer.ggml.eos_token_id"),
        "attention_bias": False,
        "mlp_bias": False,
    }
    rope_scaling = _rope_scaling(f, arch)
    if ROPE_FREQS in f.tensor_names():
        rope_scaling = _rope_factors(f, head_dim, rope_scaling)
    if arch == "gemma3":
        return _gemma3_config(f, config, rope_scaling)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_factors(f: GGUFFile, head_dim: int, scaling: dict | None) -> dict:
    """rope_freqs.weight (llama.cpp's converter writes it for Llama 3.1-style RoPE scaling: one
    factor per frequency that the frequency is divided by) as our "freq_factors" rope_scaling."""
    if scaling is not None:
        raise CheckpointError(f"{f.path}: both {ROPE_FREQS} and RoPE scaling metadata "
                              f"({scaling['rope_type']}); expected one")
    kind, shape = f.tensor_type(ROPE_FREQS), f.tensor_shape(ROPE_FREQS)
    if kind not in ("F32", "F16") or shape != (head_dim // 2,):
        raise CheckpointError(f"{f.path}: {ROPE_FREQS} is {kind} {shape}, expected F32 "
                              f"({head_dim // 2},) (one factor per RoPE frequency)")
    factors = f.load(ROPE_FREQS)
    if not (np.isfinite(factors).all() and (factors > 0).all()):
        raise CheckpointError(f"{f.path}: {ROPE_FREQS} holds factors that are not positive")
    return {"rope_type": "freq_factors", "factors": factors.tolist()}


def _gemma3_config(f: GGUFFile, config: dict, rope_scaling: dict | None) -> dict:
    """The Gemma3ForCausalLM config of a gemma3 GGUF, as llama.cpp runs it: every 6th layer
    global (the others see `sliding_window` tokens), local RoPE base 10000, rope scaling on the
    global layers only, attention scale 1/sqrt(head_dim) (27B, 62 layers: 1/sqrt(D / N))."""
    n_layers, full = config["num_hidden_layers"], {"rope_type": "default"}
    scalar = (config["hidden_size"] // config["num_attention_heads"] if n_layers == 62
              else config["head_dim"])
    config = {k: v for k, v in config.items() if k not in ("hidden_act", "rope_theta")}
    return config | {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_activation": "gelu_pytorch_tanh",
        "sliding_window": _number(f, "gemma3.attention.sliding_window"),
        "layer_types": ["full_attention" if (i + 1) % _GEMMA3_PATTERN == 0
                        else "sliding_attention" for i in range(n_layers)],
        "query_pre_attn_scalar": scalar,
        "rope_parameters": {
            "full_attention": full | (rope_scaling or {}) | {
                "rope_theta": _number(f, "gemma3.rope.freq_base", float, default=1e6)},
            "sliding_attention": {"rope_type": "default", "rope_theta": _GEMMA3_LOCAL_THETA},
        },
    }


def _vocab_size(f: GGUFFile, arch: str) -> int:
    """Rows of token_embd.weight, checked against {arch}.vocab_size when that is present."""
    rows = f.tensor_shape("token_embd.weight")[0]
    declared = f.metadata.get(f"{arch}.vocab_size")
    if declared is not None and declared != rows:
        raise CheckpointError(f"{f.path}: {arch}.vocab_size {declared!r} != token_embd rows "
                              f"{rows}")
    return rows


def names_table(config: dict) -> str:
    """The `convert.NAMES` table of a config from `hf_config_from_gguf`."""
    return "gemma3" if config["model_type"] == "gemma3_text" else "llama"


# Weights only some models of a names table have (the rest every model has).
_OPTIONAL = {"llama": ("layers/attn/q_norm", "layers/attn/k_norm")}


def _gguf_names(config: dict) -> dict[str, str]:
    """HF name -> GGUF name for every weight of the model `config` describes, in load order
    (from the one name table of its family, `convert.NAMES`)."""
    family = names_table(config)
    table = {p: n for p, n in NAMES[family].items()
             if n.gguf is not None and p not in _OPTIONAL.get(family, ())}
    if config.get("tie_word_embeddings", False):
        table.pop("lm_head")
    names = {}
    for path in ("embed",):
        names[hf_name(family, path)] = gguf_name(family, path)
    for i in range(config["num_hidden_layers"]):
        for path in table:
            if path.startswith("layers/"):
                names[hf_name(family, path, i)] = gguf_name(family, path, i)
    for path in ("final_norm", "lm_head"):
        if path in table:
            names[hf_name(family, path)] = gguf_name(family, path)
    return names


def _hf_shape(hf_name: str, config: dict) -> tuple[int, ...]:
    """Expected PyTorch shape of an HF Llama weight."""
    h, inter, hd = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    leaf = hf_name.split(".")[-2]
    return {
        "embed_tokens": (config["vocab_size"], h),
        "lm_head": (config["vocab_size"], h),
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (inter, h),
        "up_proj": (inter, h),
        "down_proj": (h, inter),
        "q_norm": (hd,),
        "k_norm": (hd,),
    }.get(leaf, (h,))


def hf_tensor_names(gguf_file: GGUFFile, config: dict) -> list[str]:
    """HF LlamaForCausalLM / Gemma3ForCausalLM state-dict names present in the file, in load
    order.

    CheckpointError if an expected tensor is missing, the file has tensors the model lacks,
    or a tensor's type cannot be dequantized (checked here, before any tensor is read).
    """
    names = _gguf_names(config)
    present = set(gguf_file.tensor_names()) - {ROPE_FREQS}
    missing = [g for g in names.values() if g not in present]
    extra = sorted(present - set(names.values()))
    if missing or extra:
        raise CheckpointError(
            f"{gguf_file.path}: tensors do not match a {gguf_file.architecture} model with "
            f"{config['num_hidden_layers']} layers (missing: {missing[:5] or 'none'}; "
            f"unexpected: {extra[:5] or 'none'})"
        )
    for name in names.values():
        kind = gguf_file.tensor_type(name)
        if kind not in _DEQUANTIZERS:
            raise CheckpointError(
                f"{gguf_file.path}: tensor {name} has unsupported type {kind}; "
                f"supported types: {', '.join(SUPPORTED_TYPES)}"
            )
    return list(names)


def load_hf_tensor(gguf_file: GGUFFile, config: dict, hf_name: str) -> np.ndarray:
    """One HF-named weight as float32 in PyTorch layout (Linear weights are [out, in])."""
    gguf_name = _gguf_names(config).get(hf_name)
    if gguf_name is None:
        raise CheckpointError(f"{gguf_file.path}: {hf_name} is not a weight of this model")
    w = gguf_file.load(gguf_name)
    expected = _hf_shape(hf_name, config)
    if w.shape != expected:
        raise CheckpointError(
            f"{gguf_file.path}: tensor {gguf_name} has shape {w.shape}, expected {expected} "
            f"for {hf_name}"
        )
    if config["model_type"] == "gemma3_text":
        # llama.cpp stores Gemma's norm weights w as 1 + w (its RMSNorm multiplies by the
        # weight); HF's (1 + w) convention is kept here (as transformers' GGUF loading does).
        # It rotates q and k in halves (NEOX order), so no rows were permuted.
        return w - np.float32(1.0) if hf_name.endswith("norm.weight") else w
    from jaxinfer.quant.gguf_blocks import unpermute_qk  # quant only when converting

    if hf_name.endswith("q_proj.weight"):
        w = unpermute_qk(w, config["num_attention_heads"])
    elif hf_name.endswith("k_proj.weight"):
        w = unpermute_qk(w, config["num_key_value_heads"])
    return w


def hf_tensor_items(gguf_file: GGUFFile, config: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every weight, loaded lazily one tensor at a time.

    The tensor list is checked before this returns, so a mismatch fails before any loading.
    """
    names = hf_tensor_names(gguf_file, config)
    return ((name, load_hf_tensor(gguf_file, config, name)) for name in names)


class GGUFSource:
    """Tensor source (see `convert.TensorSource`) over a llama GGUF file, in HF names/layout."""

    def __init__(self, path: str | os.PathLike[str]):
        self.file = GGUFFile(path)
        self.hf_config = hf_config_from_gguf(self.file)
        self._names = set(hf_tensor_names(self.file, self.hf_config))

    def names(self) -> set[str]:
        return self._names

    def get(self, name: str) -> np.ndarray:
        return load_hf_tensor(self.file, self.hf_config, name)

    def describe(self, name: str) -> str:
        return str(self.file.path)


def __getattr__(name):
    """`unpermute_qk` (from jaxinfer.quant.gguf_blocks), imported on first use so that
    reading a GGUF does not import the quantization package."""
    if name == "unpermute_qk":
        from jaxinfer.quant.gguf_blocks import unpermute_qk

        return unpermute_qk
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
