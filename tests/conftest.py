"""Shared pytest fixtures.

Tests run on CPU. Eight virtual CPU devices are requested before JAX starts so multi-device
tests can build meshes; single-device code ignores the extra devices.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import shutil  # noqa: E402

import pytest  # noqa: E402

from jaxinfer import kernels  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_gguf_path():
    """Path of the default model's GGUF file, fetched into the cache on first use."""
    from jaxinfer.loading.fetch import fetch_builtin

    return fetch_builtin("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf_path):
    """The default model loaded by jaxinfer (float32)."""
    import jaxinfer

    return jaxinfer.load(smollm2_gguf_path, dtype="float32", progress=False)


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf_path):
    """The same GGUF file loaded by transformers (PyTorch CPU, float32): the reference."""
    import torch
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32)
    return model.eval()


HAVE_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


def _isa_param(isa: str):
    """One ISA as a test parameter (skipped without a C++ compiler)."""
    return pytest.param(isa, id=isa, marks=pytest.mark.skipif(not HAVE_CXX,
                                                              reason="no C++ compiler"))


def _run_isa(isa: str, monkeypatch) -> str:
    """Make this process run `isa` (JAXINFER_CPU_ISA) while the test does."""
    monkeypatch.setenv("JAXINFER_CPU_ISA", isa)
    monkeypatch.delenv("JAXINFER_NATIVE", raising=False)
    return isa


# Every ISA this CPU runs (AVX2, AVX-512 and AVX-512 with VNNI where the CPU has them): on an
# AVX2-only machine the AVX-512 variants are not generated at all rather than skipped.
ISAS = [isa for isa in kernels.ISA_FLAGS if isa in kernels.supported_isas()]
# avx512vnni differs from avx512 only in the 4-bit integer dot products (simd.h's DotPairs):
# the float32 matmul and attention kernels' tests run each distinct code once.
FLOAT_ISAS = [isa for isa in ISAS if not (isa == "avx512vnni" and "avx512" in ISAS)]


@pytest.fixture(params=[_isa_param(isa) for isa in ISAS])
def isa(request, monkeypatch):
    """Each ISA the kernels have and this CPU runs; the process runs it too while the test
    does."""
    return _run_isa(request.param, monkeypatch)


@pytest.fixture(params=[_isa_param(isa) for isa in FLOAT_ISAS])
def float_isa(request, monkeypatch):
    """Each ISA with its own float32 kernels (FLOAT_ISAS); the process runs it too while the
    test does."""
    return _run_isa(request.param, monkeypatch)


@pytest.fixture
def best_isa(monkeypatch):
    """The first ISA this CPU runs (the one a user gets: kernels.ISA_FLAGS is best first), run
    by the process while the test does, JAXINFER_NATIVE=0 or not: for tests of what the
    kernels do that need one path, not every one."""
    if not ISAS or not HAVE_CXX:
        pytest.skip("no kernel ISA runs here (another architecture, or no C++ compiler)")
    return _run_isa(ISAS[0], monkeypatch)


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
    """Drop JAX's compiled programs after each test module: the suite compiles thousands in
    one process, and their code mappings approach the kernel's per-process map limit
    (vm.max_map_count 65530 here), where XLA's compiler has crashed with a segfault."""
    yield
    import jax

    jax.clear_caches()


# The longest modules first (in CI on 2 cores, 2026-12-01: test_notebooks ~11 minutes, its
# compression_study notebook 408 s): the two workers each take whole modules (--dist loadfile,
# in this order: --no-loadscope-reorder), and a long module started last runs on after the
# other worker has finished.
LONGEST_FIRST = ("test_notebooks.py", "test_serve.py", "test_distributed.py", "test_cli.py",
                 "test_families.py", "test_startup.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep order
