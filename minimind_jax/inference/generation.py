"""Text generation: a jitted prefill, then a decode loop over a fixed-size KV cache.

One generation, for B left-padded prompts of length T (MiniMind's layout):
- The prompts are right-padded up to a length bucket P (a power of two), so prompt lengths share compiled
  programs. The cache holds S = P + (a bucket of max_new_tokens) slots.
- Prefill runs the P tokens once. The cache length is then set back to T: the slots [T, P) hold the bucket
  padding, and each decoded token overwrites the next one before any query can attend to it (causal mask).
  Every token therefore sits at MiniMind's absolute position (cache length + step), left pads included.
- Each decode step feeds the last token and chooses the next with MiniMind's rules (`choose_tokens`).
  `generate` runs all steps in one `jax.lax.while_loop`; `Decoder`/`stream` run one jitted step per call,
  for streaming output.

Shapes: B batch, T prompt length, P bucketed prompt length, S cache slots, N new-token slots, V vocab.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minimind_jax.errors import UserError
from minimind_jax.model.config import ModelConfig, load_preset
from minimind_jax.model.transformer import KVCache, MiniMind, check_token_ids, split_for_decoding, unstack_layers

MIN_BUCKET = 16  # the shortest prompt / new-token bucket
CANDIDATES = 64  # the largest logits a top-k draw reads (top-k below this, e.g. MiniMind's 50)


def check_room(config: ModelConfig, prompt_len: int, max_new_tokens: int) -> None:
    """Refuses a generation that would run past the model's positions: MiniMind's RoPE table ends at
    max_position_embeddings, and it cannot go on from there."""
    positions = config.max_position_embeddings
    if prompt_len + max_new_tokens > positions:
        after = f" after a {prompt_len}-token prompt" if prompt_len else ""
        raise UserError(
            f"max_new_tokens {max_new_tokens} runs past the model's {positions} positions "
            f"(max_position_embeddings, where MiniMind's RoPE table ends){after}; at most "
            f"{max(positions - prompt_len, 0)} new tokens fit"
        )


def bucket_length(length: int) -> int:
    """The smallest power of two >= length (at least MIN_BUCKET): one compiled program per bucket."""
    return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------------
# Choosing the next token, as MiniMind's `generate` does


class Sampling(NamedTuple):
    """Sampling settings, held as traced arrays so that changing them never recompiles: scalars for every
    row (`create`), or [B] with one setting per row (`per_row`)."""

    temperature: jax.Array  # fp32; only used when sampling; a row's 0 (per_row) picks its most likely token
    top_k: jax.Array  # int32; <= 0 turns top-k off
    top_p: jax.Array  # fp32; >= 1 turns top-p off
    repetition_penalty: jax.Array  # fp32; 1 turns it off

    @classmethod
    def create(
        cls, do_sample: bool, temperature: float, top_k: int, top_p: float, repetition_penalty: float
    ) -> Sampling:
        if do_sample and not temperature > 0:
            raise UserError(f"temperature must be > 0 when sampling, got {temperature}")
        if not repetition_penalty > 0:
            raise UserError(f"repetition_penalty must be > 0, got {repetition_penalty}")
        if not top_p > 0:
            raise UserError(f"top_p must be > 0, got {top_p}")
        return cls(jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p), jnp.float32(repetition_penalty))

    @classmethod
    def per_row(cls, temperature, top_k, top_p, repetition_penalty) -> Sampling:
        """One setting per row (sequences of length B), for a batch of unrelated requests. Decode it with
        do_sample=True; rows with temperature 0 are greedy (the argmax after the repetition penalty)."""
        temperature, top_p, repetition_penalty = (
            np.asarray(x, np.float32) for x in (temperature, top_p, repetition_penalty)
        )
        if not (np.all(temperature >= 0) and np.all(top_p > 0) and np.all(repetition_penalty > 0)):
            raise UserError("per-row sampling needs temperature >= 0, top_p > 0 and repetition_penalty > 0")
        return cls(
            jnp.asarray(temperature), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p), jnp.asarray(repetition_penalty)
        )


def _per_row(setting):
    """A scalar or [B] setting as [1, 1] or [B, 1], to broadcast against [B, V]."""
    return jnp.reshape(setting, (-1, 1))


def penalize_repeats(logits_BV, seen_BV, penalty):
    """Seen tokens: positive logits are divided by the penalty, the others multiplied by it."""
    penalized = jnp.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return jnp.where(seen_BV, penalized, logits_BV)


def filter_top_k_top_p(logits_BV, top_k, top_p):
    """MiniMind's top-k, then top-p (nucleus) filtering: removed logits become -inf.

    Top-k keeps the logits >= the k-th largest. Top-p keeps the shortest prefix of the sorted distribution
    whose probability exceeds top_p (always at least one token). Logits tied at either cut-off are all kept.
    """
    batch, vocab = logits_BV.shape
    top_k_B1, top_p_B1 = _per_row(top_k), _per_row(top_p)
    sorted_BV = -jnp.sort(-logits_BV, axis=-1)  # descending
    kth_index_B1 = jnp.broadcast_to(jnp.clip(top_k_B1 - 1, 0, vocab - 1), (batch, 1))
    kth_B1 = jnp.where(top_k_B1 > 0, jnp.take_along_axis(sorted_BV, kth_index_B1, axis=-1), -jnp.inf)
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    sorted_BV = jnp.where(sorted_BV < kth_B1, -jnp.inf, sorted_BV)

    # Sorted position j is removed when the probability mass of positions < j already exceeds top_p.
    cumulative_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    num_kept_B = 1 + jnp.sum(cumulative_BV[:, :-1] <= top_p_B1, axis=-1)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, (num_kept_B - 1)[:, None], axis=-1)
    cutoff_B1 = jnp.where(top_p_B1 < 1.0, cutoff_B1, -jnp.inf)
    return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)


def _draw_from_window(logits_BV, top_k, top_p, key):
    """(whether the window holds the filter, a draw from filter_top_k_top_p's distribution) reading only the
    CANDIDATES largest logits of each row (jax.lax.top_k, not a sort of the vocabulary). The window holds the
    filter when every row's top-k is on and below CANDIDATES and no logit outside it ties the k-th largest."""
    values_BC, tokens_BC = jax.lax.top_k(logits_BV, CANDIDATES)
    top_k_B1 = jnp.broadcast_to(_per_row(top_k), (logits_BV.shape[0], 1))
    kth_B1 = jnp.take_along_axis(values_BC, jnp.clip(top_k_B1 - 1, 0, CANDIDATES - 1), axis=-1)
    # The window's smallest logit as a min, not as values_BC[:, -1]: a second slice of the sort lets XLA:CPU
    # no longer see a top-k there, and it sorts the whole vocabulary.
    smallest_B1 = values_BC.min(axis=-1, keepdims=True)
    fits = jnp.all((top_k_B1 > 0) & (top_k_B1 < CANDIDATES) & (smallest_B1 < kth_B1))
    filtered_BC = filter_top_k_top_p(values_BC, top_k, top_p)  # already sorted: the same cut-offs as the full row
    drawn_B = jnp.take_along_axis(tokens_BC, jax.random.categorical(key, filtered_BC, axis=-1)[:, None], axis=-1)
    return fits, drawn_B[:, 0]


def choose_tokens(logits_BV, seen_BV, sampling: Sampling, key, do_sample: bool):
    """The next token [B]: MiniMind's temperature, repetition penalty, top-k, top-p, then a draw or argmax.

    Greedy decoding (and a row with temperature 0) skips the temperature and the filters, which cannot
    change the argmax. With top-k on (MiniMind's 50), the draw reads only the largest logits
    (`_draw_from_window`): the same distribution without sorting the vocabulary each step.
    """
    penalty_B1, temperature_B1 = _per_row(sampling.repetition_penalty), _per_row(sampling.temperature)
    greedy_B = jnp.argmax(penalize_repeats(logits_BV, seen_BV, penalty_B1), axis=-1).astype(jnp.int32)
    if not do_sample:
        return greedy_B
    sampled_B1 = temperature_B1 > 0
    logits_BV = penalize_repeats(logits_BV / jnp.where(sampled_B1, temperature_B1, 1.0), seen_BV, penalty_B1)
    draw_key, full_key = jax.random.split(key)
    fits, windowed_B = _draw_from_window(logits_BV, sampling.top_k, sampling.top_p, draw_key)
    drawn_B = jax.lax.cond(
        fits,
        lambda: windowed_B,
        lambda: jax.random.categorical(
            full_key, filter_top_k_top_p(logits_BV, sampling.top_k, sampling.top_p), axis=-1
        ),
    ).astype(jnp.int32)
    return jnp.where(sampled_B1[:, 0], drawn_B, greedy_B)


# ---------------------------------------------------------------------------------------------------------
# Prefill and decode steps (traced)


class DecodeState(NamedTuple):
    """Everything one decode step needs; `tokens_B` were chosen from `logits_BV` at this step."""

    cache: KVCache
    mask_BS: jax.Array  # int32: 0 on left padding, 1 elsewhere (slots past the cache length are causally masked)
    tokens_B: jax.Array  # int32
    logits_BV: jax.Array  # fp32: the model's logits, before any sampling transform
    seen_BV: jax.Array  # bool: tokens present in each row so far (repetition penalty)
    finished_B: jax.Array  # bool: the row has emitted eos
    key: jax.Array


def _choose(state: DecodeState, logits_BV, sampling, eos_id, do_sample) -> DecodeState:
    """Chooses the next tokens from `logits_BV`; finished rows keep emitting eos (eos_id < 0: no eos)."""
    key, draw_key = jax.random.split(state.key)
    tokens_B = choose_tokens(logits_BV, state.seen_BV, sampling, draw_key, do_sample)
    tokens_B = jnp.where(state.finished_B, eos_id, tokens_B)
    rows = jnp.arange(tokens_B.shape[0])
    return state._replace(
        tokens_B=tokens_B,
        logits_BV=logits_BV,
        seen_BV=state.seen_BV.at[rows, tokens_B].set(True),
        finished_B=state.finished_B | (tokens_B == eos_id),
        key=key,
    )


def _prefill(graphdef, params, layer_weights, ids_BP, mask_BS, prompt_len, sampling, eos_id, key, do_sample
             ) -> DecodeState:  # fmt: skip
    model: MiniMind = nnx.merge(graphdef, params)
    config = model.config
    batch, padded_len = ids_BP.shape
    cache = KVCache.empty(config, batch, mask_BS.shape[1], jnp.dtype(config.dtype))
    out = model.forward(ids_BP, mask_BS, cache=cache, layer_weights=layer_weights, return_logits=False)
    last_hidden_BD = jax.lax.dynamic_index_in_dim(out.hidden_states, prompt_len - 1, axis=1, keepdims=False)
    # The pad tokens of the left padding and of the bucket do not count as seen.
    real_BP = (mask_BS[:, :padded_len] > 0) & (jnp.arange(padded_len) < prompt_len)
    rows_B1 = jnp.arange(batch)[:, None]
    seen_BV = jnp.zeros((batch, config.vocab_size), jnp.int32).at[rows_B1, ids_BP].max(real_BP.astype(jnp.int32))
    state = DecodeState(
        cache=out.cache._replace(length=jnp.asarray(prompt_len, jnp.int32)),
        mask_BS=mask_BS,
        tokens_B=jnp.zeros((batch,), jnp.int32),
        logits_BV=jnp.zeros((batch, config.vocab_size)),
        seen_BV=seen_BV > 0,
        finished_B=jnp.zeros((batch,), bool),
        key=key,
    )
    return _choose(state, model.logits(last_hidden_BD), sampling, eos_id, do_sample)


def _step(graphdef, params, layer_weights, state: DecodeState, sampling, eos_id, do_sample) -> DecodeState:
    model: MiniMind = nnx.merge(graphdef, params)
    out = model.forward(state.tokens_B[:, None], state.mask_BS, cache=state.cache, layer_weights=layer_weights)
    return _choose(state._replace(cache=out.cache), out.logits[:, 0], sampling, eos_id, do_sample)


def _generate(
    graphdef, params, ids_BP, mask_BS, prompt_len, max_new_tokens, sampling, eos_id, key, do_sample, num_slots
):
    """Prefill + while_loop decode; returns (new tokens [B, num_slots], their log-probabilities under the model's
    own logits (no temperature or filter, as MiniMind's rollout engine scores them) [B, num_slots], how many
    were produced)."""
    layer_weights = unstack_layers(params["layers"])  # once, not at every step
    state = _prefill(graphdef, params, layer_weights, ids_BP, mask_BS, prompt_len, sampling, eos_id, key, do_sample)
    chosen_log_prob = lambda state: jnp.take_along_axis(
        jax.nn.log_softmax(state.logits_BV, axis=-1), state.tokens_B[:, None], axis=-1
    )[:, 0]
    new_BN = jnp.zeros((ids_BP.shape[0], num_slots), jnp.int32).at[:, 0].set(state.tokens_B)
    log_probs_BN = jnp.zeros((ids_BP.shape[0], num_slots), jnp.float32).at[:, 0].set(chosen_log_prob(state))

    def keep_going(carry):
        step, state, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(state.finished_B)

    def decode_one(carry):
        step, state, new_BN, log_probs_BN = carry
        state = _step(graphdef, params, layer_weights, state, sampling, eos_id, do_sample)
        new_BN = jax.lax.dynamic_update_index_in_dim(new_BN, state.tokens_B, step, axis=1)
        return (
            step + 1,
            state,
            new_BN,
            jax.lax.dynamic_update_index_in_dim(log_probs_BN, chosen_log_prob(state), step, axis=1),
        )

    num_new, _, new_BN, log_probs_BN = jax.lax.while_loop(
        keep_going, decode_one, (jnp.int32(1), state, new_BN, log_probs_BN)
    )
    return new_BN, log_probs_BN, num_new


class _Compiled(NamedTuple):
    prefill: Callable
    step: Callable
    generate: Callable


_COMPILED: dict[tuple, _Compiled] = {}


def _compiled_for(model: MiniMind) -> _Compiled:
    """The jitted functions, shared by every model of one structure, so new weights (or a new model object)
    never recompile."""
    graphdef, params = nnx.split(model)
    key = (json.dumps(model.config.to_dict(), sort_keys=True), jax.tree.structure(params))
    if key not in _COMPILED:
        # The graphdef holds the (unhashable) config, so it is closed over rather than passed as a static arg.
        _COMPILED[key] = _Compiled(
            prefill=jax.jit(
                lambda *a, do_sample: _prefill(graphdef, *a, do_sample=do_sample), static_argnames="do_sample"
            ),
            step=jax.jit(lambda *a, do_sample: _step(graphdef, *a, do_sample=do_sample), static_argnames="do_sample"),
            generate=jax.jit(
                lambda *a, do_sample, num_slots: _generate(graphdef, *a, do_sample=do_sample, num_slots=num_slots),
                static_argnames=("do_sample", "num_slots"),
            ),
        )
    return _COMPILED[key]


# ---------------------------------------------------------------------------------------------------------
# Host side


def _prompt_arrays(input_ids, attention_mask, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked [B,T] int32 ids and mask; a single [T] prompt becomes [1,T]."""
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise UserError(f"input_ids must be a non-empty [batch, length] integer array, got shape {ids.shape}")
    check_token_ids(ids, vocab_size)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise UserError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
    if not np.all(mask[:, -1] == 1):
        raise UserError("prompts must be left-padded: attention_mask must be 1 on the last position of every row")
    return ids.astype(np.int32), (mask != 0).astype(np.int32)


def _bucketed(ids_BT: np.ndarray, mask_BT: np.ndarray, num_slots: int):
    """Ids right-padded to the prompt bucket P, and the mask over all S = P + num_slots cache slots."""
    batch, length = ids_BT.shape
    padded_len = bucket_length(length)
    ids_BP = np.pad(ids_BT, ((0, 0), (0, padded_len - length)))
    mask_BS = np.concatenate([mask_BT, np.ones((batch, padded_len - length + num_slots), np.int32)], axis=1)
    return jnp.asarray(ids_BP), jnp.asarray(mask_BS)


def generate(
    model: MiniMind,
    input_ids,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 0.85,
    top_k: int = 50,
    top_p: float = 0.85,
    repetition_penalty: float = 1.0,
    attention_mask=None,
    eos_token_id: int | None = 2,
    seed: int = 0,
    return_log_probs: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Continues the prompts; returns them followed by the new tokens, like MiniMind's `generate`.

    Args:
      model: a `MiniMind` (e.g. from `minimind_jax.load`).
      input_ids: [B, T] (or [T]) token ids; rows of different lengths are left-padded.
      max_new_tokens: the most tokens to add to each row.
      do_sample: draw from the filtered distribution; False picks the most likely token (greedy).
      temperature, top_k, top_p, repetition_penalty: as MiniMind defines them. The logits are divided by
        temperature; tokens already in the row (prompt or output) have positive logits divided by
        repetition_penalty and negative ones multiplied by it; top_k <= 0 and top_p >= 1 switch those
        filters off. Only repetition_penalty affects greedy decoding.
      attention_mask: [B, T], 1 on real tokens and 0 on the left padding; None means no padding.
      eos_token_id: a row that emits it is finished and keeps emitting it; generation stops early once every
        row has finished. None never stops early.
      seed: the random seed for sampling; the same seed gives the same tokens.
      return_log_probs: also return each new token's log-probability under the model's own logits (before
        temperature, penalty and filters: what RL's old log-probs are), float32 [B, n].

    Returns:
      int32 array [B, T + n] with n <= max_new_tokens (n < max_new_tokens only when every row finished), and
      with return_log_probs the log-probabilities.

    Raises:
      UserError: bad prompts, or T + max_new_tokens beyond the model's max_position_embeddings (`check_room`).

    Decoding is compiled once per batch size and per power-of-two bucket of prompt length and of
    max_new_tokens; the sampling settings and the weights can change without recompiling.
    """
    ids_BT, mask_BT = _prompt_arrays(input_ids, attention_mask, model.config.vocab_size)
    if max_new_tokens <= 0:
        return (ids_BT, np.zeros((len(ids_BT), 0), np.float32)) if return_log_probs else ids_BT
    check_room(model.config, ids_BT.shape[1], max_new_tokens)
    sampling = Sampling.create(do_sample, temperature, top_k, top_p, repetition_penalty)
    num_slots = bucket_length(max_new_tokens)
    ids_BP, mask_BS = _bucketed(ids_BT, mask_BT, num_slots)
    new_BN, log_probs_BN, num_new = _compiled_for(model).generate(
        nnx.state(model),
        ids_BP,
        mask_BS,
        jnp.int32(ids_BT.shape[1]),
        jnp.int32(max_new_tokens),
        sampling,
        jnp.int32(-1 if eos_token_id is None else eos_token_id),
        jax.random.key(seed),
        do_sample=do_sample,
        num_slots=num_slots,
    )
    ids = np.concatenate([ids_BT, np.asarray(new_BN)[:, : int(num_new)]], axis=1)
    return (ids, np.asarray(log_probs_BN)[:, : int(num_new)]) if return_log_probs else ids


class Decoder:
    """Step-by-step decoding with one jitted prefill and one jitted single-token step.

    `start` runs the prompt and chooses the first token; each `step` feeds the last token and chooses the
    next. Both return a `DecodeState` (tokens_B, the logits they came from, finished_B, ...). The cache
    doubles when it fills, so a stream has no fixed length (one compile per cache size).
    """

    def __init__(
        self,
        model: MiniMind,
        *,
        do_sample: bool = False,
        temperature: float = 0.85,
        top_k: int = 50,
        top_p: float = 0.85,
        repetition_penalty: float = 1.0,
        eos_token_id: int | None = 2,
        sampling: Sampling | None = None,
    ):
        """`sampling` (e.g. `Sampling.per_row`) replaces the scalar settings when given."""
        self.vocab_size = model.config.vocab_size
        self.do_sample = do_sample
        if sampling is None:
            sampling = Sampling.create(do_sample, temperature, top_k, top_p, repetition_penalty)
        self.sampling = sampling
        self.eos_id = jnp.int32(-1 if eos_token_id is None else eos_token_id)
        self.compiled = _compiled_for(model)
        _, self.params, self.layer_weights = split_for_decoding(model)

    def start(self, input_ids, attention_mask=None, *, seed: int = 0, expected_new_tokens: int = 256) -> DecodeState:
        ids_BT, mask_BT = _prompt_arrays(input_ids, attention_mask, self.vocab_size)
        ids_BP, mask_BS = _bucketed(ids_BT, mask_BT, bucket_length(expected_new_tokens))
        return self.compiled.prefill(
            self.params,
            self.layer_weights,
            ids_BP,
            mask_BS,
            jnp.int32(ids_BT.shape[1]),
            self.sampling,
            self.eos_id,
            jax.random.key(seed),
            do_sample=self.do_sample,
        )

    def step(self, state: DecodeState) -> DecodeState:
        slots = state.mask_BS.shape[1]
        if int(state.cache.length) >= slots:
            state = _grow(state, slots)
        return self.compiled.step(
            self.params, self.layer_weights, state, self.sampling, self.eos_id, do_sample=self.do_sample
        )


def _grow(state: DecodeState, extra_slots: int) -> DecodeState:
    """The same state with `extra_slots` more (empty, unmasked) cache slots."""
    cache = state.cache.map(lambda x_BSKHd: jnp.pad(x_BSKHd, ((0, 0), (0, extra_slots), (0, 0), (0, 0))))
    mask_BS = jnp.pad(state.mask_BS, ((0, 0), (0, extra_slots)), constant_values=1)
    return state._replace(cache=cache, mask_BS=mask_BS)


def stream(
    model: MiniMind, input_ids, max_new_tokens: int, *, attention_mask=None, seed: int = 0, **sampling
) -> Iterator[np.ndarray]:
    """Yields the next token of every row ([B] int32) as soon as it is chosen; same arguments and tokens as
    `generate` (`sampling`: do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id)."""
    if max_new_tokens <= 0:
        return
    check_room(model.config, np.shape(input_ids)[-1], max_new_tokens)
    decoder = Decoder(model, **sampling)
    state = decoder.start(input_ids, attention_mask, seed=seed, expected_new_tokens=min(max_new_tokens, 256))
    for step in range(max_new_tokens):
        if step:
            state = decoder.step(state)
        yield np.asarray(state.tokens_B)
        if bool(jnp.all(state.finished_B)):
            return


# ---------------------------------------------------------------------------------------------------------
# Decode benchmark


def benchmark_decode(
    preset: str = "minimind2-small", batch_sizes=(1, 32), prompt_len: int = 64, new_tokens: int = 128, seed: int = 0
) -> list[dict]:
    """Generation speed of `generate` on a preset with random weights, for each batch size.

    Eos is off, so every row produces `new_tokens` tokens. For each batch size: compile_s (compiling the
    whole generation program), prefill_s (the jitted prompt pass alone), generate_s (prefill + decode, after
    compiling), tokens_per_s = batch * new_tokens / generate_s and decode_tokens_per_s, the decode loop alone
    = batch * (new_tokens - 1) / (generate_s - prefill_s).
    """
    config: ModelConfig = load_preset(preset)
    model = MiniMind(config, rngs=nnx.Rngs(seed))
    params, compiled = nnx.state(model), _compiled_for(model)
    sampling = Sampling.create(False, 1.0, 0, 1.0, 1.0)
    no_eos, key = jnp.int32(-1), jax.random.key(seed)
    num_slots = bucket_length(new_tokens)
    _, decode_params, layer_weights = split_for_decoding(model)  # the prefill as a Decoder runs it
    rows = []
    for batch in batch_sizes:
        ids = np.random.default_rng(seed).integers(3, config.vocab_size, (batch, prompt_len))
        ids_BP, mask_BS = _bucketed(ids.astype(np.int32), np.ones((batch, prompt_len), np.int32), num_slots)
        args = (params, ids_BP, mask_BS, jnp.int32(prompt_len), jnp.int32(new_tokens), sampling, no_eos, key)
        start = time.perf_counter()
        run = compiled.generate.lower(*args, do_sample=False, num_slots=num_slots).compile()
        compile_s = time.perf_counter() - start
        jax.block_until_ready(run(*args))  # warm-up
        start = time.perf_counter()
        new_BN, _, num_new = jax.block_until_ready(run(*args))
        generate_s = time.perf_counter() - start
        if int(num_new) != new_tokens:
            raise RuntimeError(f"generated {int(num_new)} tokens, expected {new_tokens}")

        prefill_args = (decode_params, layer_weights, ids_BP, mask_BS, jnp.int32(prompt_len), sampling, no_eos, key)
        prefill = compiled.prefill.lower(*prefill_args, do_sample=False).compile()
        jax.block_until_ready(prefill(*prefill_args))
        start = time.perf_counter()
        jax.block_until_ready(prefill(*prefill_args))
        prefill_s = time.perf_counter() - start
        rows.append(
            {
                "preset": preset,
                "batch": batch,
                "prompt_len": prompt_len,
                "new_tokens": new_tokens,
                "device": jax.devices()[0].device_kind,
                "compile_s": round(compile_s, 3),
                "prefill_s": round(prefill_s, 4),
                "generate_s": round(generate_s, 4),
                "tokens_per_s": round(batch * new_tokens / generate_s, 1),
                "decode_tokens_per_s": round(batch * (new_tokens - 1) / max(generate_s - prefill_s, 1e-9), 1),
            }
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Decode benchmark: tokens/s of generate() on random weights.")
    parser.add_argument("--bench", action="store_true", help="run the decode benchmark (the only action)")
    parser.add_argument("--preset", default="minimind2-small")
    parser.add_argument("--batch_sizes", default="1,32", help="comma-separated batch sizes")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--new_tokens", type=int, default=128)
    args = parser.parse_args(argv)
    if not args.bench:
        parser.error("nothing to do: pass --bench")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    for row in benchmark_decode(args.preset, batch_sizes, args.prompt_len, args.new_tokens):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
