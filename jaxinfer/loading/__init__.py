"""`load(source)`: one entry point for checkpoint directories, GGUF files and built-in names."""

from __future__ import annotations

from pathlib import Path

from jaxinfer.errors import CheckpointError
from jaxinfer.loading import hf_dir
from jaxinfer.loading.convert import params_from_source
from jaxinfer.loading.fetch import BUILTINS, fetch_builtin
from jaxinfer.loading.hf_config import config_from_hf, eos_ids_from_hf
from jaxinfer.model import Model
from jaxinfer.precision import resolve_dtype


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


def load(source: str | Path, dtype=None, progress: bool = True) -> Model:
    """Load a model from a checkpoint directory, a .gguf file or a built-in name.

    dtype: parameter dtype (None = float32 on CPU, bfloat16 on GPU/TPU). Raises
    CheckpointError / ConfigError / FetchError with one clear message on bad input.
    """
    path = resolve_source(source)
    dtype = resolve_dtype(dtype)
    if path.is_dir():
        if (path / "quantization.json").is_file():  # saved by jaxinfer.quant.save_quantized
            from jaxinfer.quant.checkpoint import load_quantized

            return load_quantized(path)
        return _load_hf_dir(path, dtype, progress)
    if path.suffix in hf_dir.PICKLE_SUFFIXES:
        raise hf_dir.refuse_pickle(path)
    if path.suffix == ".safetensors" or path.name == "config.json":
        raise CheckpointError(f"{path}: pass the checkpoint directory (holding config.json and "
                              "the *.safetensors files), not a single file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return _load_gguf(path, dtype, progress)
    raise CheckpointError(f"{path}: not a checkpoint (expected a directory with config.json and "
                          "*.safetensors, or a .gguf file)")


def _load_hf_dir(root: Path, dtype, progress: bool) -> Model:
    from jaxinfer.tokenizer import Tokenizer

    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        pickles = [p for p in root.iterdir() if p.suffix in hf_dir.PICKLE_SUFFIXES]
        if pickles:
            raise hf_dir.refuse_pickle(pickles[0])
        raise CheckpointError(f"{root}: not a checkpoint directory (no config.json)")
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
    params = params_from_source(config, src, dtype, progress)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(root),
                 eos_token_ids=eos)


def _load_gguf(path: Path, dtype, progress: bool) -> Model:
    from jaxinfer.loading.gguf import GGUFSource
    from jaxinfer.tokenizer import Tokenizer

    src = GGUFSource(path)
    config = config_from_hf(src.hf_config, str(path))
    tokenizer = Tokenizer.from_gguf_metadata(src.file.metadata, str(path))
    eos = eos_ids_from_hf(src.hf_config) or tuple(tokenizer.eos_token_ids)
    params = params_from_source(config, src, dtype, progress)
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(path),
                 eos_token_ids=eos)
