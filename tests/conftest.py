import atexit
import collections
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Multi-device code is tested on 8 virtual CPU devices; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite compiles the same tiny programs many times over (every trainer subprocess, every
# fixture rebuilding a model): one persistent compilation cache per session, inherited by the
# subprocesses, turns the repeats into cache reads. Fresh per session, so nothing stale is read;
# test_recompile still sees every program (JAX records a compile event on cache hits too).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="pr1_jax_tests_xla_cache_")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
sys.path.insert(0, str(Path(__file__).parent))

import jax  # noqa: E402
import pytest  # noqa: E402

from reference import hf_model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "devices(n): needs n devices (meshes of n); skipped with fewer")


# The modules whose tests run whole trainers in subprocesses (minutes each). They go first, so that
# with the two workers of the default `-n 2 --dist loadfile` (pyproject.toml) both start at once
# and the other modules fill in beside them, instead of one of them running alone at the end.
LONG_MODULES = ("test_train.py", "test_reliability.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_MODULES)))  # stable: order within a module kept


_RELIABILITY = {}  # {test module: its latest running counts}


def pytest_runtest_logreport(report):
    for name, counts in report.user_properties:
        if name == "reliability_counts":
            _RELIABILITY[report.nodeid.split("::")[0]] = counts


def pytest_terminal_summary(terminalreporter):
    if _RELIABILITY:
        c = sum((collections.Counter(v) for v in _RELIABILITY.values()), collections.Counter())
        terminalreporter.write_line(
            f"reliability: faults injected {c['faults_injected']}, survived {c['faults_survived']}; "
            f"bad inputs tried {c['bad_inputs']}; training steps lost {c['steps_lost']}")


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


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Trackers that send nothing anywhere: wandb offline, its settings and caches in tmp_path; the
    URI of an MLflow file store in tmp_path (returned), which MLflow 3 uses only when allowed."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no crash reports (Sentry) either
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return f"file://{tmp_path / 'mlruns'}"
