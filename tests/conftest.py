"""Shared pytest fixtures.

Tests run on CPU. Eight virtual CPU devices are requested before JAX starts so multi-device
tests can build meshes; single-device code ignores the extra devices.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import pytest  # noqa: E402


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
