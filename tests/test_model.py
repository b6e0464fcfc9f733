"""The Flax model against numbers produced by MiniMind's own PyTorch code (../shared/golden)."""
import jax.numpy as jnp
import numpy as np
import pytest

import minimind_jax
from minimind_jax.model.transformer import KVCache
from tests.conftest import require_shared

CASES = [(era, variant) for era in ("2510", "v3") for variant in ("dense", "moe")]
TOL = 1e-4


def _golden(era, variant):
    model = minimind_jax.load(require_shared("golden", era, f"{variant}.pth"))
    return model, np.load(require_shared("golden", era, f"{variant}.npz"))


@pytest.mark.parametrize("era,variant", CASES)
def test_eval_logits_and_hidden_states_match_golden(era, variant):
    model, golden = _golden(era, variant)
    out = model.forward(golden["input_ids"])
    np.testing.assert_allclose(out.logits, golden["logits"], atol=TOL, rtol=0)
    np.testing.assert_allclose(out.hidden_states, golden["hidden_states"], atol=TOL, rtol=0)
    masked = model(golden["input_ids"], golden["attention_mask"])
    np.testing.assert_allclose(masked, golden["logits_masked"], atol=TOL, rtol=0)
    assert golden["attention_mask"].min() == 0, "the golden batch must exercise left padding"


@pytest.mark.parametrize("era", ["2510", "v3"])
def test_moe_train_mode_logits_and_aux_loss_match_golden(era):
    model, golden = _golden(era, "moe")
    out = model.forward(golden["input_ids"], train=True)
    # 2510 rounds expert outputs through fp16 in training; we reproduce the rounding, but a 1e-6 difference
    # before it can flip one fp16 rounding, so 2510 is held to 2e-3 (measured: about 1e-4).
    tol = 2e-3 if era == "2510" else TOL
    np.testing.assert_allclose(out.logits, golden["train_logits"], atol=tol, rtol=0)
    np.testing.assert_allclose(float(out.aux_loss), float(golden["train_aux_loss"]), rtol=1e-5)
    assert float(out.aux_loss) > 0


@pytest.mark.parametrize("era,variant", CASES)
def test_greedy_kv_cache_decode_matches_golden(era, variant):
    model, golden = _golden(era, variant)
    prompt = jnp.asarray(golden["decode_prompt"])
    expected_tokens = golden["decode_tokens"].reshape(-1)
    step_logits = golden["decode_step_logits"].reshape(-1, model.config.vocab_size)
    out = model.forward(prompt, cache=KVCache.empty(model.config, 1, 32))
    tokens = []
    for step in range(len(step_logits)):
        logits = out.logits[:, -1]
        np.testing.assert_allclose(logits[0], step_logits[step], atol=TOL, rtol=0)
        if step == len(expected_tokens):
            break
        token = jnp.argmax(logits, axis=-1)
        tokens.append(int(token[0]))
        out = model.forward(token[:, None], cache=out.cache)
    assert tokens == expected_tokens.tolist()
