"""Saving and loading any model (quantized, pruned or plain) as a jaxinfer checkpoint directory.

  model.safetensors      every array: a float leaf under its path ("layers/attn_norm"), each
                         child of a quantized leaf under path + "." + child ("layers/mlp/up.values")
  quantization.json      per parameter: {"type": "array", "dtype", "shape"} for float leaves, or
                         {"type": leaf class, "scheme": {...}, "static": {aux data},
                          "children": {name: {"dtype", "shape"} | null}}
  jaxinfer_config.json   {"family", "config": all config fields, "eos_token_ids"}
  tokenizer.json, tokenizer_config.json, generation_config.json   (when the model has a tokenizer;
                         read back by `Tokenizer.from_hf_dir`)

`save_quantized` writes into a temporary directory beside the target and renames it into place,
so an error never leaves a half-written checkpoint. `load_quantized` checks the description
against the tensors and the config before building anything (CheckpointError names the file and
the problem) and returns a `Model` whose logits equal the saved one's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import models
from jaxinfer import paths, programs
from jaxinfer.errors import CheckpointError, InputError
from jaxinfer.loading.convert import build_params
from jaxinfer.loading.hf_dir import read_json
from jaxinfer.loading.safetensors_io import SafetensorsFile, write_safetensors
from jaxinfer.model import Model
from jaxinfer.quant.base import QuantizedWeight
from jaxinfer.quant.gguf_blocks import GGUFBlockWeight
from jaxinfer.quant.int4 import Int4Weight
from jaxinfer.quant.int8 import Int8Weight, W8A8Weight
from jaxinfer.quant.nm import NMSparseWeight
from jaxinfer.sampling import HF_KEYS, checkpoint_defaults

FORMAT = "jaxinfer-quantized"
VERSION = 1
WEIGHTS, DESCRIPTION, CONFIG = "model.safetensors", "quantization.json", "jaxinfer_config.json"
LEAF_TYPES = {cls.__name__: cls for cls in (Int8Weight, Int4Weight, W8A8Weight, GGUFBlockWeight,
                                             NMSparseWeight)}
FAMILIES = {"llama": models.LlamaConfig, "gpt2": models.GPT2Config}


# ----------------------------------------------------------------------------- saving


def _spec(a) -> dict:
    return {"dtype": np.dtype(a.dtype).name, "shape": [int(d) for d in a.shape]}


def _flatten(params) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """(tensors by name, description by param path)."""
    tensors, desc = {}, {}
    for path, leaf in paths.iter_leaves(params):
        if isinstance(leaf, QuantizedWeight):
            children = {}
            for name, child in leaf.children().items():
                children[name] = None if child is None else _spec(child)
                if child is not None:
                    tensors[f"{path}.{name}"] = np.asarray(child)
            desc[path] = {"type": type(leaf).__name__, "scheme": leaf.scheme_dict(),
                          "static": leaf.static(), "children": children}
        else:
            tensors[path] = np.asarray(leaf)
            desc[path] = {"type": "array", **_spec(leaf)}
    return tensors, desc


def _config_json(model: Model) -> dict:
    config = model.config
    return {"family": config.family, "config": dataclasses.asdict(config),
            "eos_token_ids": [int(i) for i in model.eos_token_ids]}


def _tokenizer_files(tok, sampling_defaults: dict) -> dict[str, str]:
    """tokenizer.json, tokenizer_config.json and generation_config.json contents (the latter
    with the model's sampling defaults, under their Hugging Face names)."""
    def text(i):
        return None if i is None else tok.id_to_token(i)

    cfg = {"add_bos_token": tok.add_bos_token, "chat_template": tok.chat_template,
           "bos_token": text(tok.bos_token_id), "eos_token": text(tok.eos_token_id),
           "pad_token": text(tok.pad_token_id), "unk_token": text(tok.unk_token_id)}
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": list(tok.eos_token_ids),
           **{HF_KEYS[k]: v for k, v in sampling_defaults.items()}}
    return {
        "tokenizer.json": tok.backend.to_str(),
        "tokenizer_config.json": json.dumps({k: v for k, v in cfg.items() if v is not None},
                                            indent=1),
        "generation_config.json": json.dumps({k: v for k, v in gen.items() if v is not None},
                                             indent=1),
    }


def _check_shapes(config, params) -> None:
    expected = dict(paths.iter_leaves(models.abstract_params(config)))
    got = dict(paths.iter_leaves(params))
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
        raise InputError(f"params do not fit the config (missing: {missing[:5] or 'none'}; "
                         f"unexpected: {extra[:5] or 'none'})")
    for path, spec in expected.items():
        if tuple(got[path].shape) != tuple(spec.shape):
            raise InputError(f"{path}: shape {tuple(got[path].shape)} does not fit the config's "
                             f"{tuple(spec.shape)}")


def save_quantized(model: Model, out_dir: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Write `model` (quantized or not) to `out_dir`; returns the directory's path.

    InputError if out_dir exists and overwrite is False, or the params do not fit the config.
    """
    out = Path(out_dir)
    if out.exists() and not (overwrite and out.is_dir()):
        raise InputError(f"{out} already exists" + ("" if out.is_dir() else " and is not a "
                         "directory") + (" (pass overwrite=True to replace it)" if out.is_dir()
                                         else ""))
    _check_shapes(model.config, model.params)
    tensors, desc = _flatten(model.params)
    files = {DESCRIPTION: json.dumps({"format": FORMAT, "version": VERSION, "params": desc},
                                     indent=1),
             CONFIG: json.dumps(_config_json(model), indent=1)}
    if model.tokenizer is not None:
        files.update(_tokenizer_files(model.tokenizer, model.sampling_defaults))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write_safetensors(tmp / WEIGHTS, tensors, {"format": FORMAT})
        for name, content in files.items():
            (tmp / name).write_text(content, encoding="utf-8")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / out.name)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------- loading


def config_from_json(path: Path):
    data = read_json(path)
    family, fields = data.get("family"), data.get("config")
    if family not in FAMILIES:
        raise CheckpointError(f"{path}: unknown model family {family!r}; supported: "
                              f"{', '.join(FAMILIES)}")
    if not isinstance(fields, dict):
        raise CheckpointError(f"{path}: missing 'config' object")
    fields = dict(fields)
    try:
        if isinstance(fields.get("rope_scaling"), dict):
            fields["rope_scaling"] = models.RopeScaling(**fields["rope_scaling"])
        if isinstance(fields.get("sliding_windows"), list):
            fields["sliding_windows"] = tuple(fields["sliding_windows"])
        config = FAMILIES[family](**fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: invalid config ({e})") from None
    eos = data.get("eos_token_ids")
    if eos is None:
        return config, None
    if not isinstance(eos, list) or not all(type(i) is int for i in eos):
        raise CheckpointError(f"{path}: eos_token_ids must be a list of ints")
    return config, tuple(eos)


class _Tensors:
    """The safetensors file plus bookkeeping of which tensors were used."""

    def __init__(self, path: Path):
        if not path.is_file():
            raise CheckpointError(f"{path}: file not found")
        self.path, self.file = path, SafetensorsFile(path)
        self.unused = set(self.file.names())

    def get(self, name: str, spec) -> np.ndarray:
        if name not in self.unused and name not in self.file.names():
            raise CheckpointError(f"{self.path}: missing tensor {name!r}")
        self.unused.discard(name)
        arr = self.file.get(name)
        if not isinstance(spec, dict):
            raise CheckpointError(f"{self.path.parent / DESCRIPTION}: {name}: bad child entry")
        want = (spec.get("dtype"), spec.get("shape"))
        got = (np.dtype(arr.dtype).name, [int(d) for d in arr.shape])
        if got != want:
            raise CheckpointError(f"{self.path}: tensor {name!r} is {got[0]} {got[1]}, but "
                                  f"{DESCRIPTION} says {want[0]} {want[1]}")
        return arr


def _build_leaf(path: str, entry, tensors: _Tensors, desc_path: Path):
    where = f"{desc_path}: {path}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: entry is not an object")
    kind = entry.get("type")
    if kind == "array":
        return jnp.asarray(tensors.get(path, entry))
    cls = LEAF_TYPES.get(kind)
    if cls is None:
        raise CheckpointError(f"{where}: unknown leaf type {kind!r}; known: array, "
                              f"{', '.join(LEAF_TYPES)}")
    fields = dataclasses.fields(cls)
    static_names = {f.name for f in fields if not f.metadata.get("pytree_node", True)}
    child_names = {f.name for f in fields if f.metadata.get("pytree_node", True)}
    static, children = entry.get("static"), entry.get("children")
    if not isinstance(static, dict) or set(static) != static_names:
        raise CheckpointError(f"{where}: 'static' must hold exactly {sorted(static_names)}")
    if not isinstance(children, dict) or set(children) != child_names:
        raise CheckpointError(f"{where}: 'children' must hold exactly {sorted(child_names)}")
    arrays = {name: None if spec is None else jnp.asarray(tensors.get(f"{path}.{name}", spec))
              for name, spec in children.items()}
    try:
        leaf = cls(**static, **arrays)
        leaf.validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: inconsistent {kind} ({e})") from None
    return leaf


def load_quantized(path: str | os.PathLike[str]) -> Model:
    """The Model saved by `save_quantized` in directory `path` (CheckpointError if unusable)."""
    from jaxinfer.tokenizer import Tokenizer

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    config, eos = config_from_json(root / CONFIG)
    programs.declare_abstract(config)
    desc_path = root / DESCRIPTION
    desc = read_json(desc_path)
    if desc.get("format") != FORMAT or desc.get("version") != VERSION:
        raise CheckpointError(f"{desc_path}: not a {FORMAT} version {VERSION} description")
    entries = desc.get("params")
    if not isinstance(entries, dict):
        raise CheckpointError(f"{desc_path}: missing 'params' object")
    expected = dict(paths.iter_leaves(models.abstract_params(config)))
    missing = sorted(set(expected) - set(entries))
    extra = sorted(set(entries) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{desc_path}: parameters do not match the {config.family} config "
                              f"(missing: {missing[:5] or 'none'}; unexpected: {extra[:5] or 'none'})")
    tensors = _Tensors(root / WEIGHTS)
    params = build_params(config, lambda p, spec: _build_leaf(p, entries[p], tensors, desc_path),
                          f"{desc_path}")
    if tensors.unused:
        raise CheckpointError(f"{tensors.path}: tensors not described in {DESCRIPTION}: "
                              f"{sorted(tensors.unused)[:5]}")
    tokenizer = Tokenizer.from_hf_dir(root)
    if eos is None:
        eos = tuple(tokenizer.eos_token_ids) if tokenizer is not None else ()
    jax.block_until_ready(params)
    gen = root / "generation_config.json"
    sampling = checkpoint_defaults(read_json(gen), HF_KEYS) if gen.is_file() else {}
    return Model(config=config, params=params, tokenizer=tokenizer, source=str(root),
                 eos_token_ids=eos, sampling_defaults=sampling)
