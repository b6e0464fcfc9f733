"""MiniMind's rewards, per era, against what its own calculate_rewards gave on the same completions
(tests/fixtures/rl/README.md), and the user's --reward_fn checks."""

import json
import pathlib
import types

import numpy as np
import pytest

from minimind_jax.errors import UserError
from minimind_jax.rl.rewards import RewardModel, call_reward_fn, era_rewards, load_reward_fn, repetition_penalty

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "rl"
ARCHS = {"2510": "minimind2", "v3": "minimind3"}


def fixture(era: str) -> dict:
    return json.loads((FIXTURES / f"rewards_{era}.json").read_text())


def table_reward_model() -> RewardModel:
    """A RewardModel whose inner model scores with the same table as the stand-in MiniMind's run used."""

    def score_of(tokenizer, chat):
        text = json.dumps(chat, ensure_ascii=False)
        return (sum(map(ord, text)) % 1601) / 100.0 - 8.0  # spread over [-8, 8]: clipping shows

    model = RewardModel.__new__(RewardModel)
    model.torch, model.tokenizer = pytest.importorskip("torch"), None
    model.model = types.SimpleNamespace(get_score=score_of)
    return model


@pytest.mark.parametrize("era", ["2510", "v3"])
def test_rule_rewards_are_minimind_calculate_rewards_bit_for_bit(era):
    case = fixture(era)
    ours = era_rewards(ARCHS[era], case["prompts"], case["responses"], case["num_generations"], reasoning=True)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, np.float32(case["rule_rewards"]))
    assert len(set(case["rule_rewards"])) >= 5  # the completions reach many branches of the rules


@pytest.mark.parametrize("era", ["2510", "v3"])
def test_reward_model_scores_see_minimind_chat_and_are_clipped_and_mixed_as_minimind_does(era):
    """The reward model sees the chat MiniMind assembles (v3: the history flattened into one user turn; 2510:
    the prompt's turns then the reply, and with --reasoning 1 the <answer> part alone, mixed 0.4/0.6)."""
    case = fixture(era)
    model = table_reward_model()
    ours = era_rewards(ARCHS[era], case["prompts"], case["responses"], case["num_generations"], reasoning=True,
                       reward_model=model)  # fmt: skip
    np.testing.assert_allclose(ours, np.float32(case["scored_rewards"]), rtol=0, atol=1e-6)
    assert np.any(np.abs(np.float32(case["scored_rewards"]) - np.float32(case["rule_rewards"])) >= 2.9)  # clipped
    if era == "2510":
        plain = era_rewards("minimind2", case["prompts"], case["responses"], case["num_generations"],
                            reasoning=False, reward_model=model)  # fmt: skip
        np.testing.assert_allclose(plain, np.float32(case["scored_rewards_no_reasoning"]), rtol=0, atol=1e-6)


def test_repetition_penalty_counts_a_run_of_chinese_characters_as_one_word():
    assert repetition_penalty("我喜欢猫 我喜欢猫 我喜欢猫") == 0.0  # three words, one trigram
    assert repetition_penalty("a b c a b c a b c") == pytest.approx(0.5)  # 4 of 7 trigrams repeat: capped
    assert repetition_penalty("one two") == 0.0


def test_reward_fn_gets_prompts_completions_and_record_fields(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def score(prompts, completions, gt):\n    return [float(len(c)) + (g == c) for c, g in zip(completions, gt)]\n"
    )
    monkeypatch.chdir(tmp_path)
    function = load_reward_fn("my_rewards:score")
    rewards = call_reward_fn(function, ["p", "p"], ["ab", "x"], 1, gt=["ab", "y"])
    np.testing.assert_array_equal(rewards, np.float32([3.0, 1.0]))


@pytest.mark.parametrize(
    "body, message",
    [
        ("raise KeyError('gt')", "--reward_fn bad_rewards:score raised KeyError"),
        ("return [0.0, float('nan')]", "returned nan for completion 1"),
        ("return [1.0, float('inf')]", "returned inf for completion 1"),
        ("return [1.0]", "returned 1 rewards for 2 completions"),
        ("return 'high'", "not one float per completion"),
    ],
)
def test_a_bad_reward_fn_is_one_line_naming_it(tmp_path, monkeypatch, body, message):
    module = f"bad_rewards_{abs(hash(body))}"
    (tmp_path / f"{module}.py").write_text(f"def score(prompts, completions, **fields):\n    {body}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=message.replace("bad_rewards", module)) as error:
        call_reward_fn(load_reward_fn(f"{module}:score"), ["p", "p"], ["a", "b"], 7)
    assert "\n" not in str(error.value) and f"{module}:score" in str(error.value)
    assert "prompts start at data row 7" in str(error.value)


@pytest.mark.parametrize("spec, message", [("nocolon", "give module:function"),
                                           ("no_such_module_here:f", "cannot import it"),
                                           ("json:no_such_function", "cannot import it")])  # fmt: skip
def test_a_reward_fn_that_cannot_be_found_is_one_line(spec, message):
    with pytest.raises(UserError, match=message):
        load_reward_fn(spec)


def test_a_hugging_face_reward_model_scores_the_chat_clipped(tmp_path):
    """--reward_model_path with a local AutoModelForSequenceClassification (one label): its score of the chat as
    its tokenizer's template renders it, clipped to ±3; a model with two labels is refused in one line."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from tests.conftest import require_shared

    tokenizer = transformers.AutoTokenizer.from_pretrained(require_shared("minimind", "v3"))
    config = transformers.LlamaConfig(vocab_size=6400, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)  # fmt: skip
    chats = [[{"role": "user", "content": "你好"}, {"role": "assistant", "content": text}]
             for text in ("Hello there!", "我很好，谢谢。", "a b c d e f")]  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForSequenceClassification(config)
    for scale in (1.0, 1000.0):  # scores well inside ±3, then far outside
        with torch.no_grad():
            model.score.weight.mul_(scale)
        model.save_pretrained(tmp_path / f"rm_{scale}")
        tokenizer.save_pretrained(tmp_path / f"rm_{scale}")
        scores = [RewardModel(str(tmp_path / f"rm_{scale}")).score(chat) for chat in chats]
        with torch.no_grad():
            raw = [float(model(**tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True,
                                                                return_tensors="pt")).logits[0, 0]) for chat in chats]  # fmt: skip
        assert scores == [max(min(value, 3.0), -3.0) for value in raw]
        assert all(abs(value) < 3 for value in raw) if scale == 1 else all(abs(value) > 3 for value in raw), raw

    config.num_labels = 2
    transformers.LlamaForSequenceClassification(config).save_pretrained(tmp_path / "two")
    tokenizer.save_pretrained(tmp_path / "two")
    with pytest.raises(UserError, match="a reward model has one label, this one has 2"):
        RewardModel(str(tmp_path / "two"))
