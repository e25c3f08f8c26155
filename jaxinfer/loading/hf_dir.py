"""Hugging Face checkpoint directories: config.json + *.safetensors (single or sharded)."""

from __future__ import annotations

import json
from pathlib import Path

from jaxinfer.errors import CheckpointError
from jaxinfer.loading.safetensors_io import SafetensorsFile

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
INDEX = "model.safetensors.index.json"


def refuse_pickle(path: Path) -> CheckpointError:
    """The error for a pickle-based checkpoint, which is never loaded."""
    return CheckpointError(
        f"{path}: pickle checkpoints (.bin/.pt/.pth) are not loaded because unpickling can run "
        "arbitrary code; convert it to safetensors, e.g. with transformers: "
        "model.save_pretrained(out_dir, safe_serialization=True)")


def read_json(path: Path, missing_ok: bool = False) -> dict:
    """A JSON file as a dict, with one clear error when it is missing (or {} with missing_ok)
    or malformed."""
    if not path.is_file():
        if missing_ok:
            return {}
        raise CheckpointError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return data


class HFDirSource:
    """Tensor source over the safetensors files of a checkpoint directory."""

    def __init__(self, root: Path):
        self.root = root
        index = root / INDEX
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: missing 'weight_map'")
            files = {f: SafetensorsFile(root / f) for f in sorted(set(weight_map.values()))
                     if self._exists(root / f, index)}
            self._where = {n: files[f] for n, f in weight_map.items()}
        else:
            paths = sorted(root.glob("*.safetensors"))
            if not paths:
                pickles = [p for p in sorted(root.iterdir()) if p.suffix in PICKLE_SUFFIXES]
                if pickles:
                    raise refuse_pickle(pickles[0])
                raise CheckpointError(f"{root}: no *.safetensors weights found")
            self._where = {}
            for p in paths:
                f = SafetensorsFile(p)
                for n in f.names():
                    self._where[n] = f
        for name, f in self._where.items():
            if name not in f.names():
                raise CheckpointError(f"{f.path}: index {INDEX} lists {name!r} but the file lacks it")

    @staticmethod
    def _exists(path: Path, index: Path) -> bool:
        if not path.is_file():
            raise CheckpointError(f"{index}: lists shard {path.name}, which is missing")
        return True

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str):
        return self._where[name].get(name)

    def describe(self, name: str) -> str:
        f = self._where.get(name)
        return str(f.path) if f is not None else str(self.root)
