"""Params created or loaded straight into shards over 8 virtual CPU devices."""

import jax
import numpy as np
import pytest

from models import Model, abstract_params, init_params, load_pretrained
from models.causal_lm import QwenCausalLM
from pr1_jax.sharding import make_mesh, param_shardings, placer
from reference import vlm_batch

# Sharded against unsharded logits to 1e-5: full-precision fp32 matmuls.
pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.mark.devices(8)
@pytest.mark.parametrize("shape", [(1, 8, 1), (2, 2, 2), (1, 4, 2)])
def test_sharded_load_gives_the_same_logits(hf_checkpoint, shape):
    _, path = hf_checkpoint("qwen2_vl")
    plain = load_pretrained(path)
    mesh = make_mesh(shape)
    shardings = param_shardings(abstract_params(QwenCausalLM(plain.config)), mesh)
    sharded = load_pretrained(path, place=placer(shardings))
    q = sharded.params["decoder"]["layers"]["q_proj"]["kernel"]
    assert len(q.sharding.device_set) == 8 and q.sharding == shardings["decoder"]["layers"]["q_proj"]["kernel"]
    assert q.addressable_shards[0].data.size < q.size  # really split, not replicated
    ids, mask, _, pv, thw = vlm_batch([[(1, 4, 6)], [(1, 4, 4)]], [(2, 4), (1, 5)], np.random.default_rng(0))
    a = plain(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    b = sharded(ids, attention_mask=mask, pixel_values=pv, image_grid_thw=thw)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.devices(8)
def test_init_params_directly_sharded(hf_checkpoint):
    _, path = hf_checkpoint("qwen2_5_vl")
    cfg = load_pretrained(path).config
    mesh = make_mesh((1, 4, 2))
    shardings = param_shardings(abstract_params(QwenCausalLM(cfg)), mesh)
    params = init_params(cfg, jax.random.key(0), shardings=shardings)
    flat_p, flat_s = jax.tree.leaves(params), jax.tree.leaves(shardings)
    assert all(p.sharding == s for p, s in zip(flat_p, flat_s))
    unsharded = init_params(cfg, jax.random.key(0))
    for x, y in zip(flat_p, jax.tree.leaves(unsharded)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    Model(cfg, params)  # usable as a model


@pytest.mark.devices(8)
def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="needs 12 devices, have 8"):
        make_mesh((3, 4, 1))
