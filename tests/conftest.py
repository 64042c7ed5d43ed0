import os
import sys
from pathlib import Path

# Multi-device code is tested on 8 virtual CPU devices; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402

from reference import hf_model  # noqa: E402


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
