"""generate / Decoder / stream: MiniMind parity, cache correctness, batching, eos and sampling rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from minimind_jax import weights
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import (
    Decoder,
    Sampling,
    bucket_length,
    filter_top_k_top_p,
    generate,
    stream,
)
from minimind_jax.model.config import ModelConfig
from minimind_jax.model.transformer import MiniMind
from tests.conftest import require_shared
from tests.support.models import tiny_config

VOCAB = 256


@pytest.fixture(scope="module")
def tiny_model():
    config = ModelConfig(
        arch="minimind3",
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
    )
    return MiniMind(config, rngs=nnx.Rngs(7))


@pytest.fixture(scope="module")
def full_forward(tiny_model):
    """Logits [B, 64, V] of a whole (right-padded) sequence, without a cache: one compile for all lengths."""
    graphdef, params = nnx.split(tiny_model)
    forward = jax.jit(lambda params, ids, mask: nnx.merge(graphdef, params)(ids, mask))

    def logits_at(ids_BT, mask_BT, position):
        width = 64
        ids = np.pad(ids_BT, ((0, 0), (0, width - ids_BT.shape[1])))
        mask = np.pad(mask_BT, ((0, 0), (0, width - mask_BT.shape[1])), constant_values=1)
        return np.asarray(forward(params, ids, mask)[:, position])

    return logits_at


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, VOCAB, n) for n in lengths]


def left_padded(rows):
    width = max(len(r) for r in rows)
    ids = np.stack([np.pad(r, (width - len(r), 0)) for r in rows])
    mask = np.stack([np.pad(np.ones(len(r), int), (width - len(r), 0)) for r in rows])
    return ids, mask


# ---------------------------------------------------------------------------------------------------------
# MiniMind's own greedy decoding (golden)


@pytest.mark.parametrize("era", ["2510", "v3"])
@pytest.mark.parametrize("variant", ["dense", "moe"])
def test_greedy_decoding_matches_minimind(era, variant):
    golden = np.load(require_shared("golden", era, f"{variant}.npz"))
    model = weights.load(require_shared("golden", era, f"{variant}.pth"))
    prompt, expected_tokens = golden["decode_prompt"], golden["decode_tokens"]
    expected_logits = golden["decode_step_logits"]
    assert prompt.shape == (1, 8) and expected_tokens.shape == (8,) and expected_logits.shape == (9, 6400)

    out = generate(model, prompt, max_new_tokens=8, eos_token_id=None)
    np.testing.assert_array_equal(out[0, :8], prompt[0])
    np.testing.assert_array_equal(out[0, 8:], expected_tokens)

    # Step logits: the prefill's, then one per fed-back token (the 9th follows the 8th token).
    decoder = Decoder(model, eos_token_id=None)
    state = decoder.start(prompt)
    logits, tokens = [state.logits_BV[0]], [int(state.tokens_B[0])]
    for _ in range(8):
        state = decoder.step(state)
        logits.append(state.logits_BV[0])
        tokens.append(int(state.tokens_B[0]))
    np.testing.assert_allclose(np.stack(logits), expected_logits, atol=1e-4, rtol=0)
    assert tokens[:8] == expected_tokens.tolist()


# ---------------------------------------------------------------------------------------------------------
# The cache, batching and eos


def greedy_without_cache(full_forward, ids_BT, mask_BT, steps, repetition_penalty=1.0):
    """MiniMind's greedy loop, recomputing the whole sequence each step; returns (tokens, step logits)."""
    ids, mask = ids_BT.copy(), mask_BT.copy()
    tokens, step_logits = [], []
    for _ in range(steps):
        logits = full_forward(ids, mask, ids.shape[1] - 1)
        step_logits.append(logits)
        scores = logits.copy()
        for row in range(len(ids)):
            seen = np.unique(ids[row][mask[row] == 1])
            scores[row, seen] = np.where(
                scores[row, seen] > 0, scores[row, seen] / repetition_penalty, scores[row, seen] * repetition_penalty
            )
        next_token = scores.argmax(-1)
        tokens.append(next_token)
        ids = np.concatenate([ids, next_token[:, None]], axis=1)
        mask = np.concatenate([mask, np.ones_like(next_token)[:, None]], axis=1)
    return np.stack(tokens, 1), np.stack(step_logits, 1)


@pytest.mark.parametrize("repetition_penalty", [1.0, 1.3])
def test_cached_decoding_equals_full_recompute(tiny_model, full_forward, repetition_penalty):
    ids, mask = left_padded(prompts([7]))
    expected_tokens, expected_logits = greedy_without_cache(full_forward, ids, mask, 32, repetition_penalty)

    out = generate(tiny_model, ids, 32, repetition_penalty=repetition_penalty, eos_token_id=None)
    np.testing.assert_array_equal(out[:, 7:], expected_tokens)
    if repetition_penalty > 1:
        assert len(np.unique(expected_tokens)) > 4  # the penalty makes a varied sequence, a stronger check

    # The step-wise decoder, with a cache that starts at 16 + 16 slots and has to grow twice.
    decoder = Decoder(tiny_model, repetition_penalty=repetition_penalty, eos_token_id=None)
    state = decoder.start(ids, expected_new_tokens=16)
    logits = [state.logits_BV]
    for _ in range(31):
        state = decoder.step(state)
        logits.append(state.logits_BV)
    assert state.mask_BS.shape[1] > 32
    np.testing.assert_allclose(np.stack(logits, 1), expected_logits, atol=1e-4, rtol=0)


def test_left_padded_batch_equals_one_by_one(tiny_model, full_forward):
    rows = prompts([5, 12, 9], seed=1)
    ids, mask = left_padded(rows)
    batched = generate(tiny_model, ids, 20, attention_mask=mask, repetition_penalty=1.2, eos_token_id=None)
    assert batched.shape == (3, 12 + 20)
    for row, prompt in enumerate(rows):
        alone = generate(tiny_model, prompt[None], 20, repetition_penalty=1.2, eos_token_id=None)
        np.testing.assert_array_equal(batched[row, 12:], alone[0, len(prompt) :])
    # MiniMind's layout (pads keep their absolute positions) without the cache gives the same tokens.
    expected, _ = greedy_without_cache(full_forward, ids, mask, 20, repetition_penalty=1.2)
    np.testing.assert_array_equal(batched[:, 12:], expected)


def test_finished_rows_emit_eos_and_generation_stops_early(tiny_model):
    ids, mask = left_padded(prompts([6, 10, 8], seed=2))
    free = generate(tiny_model, ids, 24, attention_mask=mask, repetition_penalty=1.2, eos_token_id=None)[:, 10:]
    eos = int(free[0, 2])  # row 0 emits this at step 2
    first = [int(np.argmax(row == eos)) if np.any(row == eos) else None for row in free]

    out = generate(tiny_model, ids, 24, attention_mask=mask, repetition_penalty=1.2, eos_token_id=eos)[:, 10:]
    expected_len = 24 if None in first else max(first) + 1
    assert out.shape == (3, expected_len)
    for row, stop in enumerate(first):
        if stop is None:
            np.testing.assert_array_equal(out[row], free[row, :expected_len])
        else:
            np.testing.assert_array_equal(out[row, : stop + 1], free[row, : stop + 1])
            assert np.all(out[row, stop:] == eos)


def test_stream_yields_the_tokens_of_generate(tiny_model):
    ids, mask = left_padded(prompts([4, 9, 6], seed=3))
    settings = dict(do_sample=True, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.1, eos_token_id=None)
    expected = generate(tiny_model, ids, 32, attention_mask=mask, seed=11, **settings)[:, 9:]
    streamed = np.stack(list(stream(tiny_model, ids, 32, attention_mask=mask, seed=11, **settings)), 1)
    np.testing.assert_array_equal(streamed, expected)


# ---------------------------------------------------------------------------------------------------------
# Sampling


def test_sampling_is_reproducible_per_seed(tiny_model):
    ids, _ = left_padded(prompts([8], seed=4))
    draw = lambda seed: generate(
        tiny_model,
        np.repeat(ids, 3, 0),
        24,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=None,
        seed=seed,
    )
    first = draw(5)
    np.testing.assert_array_equal(first, draw(5))
    assert not np.array_equal(first, draw(6))
    assert not np.array_equal(first[0], first[1])  # rows draw independently


def test_per_row_settings_decode_each_row_by_its_own(tiny_model):
    """One batch, three requests: greedy (temperature 0), top_k 1 (the argmax too) and free sampling."""
    ids, mask = left_padded(prompts([5, 9, 7], seed=6))
    greedy = generate(tiny_model, ids, 12, attention_mask=mask, repetition_penalty=1.1, eos_token_id=None)[:, 9:]
    sampling = Sampling.per_row([0.0, 1.0, 1.5], [50, 1, 0], [0.9, 1.0, 1.0], [1.1, 1.1, 1.1])
    decoder = Decoder(tiny_model, do_sample=True, eos_token_id=None, sampling=sampling)
    state = decoder.start(ids, mask, seed=3, expected_new_tokens=12)
    tokens = [state.tokens_B]
    for _ in range(11):
        state = decoder.step(state)
        tokens.append(state.tokens_B)
    tokens = np.stack(tokens, 1)
    np.testing.assert_array_equal(tokens[:2], greedy[:2])
    assert not np.array_equal(tokens[2], greedy[2])
    with pytest.raises(UserError, match="per-row"):
        Sampling.per_row([-1.0], [0], [1.0], [1.0])


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (40, 0.3)])
def test_sampled_tokens_respect_top_k_and_top_p(tiny_model, top_k, top_p):
    ids, _ = left_padded(prompts([6], seed=5))
    decoder = Decoder(tiny_model, do_sample=True, temperature=0.7, top_k=top_k, top_p=top_p, eos_token_id=None)
    state = decoder.start(np.repeat(ids, 3, 0), seed=9, expected_new_tokens=32)
    for _ in range(32):
        logits = np.asarray(state.logits_BV) / 0.7
        allowed = np.isfinite(minimind_filter(torch.from_numpy(logits), top_k, top_p).numpy())
        tokens = np.asarray(state.tokens_B)
        assert np.all(allowed[np.arange(3), tokens])
        assert np.all(allowed.sum(-1) <= top_k)
        state = decoder.step(state)


def minimind_filter(logits, top_k, top_p):
    """MiniMind's top-k then top-p filtering (v3 `generate`), in torch, as the reference."""
    logits = logits.clone()
    if top_k > 0:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits[logits < kth] = -float("inf")
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        remove = torch.cumsum(torch.softmax(sorted_logits, -1), -1) > top_p
        remove = torch.cat([torch.zeros_like(remove[..., :1]), remove[..., :-1]], -1)
        logits[remove.scatter(1, order, remove)] = -float("inf")
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 0.9), (10, 1.0), (50, 0.85), (3, 0.05), (0, 1.0), (VOCAB + 5, 0.5)])
def test_filter_matches_minimind(top_k, top_p):
    logits = np.random.default_rng(top_k).normal(size=(6, VOCAB)).astype(np.float32) * 3
    expected = minimind_filter(torch.from_numpy(logits), min(top_k, VOCAB), top_p).numpy()
    got = np.asarray(filter_top_k_top_p(jnp.asarray(logits), jnp.int32(top_k), jnp.float32(top_p)))
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(expected))
    np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(expected)])


# ---------------------------------------------------------------------------------------------------------
# Inputs


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 16, 17, 100, 128, 129)] == [16, 16, 32, 128, 128, 256]


def test_bad_prompts_are_one_line_errors(tiny_model):
    with pytest.raises(UserError, match="left-padded"):
        generate(tiny_model, np.array([[5, 6, 0]]), 4, attention_mask=np.array([[1, 1, 0]]))
    with pytest.raises(UserError, match=r"\[0, 256\)"):
        generate(tiny_model, np.array([[5, 999]]), 4)
    with pytest.raises(UserError, match="temperature"):
        generate(tiny_model, np.array([[5, 6]]), 4, do_sample=True, temperature=0.0)
    np.testing.assert_array_equal(generate(tiny_model, np.array([5, 6]), 0), [[5, 6]])


def test_generation_past_the_rope_table_is_refused(tiny_model):
    """MiniMind's RoPE table ends at max_position_embeddings: prompt + new tokens may fill it, not pass it."""
    short = MiniMind(tiny_model.config.replace(max_position_embeddings=24), rngs=nnx.Rngs(7))
    ids = np.array([[5, 6, 7]])
    assert generate(short, ids, 21, eos_token_id=None).shape == (1, 24)
    message = (
        "max_new_tokens 22 runs past the model's 24 positions (max_position_embeddings, where MiniMind's "
        "RoPE table ends) after a 3-token prompt; at most 21 new tokens fit"
    )
    for run in (generate, lambda *args: list(stream(*args))):
        with pytest.raises(UserError) as error:
            run(short, ids, 22)
        assert str(error.value) == message


def test_generate_returns_each_new_token_log_prob_under_the_model():
    """return_log_probs: the log-probability of each sampled token under the model's own logits (no temperature or
    filter), as a full forward over the prompt and the new tokens gives it: RL's old log-probs."""
    model = MiniMind(tiny_config("minimind3", use_moe=False), rngs=nnx.Rngs(2))
    prompt = np.array([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]], np.int32)
    mask = (prompt != 0).astype(np.int32)
    ids, log_probs = generate(model, prompt, 6, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                              attention_mask=mask, eos_token_id=None, seed=1, return_log_probs=True)  # fmt: skip
    assert log_probs.shape == (2, 6) and np.all(log_probs <= 0)
    full_mask = np.concatenate([mask, np.ones((2, 6), np.int32)], axis=1)
    logits = model(ids, full_mask)[:, prompt.shape[1] - 1 : -1]
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits, -1)), ids[:, prompt.shape[1] :, None], -1)
    np.testing.assert_allclose(log_probs, expected[..., 0], rtol=1e-4, atol=1e-5)
    assert np.array_equal(generate(model, prompt, 6, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                                   attention_mask=mask, eos_token_id=None, seed=1), ids)  # fmt: skip
