"""Start-up: the own GGUF header reader, the converted-weights cache, `--profile` and the
persistent compilation cache.

The reader is compared with `gguf.GGUFReader` on the real SmolLM2 file and on small files
written with `gguf.GGUFWriter`. The cache is checked on a tiny llama GGUF (corrupt, truncated,
stale entries) and on SmolLM2 (a warm load equals a cold one bit for bit, tokenizer included);
the packed run layout kept beside it likewise. A second `jaxinfer generate` in a fresh process
compiles nothing: JAX's own log shows a persistent-cache hit for every program it builds.
"""

import collections
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType
from test_gguf import tiny_llama_gguf, tiny_llama_hf, write_gguf

import jaxinfer
from jaxinfer import cli, generate, kernels, paths, profile
from jaxinfer.bench import english_text
from jaxinfer.errors import CheckpointError
from jaxinfer.loading import convert_cache
from jaxinfer.loading.fetch import cache_dir
from jaxinfer.loading.gguf import GGUFFile
from jaxinfer.tokenizer import Tokenizer


def reader_metadata(path) -> dict:
    """Metadata as gguf.GGUFReader gives it, as plain Python values (the previous loader's way)."""
    out = {}
    for key, field in GGUFReader(path).fields.items():
        if key.startswith("GGUF."):
            continue
        types, parts = field.types, field.parts
        if types[0] == GGUFValueType.STRING:
            out[key] = bytes(parts[-1]).decode()
        elif types[0] != GGUFValueType.ARRAY:
            out[key] = parts[-1][0].item()
        elif len(types) == 1:
            out[key] = []
        elif types[1] == GGUFValueType.STRING:
            out[key] = [bytes(parts[i]).decode() for i in field.data]
        else:
            out[key] = np.concatenate([parts[i] for i in field.data]).tolist()
    return out


def assert_same_as_reader(path) -> None:
    ours, ref = GGUFFile(path), GGUFReader(path)
    expected = reader_metadata(path)
    assert ours.metadata == expected
    assert {k: type(v) for k, v in ours.metadata.items()} == {k: type(v) for k, v in expected.items()}
    assert ours.tensor_names() == [t.name for t in ref.tensors]
    for t in ref.tensors:
        assert ours.tensor_type(t.name) == t.tensor_type.name
        assert ours.tensor_shape(t.name) == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(ours.raw(t.name).reshape(-1),
                              ref.data[t.data_offset : t.data_offset + t.n_bytes])


def test_reader_matches_gguf_reader_smollm2(smollm2_gguf_path):
    assert_same_as_reader(smollm2_gguf_path)


def test_reader_matches_gguf_reader_small_files(tmp_path):
    assert_same_as_reader(tiny_llama_gguf(tmp_path / "tiny.gguf", tiny_llama_hf()))
    meta = {"a.bool": True, "a.int": 7, "a.float": 0.1, "a.str": "héllo", "a.empty_str": "",
            "a.ints": [1, 2, 3], "a.floats": [0.5, -1.25], "a.strs": ["x", "", "ü"], "a.bools":
            [True, False], "general.alignment": 64}
    raw = np.arange(40, dtype=np.uint8).reshape(2, 20)
    path = write_gguf(tmp_path / "m.gguf", {"f": np.ones((3, 5), np.float32),
                                            "h": np.ones(7, np.float16), "q": (raw, 3)},
                      metadata=meta)
    assert_same_as_reader(path)
    assert GGUFFile(path).header.data_start % 64 == 0


def test_reader_every_truncation_is_one_clear_error(tmp_path):
    full = tiny_llama_gguf(tmp_path / "full.gguf", tiny_llama_hf()).read_bytes()
    end = GGUFFile(tmp_path / "full.gguf").header.header_end
    cut = tmp_path / "cut.gguf"
    for n in [*range(4, end + 1), len(full) - 1]:  # inside the header, and one data byte short
        cut.write_bytes(full[:n])
        with pytest.raises(CheckpointError, match="truncated or corrupt GGUF file"):
            GGUFFile(cut)


def test_reader_refuses_big_endian_and_unknown_versions(tmp_path):
    path = tmp_path / "x.gguf"
    for version, message in ((b"\0\0\0\3", "big-endian"), (b"\x09\0\0\0", "version 9")):
        path.write_bytes(b"GGUF" + version + bytes(16))
        with pytest.raises(CheckpointError, match=message):
            GGUFFile(path)


# ----------------------------------------------------------------------------- converted cache


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty jaxinfer cache directory for the test."""
    monkeypatch.setenv("JAXINFER_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXINFER_CONVERTED_CACHE", raising=False)
    return tmp_path / "cache" / "converted"


def tiny_model_file(tmp_path):
    """A tiny llama GGUF with a byte-level BPE tokenizer, loadable by jaxinfer.load."""
    tokens = ["t", "0", "t0", *(f"x{i}" for i in range(37))]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": ["t 0"]}
    return tiny_llama_gguf(tmp_path / "tiny.gguf", tiny_llama_hf(), extra_meta=meta)


def leaves(model) -> dict:
    return {p: np.asarray(x) for p, x in paths.iter_leaves(model.params)}


def assert_same_params(a, b) -> None:
    la, lb = leaves(a), leaves(b)
    assert la.keys() == lb.keys()
    for p in la:
        assert la[p].dtype == lb[p].dtype and la[p].shape == lb[p].shape, p
        assert la[p].tobytes() == lb[p].tobytes(), p


def no_conversion(monkeypatch) -> None:
    """Make any conversion from the GGUF fail: what loads then came from the cache."""
    def fail(*args, **kwargs):
        raise AssertionError("converted from the GGUF instead of the cache")

    monkeypatch.setattr(jaxinfer.loading, "source_leaf", fail)
    monkeypatch.setattr(Tokenizer, "from_gguf_metadata", fail)


def entries(cache, pattern):
    convert_cache.wait_for_writes()  # weights are written in the background
    return sorted(cache.glob(pattern))


def test_cache_written_then_used(tmp_path, cache, monkeypatch):
    path = tiny_model_file(tmp_path)
    cold = jaxinfer.load(path, dtype="float32", progress=False)
    assert len(entries(cache, "*.float32.*.safetensors")) == 1
    assert len(entries(cache, "*.tokenizer.json")) == 1
    assert not entries(cache, ".*partial")
    with monkeypatch.context() as m:
        no_conversion(m)
        warm = jaxinfer.load(path, dtype="float32", progress=False)
    assert_same_params(cold, warm)
    assert warm.tokenizer.state() == cold.tokenizer.state()
    assert warm.eos_token_ids == cold.eos_token_ids and warm.config == cold.config
    half = jaxinfer.load(path, dtype="bfloat16", progress=False)  # a separate entry per dtype
    assert {str(x.dtype) for x in leaves(half).values()} == {"bfloat16"}
    assert len(entries(cache, "*.safetensors")) == 2


def _resident_kb(path) -> int:
    """kB of `path`'s mapped pages resident in this process (Linux: /proc/self/smaps)."""
    total, mapped = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                mapped = line.rstrip().endswith(str(path))
            elif mapped and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_checksum_leaves_the_mapping_unresident(tmp_path):
    """Checking an entry reads every byte, but from the file, not through its memory map: a
    layout entry that is never used (another ISA's) and the weights a run layout replaces
    must not count in the process's peak memory (they did: 184 MB of SmolLM2's 728)."""
    entry = tmp_path / "w.float32.key.safetensors"
    big = np.arange(8 << 20, dtype=np.float32)  # 32 MB
    convert_cache.write_params(entry, {"big": big, "small": np.ones(16, np.float32)}, "src",
                               background=False)
    sf = convert_cache.PendingParams(entry).result()
    assert sf is not None and np.array_equal(sf.get("big"), big)  # the check passed...
    del sf
    sf = convert_cache.PendingParams(entry).result()
    assert _resident_kb(entry) < 1024  # ... and left the 32 MB unresident
    assert sf.get("small").sum() == 16 and _resident_kb(entry) < 1024
    entry.write_bytes(entry.read_bytes()[:-4] + b"\0\0\0\0")  # still caught when damaged
    assert convert_cache.PendingParams(entry).result() is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "header"])
def test_damaged_weights_entry_is_rebuilt(tmp_path, cache, capsys, damage):
    path = tiny_model_file(tmp_path)
    cold = jaxinfer.load(path, dtype="float32", progress=False)
    (entry,) = entries(cache, "*.safetensors")
    data = bytearray(entry.read_bytes())
    if damage == "flip":
        data[-1] ^= 0x40  # the high byte of the last float32 of the last tensor
    elif damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "empty":
        data = b""
    else:
        data[8:12] = b"XXXX"  # the JSON header
    entry.write_bytes(bytes(data))
    capsys.readouterr()
    again = jaxinfer.load(path, dtype="float32", progress=False)
    assert "rebuilding it" in capsys.readouterr().err
    assert_same_params(cold, again)  # the damaged bytes were not used
    convert_cache.wait_for_writes()
    assert entry.read_bytes() != bytes(data)  # rebuilt whole
    assert convert_cache.read_params(entry, cold.config, np.float32) is not None


def test_damaged_tokenizer_entry_is_rebuilt(tmp_path, cache, capsys):
    path = tiny_model_file(tmp_path)
    cold = jaxinfer.load(path, progress=False)
    (entry,) = entries(cache, "*.tokenizer.json")
    text = entry.read_text()
    record = json.loads(text)
    record["state"]["backend"] = record["state"]["backend"].replace('"t0"', '"q0"')
    entry.write_text(json.dumps(record))  # valid JSON, a checksum that no longer matches
    capsys.readouterr()
    again = jaxinfer.load(path, progress=False)
    assert "rebuilding it" in capsys.readouterr().err
    assert again.tokenizer.state() == cold.tokenizer.state()
    assert entry.read_text() == text


def test_changed_source_gets_a_new_entry(tmp_path, cache):
    path = tiny_model_file(tmp_path)
    first = jaxinfer.load(path, progress=False)
    convert_cache.wait_for_writes()
    tiny_llama_gguf(path, tiny_llama_hf(seed=1), extra_meta={
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["t 0"],
        "tokenizer.ggml.tokens": ["t", "0", "t0", *(f"x{i}" for i in range(37))]})
    second = jaxinfer.load(path, progress=False)
    assert not np.array_equal(leaves(first)["embed"], leaves(second)["embed"])
    assert len(entries(cache, "*.safetensors")) == 1  # the stale entry was removed


def test_weights_entry_keeps_its_own_layout_and_removes_older_ones(tmp_path, cache):
    """The weights entry and its packed layout are written by two background threads; the
    weights' removal of stale entries must not take the layout of its own key when the layout
    thread finishes first (the CI failure of test_packed_layout_cached_beside_the_weights),
    and must take an older key's weights and layouts."""
    data = {"w": np.arange(6, dtype=np.float32)}
    old = convert_cache.weights_path(tmp_path / "tiny.gguf", "oldkey", np.float32)
    new = convert_cache.weights_path(tmp_path / "tiny.gguf", "newkey", np.float32)
    for entry in (old, convert_cache.layout_path(old, "scan-avx2")):
        convert_cache.write_params(entry, data, "tiny.gguf", background=False)
    layout = convert_cache.layout_path(new, "scan-avx2")
    convert_cache.write_params(layout, data, "tiny.gguf", background=False,
                               stale="tiny.float32.newkey.*-avx2.safetensors")
    convert_cache.write_params(new, data, "tiny.gguf", background=False)  # finishes last
    assert entries(cache, "*.safetensors") == sorted([new, layout])


def test_cache_off(tmp_path, cache, monkeypatch):
    monkeypatch.setenv("JAXINFER_CONVERTED_CACHE", "0")
    jaxinfer.load(tiny_model_file(tmp_path), progress=False)
    assert not cache.exists()


def test_smollm2_warm_load_equals_cold(smollm2_gguf_path, cache, monkeypatch):
    cold = jaxinfer.load(smollm2_gguf_path, dtype="float32", progress=False)
    with monkeypatch.context() as m:
        no_conversion(m)
        warm = jaxinfer.load(smollm2_gguf_path, dtype="float32", progress=False)
    assert_same_params(cold, warm)
    text = english_text()
    ids = cold.tokenizer.encode(text)
    assert len(ids) > 100_000
    assert warm.tokenizer.encode(text) == ids
    assert warm.tokenizer.decode(ids) == cold.tokenizer.decode(ids)
    assert warm.tokenizer.state() == cold.tokenizer.state()
    assert warm.tokenizer.chat_template == cold.tokenizer.chat_template


# ----------------------------------------------------------------------------- --profile


def test_profile_prints_phases(tmp_path, cache, capsys):
    path = tiny_model_file(tmp_path)
    profile.reset()
    try:
        code = cli.main(["generate", "--model", str(path), "--prompt", "t0", "--max-new-tokens",
                         "2", "--no-compile-cache", "--profile"])
    finally:
        profile.reset()
    assert code == 0
    err = capsys.readouterr().err
    for name in ("jaxinfer profile", "imports", "load", "parse GGUF header", "tokenizer",
                 "tensor conversion (dequantize)", "wait for the converted-weights cache write",
                 "first output",
                 "jax: XLA compile or cache load"):
        assert name in err, name
    assert profile.records() == [] and not profile.enabled()  # reset: off again


def test_profile_off_records_nothing(capsys):
    profile.reset()
    with profile.phase("x"):
        pass
    profile.report()
    assert profile.records() == [] and capsys.readouterr().err == ""


# ----------------------------------------------------------------------------- run layout cache


def layout_entries(cache):
    """The packed-layout entries: layer stacks (scan-<isa>), and per-layer ones (run-<isa>)
    that earlier versions wrote."""
    return entries(cache, "*.scan-*.safetensors") + entries(cache, "*.run-*.safetensors")


def run_leaves(run) -> dict:
    """{path: bytes} of a run layout's leaves (packed leaves: their panels)."""
    return {p: np.asarray(getattr(x, "panels", x)).tobytes() for p, x in paths.iter_leaves(run)}


def test_packed_layout_cached_beside_the_weights(tmp_path, cache, monkeypatch, capsys,
                                                 best_isa):
    path = tiny_model_file(tmp_path)
    first = run_leaves(generate.run_params(jaxinfer.load(path, progress=False)))
    (entry,) = layout_entries(cache)
    with monkeypatch.context() as m:  # a warm start packs nothing
        m.setattr(kernels, "pack", lambda w: pytest.fail("packed instead of read from the cache"))
        warm = generate.run_params(jaxinfer.load(path, progress=False))
    assert kernels.packed_leaves(warm) and run_leaves(warm) == first
    data = bytearray(entry.read_bytes())
    data[-1] ^= 0x40
    entry.write_bytes(bytes(data))
    older = entry.with_name(entry.name.replace(".scan-", ".run-"))  # an earlier version's
    older.write_bytes(b"per-layer layout")  # entry: removed when the new one is written
    capsys.readouterr()
    again = run_leaves(generate.run_params(jaxinfer.load(path, progress=False)))
    assert "fails its checksum; rebuilding it" in capsys.readouterr().err
    assert again == first  # the damaged bytes were not used
    assert layout_entries(cache) == [entry] and entry.read_bytes() != bytes(data)


def test_native_layout_cached_for_packed_weights(smollm2_gguf_path, cache, monkeypatch, capsys,
                                                 best_isa):
    """--quant native: the blocks of SmolLM2's Q4_1 / Q8_0 weights (split into their
    children) and their kernel panels are kept in the cache, so a warm start neither splits
    nor repacks any of them; a damaged entry of either kind is rebuilt, never used."""
    from jaxinfer.quant.gguf_blocks import GGUFBlockWeight

    def packed():
        model = jaxinfer.load(smollm2_gguf_path, keep_packed=True, progress=False)
        blocks = {p: np.asarray(x).tobytes() for p, x in paths.iter_leaves(model.params)
                  if not isinstance(x, GGUFBlockWeight)}
        blocks.update({f"{p}.{c}": np.asarray(getattr(x, c)).tobytes()
                       for p, x in paths.iter_leaves(model.params)
                       if isinstance(x, GGUFBlockWeight) for c in ("qs", "d", "m")
                       if getattr(x, c) is not None})
        run = generate.run_params(model)
        assert isinstance(run["layers"]["mlp"]["down"], kernels.NativeQuant)
        assert isinstance(run["embed"], kernels.NativeQuantEmbedding)
        return blocks, {p: np.asarray(x).tobytes() for p, x in kernels.packed_leaves(run).items()}

    first = packed()
    (layout,) = layout_entries(cache)
    (blocks,) = [e for e in entries(cache, "*.packed.*.safetensors") if e != layout]
    assert ".packed." in layout.name and any(p.endswith(".mins") for p in first[1])
    with monkeypatch.context() as m:  # a warm start splits and packs nothing
        fail = lambda *a, **k: pytest.fail("converted instead of read from the cache")  # noqa: E731
        m.setattr(kernels.NativeQuant, "host_children", staticmethod(fail))
        m.setattr(GGUFBlockWeight, "from_raw", classmethod(fail))
        assert packed() == first
    for entry in (blocks, layout):
        data = bytearray(entry.read_bytes())
        data[-7] ^= 0x10
        entry.write_bytes(bytes(data))
        capsys.readouterr()
        assert packed() == first  # the damaged bytes were not used
        assert "fails its checksum; rebuilding it" in capsys.readouterr().err
        convert_cache.wait_for_writes()  # rewritten in the background
        assert entry.read_bytes() != bytes(data)
    assert layout_entries(cache) == [layout]


# ----------------------------------------------------------------------------- compilation cache

COMPILING = re.compile(r"Compiling (\S+?) with global shapes")  # JAX_LOG_COMPILES=1 lines
HIT = re.compile(r"Persistent compilation cache hit for '(\S+?)'")


def compiled_and_hits(log: str) -> tuple[collections.Counter, collections.Counter]:
    """(programs compiled, persistent-cache hits) by name from JAX's compile log, with the
    names spelled alike ("jit(admit)" and "jit_admit" both become "admit")."""
    def names(pattern):
        return collections.Counter(re.sub(r"^jit[(_]|\)$", "", n) for n in pattern.findall(log))

    return names(COMPILING), names(HIT)


def test_second_generate_hits_the_compile_cache_for_every_program(tmp_path):
    """Two fresh `jaxinfer generate` processes over one compilation cache: the second one
    compiles nothing; every program it builds (the engine's and each small one) is loaded from
    the persistent cache, as JAX's compile log and its cache-hit events (--profile) say."""
    path = tiny_model_file(tmp_path)
    kernels.isa()  # builds the kernel library into the user's cache once; linked in below
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels").symlink_to(cache_dir() / "kernels")
    env = {**os.environ, "JAX_LOG_COMPILES": "1", "JAXINFER_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-X", "importtime", "-m", "jaxinfer", "generate", "--model",
           str(path), "--prompt", "t0", "--max-new-tokens", "3", "--compile-cache",
           str(tmp_path / "xla"), "--profile"]
    runs = [subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    cold_compiled, cold_hits = compiled_and_hits(runs[0].stderr)
    compiled, hits = compiled_and_hits(runs[1].stderr)
    # the engine's admit and decode run as serialized programs (jaxinfer.programs) ...
    assert {"init_state", "exported_admit", "exported_decode"} <= set(compiled)
    assert len(list((tmp_path / "xla" / "programs").glob("*.jaxprog"))) >= 2
    # ... so the warm run never traces them: only the cold one does
    for name in ("admit", "decode"):
        assert f"Finished tracing {name} for" in runs[0].stderr
        assert f"Finished tracing {name} for" not in runs[1].stderr
    assert not cold_hits  # the first run compiled into an empty cache ...
    assert compiled == hits  # ... and the second loaded every program it needed from it
    profile_hits = re.search(r"jax: persistent cache hits\s+\S+\s+(\d+)", runs[1].stderr)
    assert profile_hits and int(profile_hits.group(1)) == sum(compiled.values())
    assert "persistent cache misses" not in runs[1].stderr
    # running the serialized programs does not set up jax's CPU LAPACK (an import of
    # scipy.linalg): no program of the engine calls it (jaxinfer.programs)
    assert re.search(r"\|\s+jax\b", runs[1].stderr)  # -X importtime lists every import
    assert not re.search(r"\|\s+scipy\.linalg$", runs[1].stderr, re.M)
