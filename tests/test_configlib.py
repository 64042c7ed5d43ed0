import dataclasses
from typing import Literal

import pytest

from pr1_jax.configlib import ConfigError, apply_overrides, from_dict, load, to_dict


@dataclasses.dataclass(frozen=True)
class Inner:
    lr: float = 1e-6
    mode: Literal["hard", "soft"] = "hard"
    switch: Literal["groups", "off"] = "groups"
    buckets: tuple[int, ...] = (64, 128)


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "run"
    steps: int = 10
    path: str | None = None
    inner: Inner = dataclasses.field(default_factory=Inner)
    weights: dict[str, float] = dataclasses.field(default_factory=lambda: {"a": 1.0})


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  mode: soft\n  switch: off\n")  # YAML 1.1 reads a bare off as false
    cfg = load(Outer, f, ["inner.lr=3e-4", "inner.buckets=[8, 16]", "weights.b=2", "path=/x"])
    assert cfg == Outer(steps=5, path="/x", inner=Inner(lr=3e-4, mode="soft", switch="off", buckets=(8, 16)),
                        weights={"a": 1.0, "b": 2.0})
    assert load(Outer, f, ["inner.switch=groups"]).inner.switch == "groups"
    assert load(Outer, None, ["inner.switch=off"]).inner.switch == "off"
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize("override,message", [
    ("inner.lrr=1", r"config.inner: unknown key\(s\) \['lrr'\]"),
    ("steps=many", r"config.steps: expected an integer, got 'many'"),
    ("steps=true", r"config.steps: expected an integer"),
    ("inner.mode=medium", r"config.inner.mode: 'medium' is not one of \['hard', 'soft'\]"),
    ("inner.buckets=[1, x]", r"config.inner.buckets\[1\]: expected an integer"),
    ("name.sub=1", r"name is not a section"),
    ("steps", r"expected key=value"),
])
def test_clear_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load(Outer, None, [override])


def test_yaml_is_safe_loaded(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(Exception, match="could not determine a constructor"):
        load(Outer, f)


def test_overrides_do_not_mutate():
    d = {"inner": {"lr": 1.0}}
    apply_overrides(d, ["inner.lr=2"])
    assert d == {"inner": {"lr": 1.0}}
