"""Rollout sampling draws from the distribution MiniMind draws from: for the same logits, the filtered
probabilities equal those of its own sampler (2510: HF generate's temperature and top-k warpers; v3: its own
generate's temperature, top-k and top-p), and draws from our sampler pass a chi-square test against them."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from minimind_jax.inference.generation import Sampling, choose_tokens, filter_top_k_top_p
from minimind_jax.rl.rollout import ERA_SAMPLING

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "rl"
ARCHS = {"2510": "minimind2", "v3": "minimind3"}


def era_sampling(era: str):
    temperature, top_k, top_p, _ = ERA_SAMPLING[ARCHS[era]]
    return temperature, top_k, top_p


@pytest.mark.parametrize("era", ["2510", "v3"])
def test_filtered_distribution_equals_minimind(era):
    case = np.load(FIXTURES / f"sampling_{era}.npz")
    temperature, top_k, top_p = era_sampling(era)
    filtered = filter_top_k_top_p(jnp.asarray(case["logits"]) / temperature, jnp.int32(top_k), jnp.float32(top_p))
    ours = np.asarray(jax.nn.softmax(filtered, axis=-1))
    np.testing.assert_array_equal(ours > 0, case["probs"] > 0)  # the same tokens survive the filters
    np.testing.assert_allclose(ours, case["probs"], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("era", ["2510", "v3"])
def test_draws_follow_minimind_distribution(era):
    case = np.load(FIXTURES / f"sampling_{era}.npz")
    temperature, top_k, top_p = era_sampling(era)
    sampling = Sampling.create(True, temperature, top_k, top_p, 1.0)
    row, draws = 0, 20000
    logits = jnp.broadcast_to(jnp.asarray(case["logits"][row]), (draws, case["logits"].shape[1]))
    seen = jnp.zeros(logits.shape, bool)
    tokens = np.asarray(jax.jit(choose_tokens, static_argnames="do_sample")(
        logits, seen, sampling, jax.random.key(3), do_sample=True))  # fmt: skip
    probs = case["probs"][row]
    support = np.flatnonzero(probs > 0)
    assert np.isin(tokens, support).all()
    counts = np.bincount(tokens, minlength=len(probs))[support]
    expected = probs[support].astype(np.float64) / probs[support].astype(np.float64).sum() * draws
    result = stats.chisquare(counts, expected)
    assert result.pvalue > 1e-3, result
