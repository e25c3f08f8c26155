"""Converted weights kept in the cache directory, so a warm load is a memory map.

A GGUF load dequantizes every tensor in numpy; the result (the float params tree `load` builds,
for one dtype) is saved once as `<cache>/converted/<stem>.<dtype>.<key>.safetensors`, one tensor
per params path, and the tokenizer beside it as `<stem>.<key>.tokenizer.json`. The key hashes
the format version, the source file's size and mtime and its header bytes (metadata and tensor
directory), so a changed file never matches an old entry. Beside a weights entry, the same
weights may be kept in a run layout (`layout_path`: `<entry stem>.run-<isa>.safetensors`, the
native kernels' packed panels, written by `jaxinfer.generate.run_params`); `open_layouts`
starts checking those while the rest of a load goes on.

Entries are written to a temporary name and renamed when complete; each holds the XXH3-128
hash of its data (`CHECKSUM`; 0.1 s for 538 MB here, against 0.36 s for sha256, so a warm
load hardly waits for it; it guards against damage, not tampering), checked on every read. The
check reads the file rather than its memory map, so that it leaves no page of the map resident:
an entry never used (another ISA's layout) or mostly replaced (the weights a run layout stands
for) then costs no resident memory (184 MB of SmolLM2's native peak). An
entry that does not open, does not match its checksum or lacks a tensor is deleted and rebuilt,
never used. `JAXINFER_CONVERTED_CACHE=0` turns the cache off;
a cache directory that cannot be written only costs the speed-up (a warning on stderr).

A warm load's params alias the mapped file (its tensors are 64-byte aligned, so jax.device_put
does not copy them): entries are never modified in place, only replaced by a rename or deleted,
which leaves a running process's mapping intact.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import xxhash

import models
from jaxinfer import paths
from jaxinfer.errors import CheckpointError
from jaxinfer.loading.fetch import cache_dir
from jaxinfer.loading.safetensors_io import SafetensorsFile, write_safetensors

FORMAT_VERSION = 2  # bump when the params layout, the dequantization or the checksum changes
CHECKSUM = "xxh3_128"  # the metadata key of a weights entry's hash


def enabled() -> bool:
    return os.environ.get("JAXINFER_CONVERTED_CACHE", "1") != "0"


def directory() -> Path:
    return cache_dir() / "converted"


def source_key(path: Path, header: bytes) -> str:
    """Identity of a source file: format version, size, mtime (ns) and its header bytes."""
    st = path.stat()
    digest = hashlib.sha256(f"{FORMAT_VERSION}|{st.st_size}|{st.st_mtime_ns}|".encode())
    digest.update(header)
    return digest.hexdigest()[:32]


def weights_path(path: Path, key: str, dtype) -> Path:
    return directory() / _weights_name(path, np.dtype(dtype).name, key)


def packed_path(path: Path, key: str) -> Path:
    """Where a `load(..., keep_packed=True)` of the source file `path` keeps its params (the
    packed blocks' children and the float leaves, see `loading.gguf_packed.children`); their
    run layouts go beside it (`layout_path`)."""
    return directory() / _weights_name(path, "packed", key)


def _weights_name(path: Path, dtype_name: str, key: str) -> str:
    return f"{path.stem}.{dtype_name}.{key}.safetensors"


def tokenizer_path(path: Path, key: str) -> Path:
    return directory() / f"{path.stem}.{key}.tokenizer.json"


def _sha256(data) -> str:
    return hashlib.sha256(memoryview(data)).hexdigest()


def _checksum(pieces) -> str:
    """The CHECKSUM of data given as consecutive byte buffers."""
    digest = xxhash.xxh3_128()
    for piece in pieces:
        digest.update(piece)
    return digest.hexdigest()


def discard(entry: Path, why: str) -> None:
    """Delete a bad entry, saying why on stderr."""
    print(f"jaxinfer: converted-weights cache entry {entry.name} {why}; rebuilding it",
          file=sys.stderr, flush=True)
    entry.unlink(missing_ok=True)


def atomic_write(final: Path, write, stale: str | None = None, *,
                 what: str = "the converted-weights cache",
                 then: str = "loading will convert again next time") -> None:
    """write(tmp_path) into a temporary file beside `final`, then rename it into place and
    remove older entries matching the glob `stale`, except those derived from `final` (named
    `final`'s stem + ".": its run layouts, see `layout_path`, which another thread may have
    written first). Warns ("cannot write `what` ...; `then`") instead of raising when the
    directory cannot be written."""
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{final.name}.", suffix=".partial")
        os.close(fd)
        try:
            os.chmod(tmp, 0o644)  # mkstemp makes it private; cache entries are plain files
            write(Path(tmp))
            os.replace(tmp, final)
        finally:
            Path(tmp).unlink(missing_ok=True)
        derived = final.name.removesuffix(".safetensors") + "."
        for old in final.parent.glob(stale) if stale else ():
            if old != final and not old.name.startswith(derived):
                old.unlink(missing_ok=True)
        for old in final.parent.glob(".*.partial"):  # left by a killed process, an hour ago
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink(missing_ok=True)
    except OSError as e:
        print(f"jaxinfer: cannot write {what} {final.parent} ({e}); {then}", file=sys.stderr,
              flush=True)


class PendingParams:
    """A cached params entry being opened and checksummed in a background thread (hashlib
    releases the GIL), so that the hash overlaps with the tokenizer and the shape work of a
    load. `result` waits for it and says whether the entry can be used."""

    def __init__(self, entry: Path, after: PendingParams | None = None):
        """after: another entry being checked, whose hash this one's waits for (so that a
        load's own entry is not slowed down by one it may not need)."""
        self.entry, self._sf, self._problem, self._digest = entry, None, None, None
        self._thread, self._after = None, after
        wait_for_writes(entry)  # this process may be writing it
        if not entry.is_file():
            return
        try:
            self._sf = SafetensorsFile(entry)
        except CheckpointError as e:
            self._problem = f"is unreadable ({e})"
            return
        self._thread = threading.Thread(target=self._hash, daemon=True)
        self._thread.start()

    def _hash(self) -> None:
        if self._after is not None and self._after._thread is not None:
            self._after._thread.join()
        self._digest = _checksum(self._sf.read_data())

    def result(self, config=None, dtype=None) -> SafetensorsFile | None:
        """The entry if it is whole and holds exactly the params of `config` in `dtype`, else
        None (a bad entry is deleted, with a line on stderr). config None: only whole (its
        format and checksum); the caller checks each tensor's shape and dtype."""
        if self._thread is not None:
            self._thread.join()
        sf, problem = self._sf, self._problem
        if sf is not None:
            expected = None if config is None else {
                p: tuple(s.shape) for p, s in paths.iter_leaves(models.abstract_params(config))}
            if sf.metadata.get("format") != str(FORMAT_VERSION) or expected is not None and (
                    {p: sf.shape(p) for p in sf.names()} != expected
                    or any(sf.get(p).dtype != np.dtype(dtype) for p in expected)):
                problem = "does not match this model"
            elif self._digest != sf.metadata.get(CHECKSUM):
                problem = "fails its checksum"
        if problem is not None:
            discard(self.entry, problem)
            return None
        return sf


_opened: dict[Path, PendingParams] = {}  # layout entries opened early by `open_layouts`


def open_layouts(weights: PendingParams) -> None:
    """Start opening and checksumming the layout entries kept beside the weights entry being
    checked (see `layout_path`) in the background, each after the weights' own hash, so that
    the check overlaps with the rest of loading and generation's set-up; `pending(entry)`
    hands them out later."""
    stem = glob.escape(weights.entry.name.removesuffix(".safetensors"))
    for entry in weights.entry.parent.glob(stem + ".*.safetensors"):
        _opened.setdefault(entry, PendingParams(entry, after=weights))


def pending(entry: Path) -> PendingParams:
    """The PendingParams of `entry`: the one `open_layouts` started, else a new one."""
    return _opened.pop(entry, None) or PendingParams(entry)


def read_params(entry: Path, config, dtype) -> SafetensorsFile | None:
    """`PendingParams(entry).result(config, dtype)`: the entry if usable, else None."""
    return PendingParams(entry).result(config, dtype)


_writes: dict[Path, threading.Thread] = {}  # entries being written in the background


def layout_path(weights: Path, layout: str) -> Path:
    """Where the weights of the entry `weights` (a `weights_path`) are kept in the run layout
    named `layout` (e.g. "scan-avx2", see `jaxinfer.generate.run_params`). A new weights entry
    for the same source file and dtype removes it as stale."""
    return weights.with_name(f"{weights.name.removesuffix('.safetensors')}.{layout}.safetensors")


def write_params(entry: Path, params, source: str, *, background: bool = True,
                 stale: str | None = None) -> None:
    """Save a float params tree (leaves: arrays) as `entry` (a `weights_path`, or a
    `layout_path` with a flat {path: array} dict), with the hash of its data; older entries
    matching the glob `stale` (default: those of the same source file and dtype) are removed.

    background: hash and write in a thread (both release the GIL; writing 538 MB takes 3-12 s
    on the 2-core test machine's disk), so the caller goes on compiling meanwhile. It is not
    a daemon thread: the interpreter waits for it at exit; `wait_for_writes` waits earlier.
    """
    tensors = {path: np.asarray(leaf) for path, leaf in paths.iter_leaves(params)}

    def write() -> None:
        digest = _checksum(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
                           for arr in tensors.values())
        meta = {"format": str(FORMAT_VERSION), CHECKSUM: digest, "source": source}
        stem, dtype_name = entry.name.rsplit(".", 3)[:2]
        old = stale or glob.escape(stem) + f".{dtype_name}.*.safetensors"
        atomic_write(entry, lambda tmp: write_safetensors(tmp, tensors, meta), old)

    if not background:
        return write()
    _writes[entry] = thread = threading.Thread(target=write, name=f"write {entry.name}")
    thread.start()


def wait_for_writes(entry: Path | None = None) -> None:
    """Wait until background writes (of `entry`, or all of them) are finished."""
    for path, thread in list(_writes.items()):
        if entry is None or path == entry:
            thread.join()
            _writes.pop(path, None)


def _tokenizer_digest(state: dict) -> str:
    """sha256 of a tokenizer state: the backend text, then the other fields as sorted JSON."""
    fields = {k: v for k, v in state.items() if k != "backend"}
    return _sha256(state["backend"].encode() + json.dumps(fields, sort_keys=True).encode())


def read_tokenizer(entry: Path) -> dict | None:
    """The cached tokenizer state (see `Tokenizer.state`) if whole, else None (deleted)."""
    if not entry.is_file():
        return None
    try:
        record = json.loads(entry.read_text(encoding="utf-8"))
        state = record["state"]
        ok = record["format"] == FORMAT_VERSION and record["sha256"] == _tokenizer_digest(state)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        discard(entry, "is damaged")
        return None
    return state


def write_tokenizer(entry: Path, state: dict) -> None:
    """Save a tokenizer state (JSON-able dict, the backend's tokenizer.json text under
    "backend") as `entry` (a `tokenizer_path`), with its sha256; older entries of the same
    source file are removed."""
    record = {"format": FORMAT_VERSION, "sha256": _tokenizer_digest(state), "state": state}
    stale = glob.escape(entry.name.rsplit(".", 3)[0]) + ".*.tokenizer.json"
    atomic_write(entry, lambda tmp: tmp.write_text(json.dumps(record), encoding="utf-8"), stale)
