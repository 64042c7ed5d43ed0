"""LoRA (`pr1_jax.lora`): the adapter math against the base and the merged model, PEFT's init, the
update moving the adapters only (with optimizer state for them only), config errors; a short LoRA
run that resumes exactly, checkpoints its adapters only and exports a merged model (logits of
transformers = ours) and a PEFT adapter (loaded by `peft` when installed, its names checked
against transformers' modules always)."""

import dataclasses
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from models import load_pretrained
from models.causal_lm import QwenCausalLM
from models.pretrained import abstract_params
from pr1_jax import configlib, lora, train
from pr1_jax.checkpoint import Checkpointer
from pr1_jax.export import export, load_run_params
from pr1_jax.learner import (Learner, LearnerConfig, init_state, loss_and_grads, lr_schedule, make_module,
                             make_optimizer, response_logprobs, train_step)
from pr1_jax.sharding import global_batch, make_mesh
from test_learner import BASE, TEMP, setup  # noqa: F401  (setup: the learner tests' module fixture)
from test_train import _args, assets  # noqa: F401  (assets: the tiny run's session fixture; registers test_parity)

pytestmark = pytest.mark.usefixtures("highest_precision")

LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _adapters(module, key=0, b_scale=0.0):
    """PEFT-initialised adapters of `module`; with b_scale, B drawn N(0, b_scale) instead of zero."""
    abstract = lora.split(nn.unbox(abstract_params(module)))[1]
    adapters = lora.init_adapters(jax.random.key(key), abstract)
    if b_scale:
        flat = jax.tree_util.tree_flatten_with_path(adapters)[0]
        keys = jax.random.split(jax.random.key(key + 1), len(flat))
        adapters = jax.tree_util.tree_unflatten(jax.tree.structure(adapters), [
            b_scale * jax.random.normal(k, x.shape) if kp[-1].key == "lora_b" else x for (kp, x), k in zip(flat, keys)])
    return adapters


def test_adapter_math(setup):
    cfg = dataclasses.replace(BASE, lora=dataclasses.replace(LORA, dropout=0.5))
    module, plain = make_module(setup.model.config, cfg), make_module(setup.model.config, cfg, adapters=False)
    params, batch = setup.model.params, setup.batch
    logp = jax.jit(lambda m, p, rng=None: response_logprobs(m, p, batch, TEMP, rng=rng)[0], static_argnums=0)
    # PEFT's init: A ~ U(+-1/sqrt(in)), B = 0, so the adapted model is the base model, bit for bit.
    fresh = _adapters(module)
    a = fresh["decoder"]["layers"]["down_proj"]["lora_a"]  # [L, intermediate, rank]
    assert a.shape == (2, 96, 4) and 0.8 / np.sqrt(96) < float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(96)
    assert all(not np.any(x["lora_b"]) for x in fresh["decoder"]["layers"].values())
    base = logp(plain, params)
    assert np.array_equal(np.asarray(logp(module, lora.join(params, fresh))), np.asarray(base))
    # Trained-like adapters: base + adapters equals the merged model, and differs from the base.
    adapters = _adapters(module, b_scale=0.1)
    unmerged = logp(module, lora.join(params, adapters))
    merged = logp(plain, lora.merge(params, adapters, cfg.lora))
    mask = np.asarray(batch.response_mask).astype(bool)
    assert np.abs(np.asarray(unmerged) - np.asarray(merged))[mask].max() <= 1e-5
    assert np.abs(np.asarray(unmerged) - np.asarray(base))[mask].max() > 1e-2
    # Dropout only with the update's rng.
    dropped = logp(module, lora.join(params, adapters), jax.random.key(0))
    assert np.abs(np.asarray(dropped) - np.asarray(unmerged))[mask].max() > 1e-3


def test_adapter_grads_are_the_chain_rule_of_the_kernels(setup):
    """At B = 0 the adapted kernel is W + s A B, so dL/dB = s A^T dL/dW and dL/dA = 0: the adapters'
    gradients from the update's own path against the full model's kernel gradients."""
    cfg = dataclasses.replace(BASE, lora=LORA)
    module = make_module(setup.model.config, cfg)
    adapters = _adapters(module)
    grads, _ = jax.jit(lambda a, p: loss_and_grads(a, setup.batch, cfg, module, temperature=TEMP, base=p))(
        adapters, setup.model.params)
    full, _ = setup.grads(BASE)
    for name, g in grads["decoder"]["layers"].items():
        a = adapters["decoder"]["layers"][name]["lora_a"]
        dw = full["decoder"]["layers"][name]["kernel"]  # [L, in, out]
        expected = LORA.scale * jnp.einsum("lir,lio->lro", a, dw)
        assert float(jnp.max(jnp.abs(g["lora_b"] - expected))) <= 1e-5 * max(float(jnp.max(jnp.abs(expected))), 1.0)
        assert float(jnp.max(jnp.abs(expected))) > 0 and not np.any(g["lora_a"]), name


@pytest.mark.devices(8)
def test_update_trains_adapters_only(setup):
    cfg = dataclasses.replace(BASE, micro_batch_size=4, lora=dataclasses.replace(LORA, dropout=0.1))
    learner = setup.learner(cfg, (2, 2, 2))
    state = learner.init_state(setup.model.params)
    paths = [tuple(k.key for k in kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert paths and all(lora.is_adapter(p) and p[-2] in lora.TARGETS for p in paths)
    n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * n_adapters and all(x.dtype == jnp.float32 for x in moments)
    base = jax.device_get(learner.base)
    q = state.params["decoder"]["layers"]["q_proj"]["lora_a"]
    assert q.sharding == learner.param_shardings["decoder"]["layers"]["q_proj"]["lora_a"]
    # The unsharded pure step on the same state is the reference (same dropout masks: same attempt count).
    module = make_module(setup.model.config, cfg)
    tx = make_optimizer(cfg, 10, learning_rate=1.0)
    ref_state, ref = jax.jit(lambda s, b, p: train_step(s, b, cfg, module, tx, lr_schedule(cfg, 10), None, TEMP,
                                                         base=p))(init_state(jax.device_get(state.params), tx),
                                                                  setup.batch, base)
    shards = learner.mesh.shape["data"] * learner.mesh.shape["fsdp"]
    batch = global_batch(learner.mesh, setup.make_batch(setup.out, setup.adv, shards=shards))
    state, metrics = learner.step(state, batch)
    assert float(metrics["skipped"]) == 0.0 and int(state.step) == 1
    assert float(metrics["loss"]) == pytest.approx(float(ref["loss"]), abs=1e-5)
    assert float(metrics["grad_norm"]) == pytest.approx(float(ref["grad_norm"]), rel=1e-4)
    for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
        assert float(jnp.max(jnp.abs(x - y))) <= 1e-5
    for name, leaves in state.params["decoder"]["layers"].items():  # A and B of every target moved
        assert float(jnp.max(jnp.abs(leaves["lora_b"]))) > 0.5 * cfg.lr, name
    bits = lambda x: np.asarray(x).view(np.uint32)  # noqa: E731
    assert all(np.array_equal(bits(a), bits(b)) for a, b in zip(jax.tree.leaves(learner.base), jax.tree.leaves(base)))
    # The sampler's params: the base with the targets' kernels merged, everything else the base's.
    merged = learner.policy_params(state)
    for key in ("visual", "embed_tokens"):
        assert all(np.array_equal(bits(a), bits(b)) for a, b in zip(jax.tree.leaves(merged[key]),
                                                                  jax.tree.leaves(base[key])))
    assert not np.allclose(merged["decoder"]["layers"]["down_proj"]["kernel"],
                           base["decoder"]["layers"]["down_proj"]["kernel"], atol=1e-6)


def test_base_is_held_in_the_compute_dtype(setup):
    cfg = dataclasses.replace(BASE, dtype="bfloat16", lora=LORA)
    learner = Learner(setup.model.config, cfg, make_mesh((1, 1, 1), devices=jax.devices()[:1]), 10)
    state = learner.init_state(setup.model.params)
    assert {x.dtype for x in jax.tree.leaves(learner.base)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim} == {jnp.dtype(jnp.float32)}


@pytest.mark.parametrize("lora_cfg,message", [
    ({"rank": -1}, "learner.lora.rank: -1 is out of range"),
    ({"rank": 4, "targets": ["q_proj", "qkv"]}, "lora.targets ['qkv']: unknown"),
    ({"rank": 4, "dropout": 1.0}, "learner.lora.dropout: 1.0 is out of range"),
])
def test_config_errors(lora_cfg, message):
    with pytest.raises(configlib.ConfigError, match=re.escape(message)):
        configlib.from_dict(LearnerConfig, {"lora": lora_cfg}, "learner")


def test_lora_run_resumes_checkpoints_adapters_and_exports(assets, tmp_path):  # noqa: F811
    extra = ("learner.lora.rank=4", "learner.lora.alpha=8", "learner.lora.dropout=0.1", "learner.lr=0.01",
             "reward.weights.test_parity=1.0", "val_freq=0", "val_before_train=false", "save_freq=1")

    def run(run_dir, steps):
        train.Trainer(train.parse_config(_args(assets, run_dir, f"max_steps={steps}", *extra))).fit()
        return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]

    whole = run(tmp_path / "whole", 2)
    run(tmp_path / "resumed", 1)
    resumed = run(tmp_path / "resumed", 2)
    assert [x["step"] for x in whole] == [1, 2] and resumed[-1]["step"] == 2
    for key in ("overall", "loss", "grad_norm", "response_len"):
        assert resumed[-1][key] == pytest.approx(whole[-1][key], rel=1e-5, abs=1e-7), key
    # The checkpoint: adapters and their moments, no base weight.
    step_dir = tmp_path / "whole" / "checkpoints" / "2" / "state"
    names = json.loads((step_dir / "_METADATA").read_text())["tree_metadata"]
    assert any("lora_a" in k for k in names) and not any("kernel" in k or "embedding" in k for k in names)

    cfg, _, adapters = load_run_params(tmp_path / "whole")
    base = load_pretrained(assets.policy)
    ours = QwenCausalLM(base.config, lora=cfg.learner.lora)
    ids = np.array([[5, 6, 7, 8, 9, 10]])
    pos = np.broadcast_to(np.arange(6), (3, 1, 6))
    logits = np.asarray(ours.apply({"params": lora.join(base.params, adapters)}, ids, pos, np.ones_like(ids))[0])
    assert np.abs(logits - np.asarray(base(ids))).max() > 1e-3  # the adapters were trained

    merged = export(tmp_path / "whole", tmp_path / "merged")
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(merged).eval()
    with torch.no_grad():
        assert np.abs(hf(input_ids=torch.tensor(ids)).logits.numpy() - logits).max() <= 1e-4

    out = export(tmp_path / "whole", tmp_path / "peft", lora_mode="adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
    tensors = load_file(out / "adapter_model.safetensors")
    base_hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(assets.policy).eval()
    modules = dict(base_hf.named_modules())
    assert len(tensors) == 2 * len(lora.TARGETS) * base.config.text.num_layers
    for key, value in tensors.items():  # PEFT's names: base_model.model.<transformers module>.lora_{A,B}.weight
        m = re.fullmatch(r"base_model\.model\.(.+)\.lora_([AB])\.weight", key)
        linear = modules[m.group(1)]
        assert re.fullmatch(config["target_modules"], m.group(1))
        assert value.shape == ((4, linear.in_features) if m.group(2) == "A" else (linear.out_features, 4))
    assert not any(re.fullmatch(config["target_modules"], n) for n in modules if n.startswith("model.visual"))
    peft = pytest.importorskip("peft")
    adapted = peft.PeftModel.from_pretrained(base_hf, out).eval()
    with torch.no_grad():
        assert np.abs(adapted(input_ids=torch.tensor(ids)).logits.numpy() - logits).max() <= 1e-4
