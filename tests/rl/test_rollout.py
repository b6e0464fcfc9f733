"""MiniMind's row layout for RL: the bucketed rows give every completion token the log-probability it has in
MiniMind's own layout (left padding to the batch's longest prompt, absolute positions, v3's padding mask or
2510's attended padding), and the masks follow each trainer's rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minimind_jax.model.transformer import MiniMind
from minimind_jax.rl.algorithms import completion_log_probs
from minimind_jax.rl.rollout import layout_rows, trainer_layout
from tests.support.models import tiny_config

PAD, EOS = 0, 2
PROMPTS = np.array([[0, 0, 0, 7, 8, 9, 10], [11, 12, 13, 14, 15, 16, 17]], np.int32)  # left-padded, P = 7
COMPLETIONS = [[20, 21, EOS], [22, EOS], [23, 24, 25, 26, 27], [28, EOS]]  # G = 2; row 2 has no eos


def minimind_log_probs(model, arch: str) -> np.ndarray:
    """Each completion token's log-probability in MiniMind's layout: prompts, then completions right-filled to
    the longest (2510 with pad, v3 with eos), positions 0.., and an attention mask only in v3."""
    longest = max(map(len, COMPLETIONS))
    fill = EOS if arch == "minimind3" else PAD
    rows = np.array([[*prompt, *ids, *[fill] * (longest - len(ids))]
                     for prompt, ids in zip(np.repeat(PROMPTS, 2, axis=0), COMPLETIONS)], np.int32)  # fmt: skip
    mask = jnp.asarray(rows != PAD, jnp.int32) if arch == "minimind3" else None
    log_probs = jax.nn.log_softmax(model(jnp.asarray(rows), mask)[:, PROMPTS.shape[1] - 1 : -1], -1)
    return np.asarray(jnp.take_along_axis(log_probs, jnp.asarray(rows[:, PROMPTS.shape[1] :, None]), -1)[..., 0])


@pytest.mark.parametrize("arch", ["minimind2", "minimind3"])
def test_bucketed_rows_give_minimind_layout_log_probs(arch):
    model = MiniMind(tiny_config(arch, use_moe=False), rngs=nnx.Rngs(3))
    layout = trainer_layout("grpo", arch)
    rows = layout_rows(PROMPTS, COMPLETIONS, arch=arch, num_rows=6, max_seq_len=64, max_gen_len=64, pad_id=PAD,
                       eos_id=EOS, mask_padding=layout.mask_padding)  # fmt: skip
    assert rows["sequences"].shape == (6, 16 + 16)  # the prompt and completion buckets; 2 fill rows
    assert rows["positions"][0, 16 - 7] == 0  # the first real prompt column sits at MiniMind's position 0
    batch = {key: jnp.asarray(value) for key, value in rows.items()}
    ours, _ = completion_log_probs(model, batch)
    expected = minimind_log_probs(model, arch)
    mask = rows["completion_mask"][:4, : expected.shape[1]].astype(bool)
    np.testing.assert_array_equal(rows["completion_mask"][:4].sum(1), [3, 2, 5, 2])
    np.testing.assert_allclose(np.asarray(ours)[:4, : expected.shape[1]][mask], expected[mask], rtol=2e-5, atol=2e-5)
    assert rows["attention_mask"][4:].sum() == 0 and rows["completion_mask"][4:].sum() == 0


def test_ppo_2510_mask_leaves_out_the_first_generated_token_and_pads():
    layout = trainer_layout("ppo", "minimind2")
    rows = layout_rows(PROMPTS[:1], [[20, 21, EOS], [22, PAD, 23, EOS]], arch="minimind2", num_rows=2,
                       max_seq_len=64, max_gen_len=64, pad_id=PAD, eos_id=EOS, mask_padding=layout.mask_padding,
                       skip_first_token=layout.skip_first_token)  # fmt: skip
    np.testing.assert_array_equal(rows["completion_mask"][:, :4], [[0, 1, 1, 0], [0, 0, 1, 1]])
    # The critic reads each row at its last attended column: its eos (the pads after it are masked out).
    np.testing.assert_array_equal(rows["sequences"][np.arange(2), rows["value_index"]], [EOS, EOS])
