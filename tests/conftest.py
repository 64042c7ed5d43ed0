import os
import sys
from pathlib import Path

# Multi-device code is tested on 8 virtual CPU devices; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import pytest  # noqa: E402

from reference import hf_model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs n devices (meshes of n); skipped with fewer")


def pytest_runtest_setup(item):
    # On CPU the 8 virtual devices above are always there; a GPU run (JAX_PLATFORMS=cuda) may have one.
    for mark in item.iter_markers("devices"):
        if jax.device_count() < mark.args[0]:
            pytest.skip(f"needs {mark.args[0]} devices, {jax.default_backend()} has {jax.device_count()}")


@pytest.fixture
def highest_precision():
    """fp32 matmuls at full precision while the test runs: XLA's default on GPUs is TF32 (logits
    off by ~3e-4 against transformers), on CPU this changes nothing. For the parity tests only,
    so that TF32 stays visible everywhere else."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory):
    """(transformers model, checkpoint dir) per architecture, built once per session."""
    cache = {}

    def get(arch: str, **over):
        key = (arch, tuple(sorted(over.items())))
        if key not in cache:
            model = hf_model(arch, **over)
            path = tmp_path_factory.mktemp(arch)
            model.save_pretrained(path)
            cache[key] = (model, path)
        return cache[key]

    return get
