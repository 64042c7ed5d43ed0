"""Reward plug-ins: a user's own reward terms, ``reward.functions: {name: "path/to/file.py:function"}``.

A plug-in is a plain function in a file of the user's, e.g.

    def exact_box(response: str, ground_truth: str, *, annotations=(), strict: bool = False) -> float

It gets the response and the gold answer positionally, by keyword the record fields it declares
(``RECORD_FIELDS``; a ``**fields`` parameter takes them all) and its options
(``reward.options.<name>``), and returns a float. ``reward.weights.<name>`` weighs it into the
reward. It runs as the built-in terms do (``pr1_jax.rewards``): in the reward worker processes
under ``reward.timeout_s``, an exception, a non-finite value or a timeout counted and scored 0.

The file is imported at start-up in the trainer, so that a missing file or function, a failing
import or a signature that cannot take the call fails there with the config key; each worker
process imports it again, because a function loaded from a file has no importable module by
which pickle could name it: workers receive a ``PluginReward``, the file's path and the
function's name. A path is read relative to the working directory and kept absolute.

This module must stay free of JAX imports: worker processes import it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

RECORD_FIELDS = ("problem", "record_id", "annotations")
"""The record fields a reward may declare besides the response and the gold answer: the prompt's
problem text, the record's id and its visual annotations (a list of statements)."""

SAMPLE_FIELDS = ("response_length", "max_length")
"""What the run knows of each sample beyond its text: its token count and the response cap (the
overlong term declares them)."""


class PluginError(ValueError):
    """A reward plug-in that cannot be used; the message names the file and function."""


@functools.cache
def _module(path: str) -> ModuleType:
    """The plug-in file imported once per process, under a name of its own (registered, so that
    what it defines, e.g. dataclasses, works as in any module)."""
    name = f"pr1_jax_reward_plugin_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: not importable as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise PluginError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from exc
    return module


@dataclass(frozen=True)
class PluginReward:
    """A reward function in a user's file, callable like a registered one; pickles as its path
    and function name, so that a worker process imports the file itself."""

    path: str  # absolute
    function: str

    @classmethod
    def parse(cls, spec: str) -> PluginReward:
        """``"path/to/file.py:function"`` -> the plug-in, its file imported and its function found."""
        path, sep, function = spec.rpartition(":")
        if not sep or not path or not function.isidentifier():
            raise PluginError(f"{spec!r}: expected 'path/to/file.py:function'")
        file = Path(path).expanduser().resolve()
        if file.suffix != ".py":
            raise PluginError(f"{spec!r}: {file} is not a .py file")
        if not file.is_file():
            raise PluginError(f"{spec!r}: no such file {file}")
        plugin = cls(str(file), function)
        plugin.load()
        return plugin

    def load(self) -> Callable[..., float]:
        module = _module(self.path)
        fn = getattr(module, self.function, None)
        if not callable(fn):
            defined = sorted(k for k, v in vars(module).items()
                             if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_"))
            raise PluginError(f"{self.path} has no function {self.function!r}; it defines {defined}")
        return fn

    @property
    def __signature__(self) -> inspect.Signature:
        # What inspect.signature reports for this object: the user's function's own signature,
        # from which the rewards module reads the record fields and options the function takes.
        return inspect.signature(self.load())

    def __call__(self, response: str, ground_truth: str, **kwargs) -> float:
        return self.load()(response, ground_truth, **kwargs)

    def __str__(self) -> str:
        return f"{self.path}:{self.function}"


def check_call(plugin: PluginReward, takes: frozenset[str] | None, options: Mapping[str, object],
               fields: Iterable[str] = RECORD_FIELDS + SAMPLE_FIELDS) -> None:
    """That ``plugin`` can take the call the rewards make: ``(response, ground_truth)``, the
    record ``fields`` it declares (``takes``; None: every one) and its ``options``. Raises a
    PluginError showing the signature."""
    sig = inspect.signature(plugin)
    declared = [f for f in fields if takes is None or f in takes]
    try:
        sig.bind("", "", **{f: None for f in declared}, **options)
    except TypeError as exc:
        raise PluginError(f"{plugin.function}{sig} in {plugin.path} cannot be called as fn(response, ground_truth"
                          f"{''.join(f', {k}=...' for k in [*declared, *options])}): {exc}; the record fields a "
                          f"reward may declare are {list(fields)}") from None
