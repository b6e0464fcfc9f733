"""v3's agentic RL pieces against MiniMind's own train_agent.py (tests/fixtures/rl/agent_tools.json, made by
make_agent_fixtures.py): the tool mocks' observations, the valid-call check, the gt check and the reward;
and the calculator, which parses arithmetic where MiniMind calls eval."""

import json
import pathlib
import time

import numpy as np
import pytest

from minimind_jax.rl.agent import agent_reward, answers_in_text
from minimind_jax.rl.tools import FAILED_CALL, calculate, is_valid_call, observation, parse_tool_calls

FIXTURE = json.loads((pathlib.Path(__file__).parents[1] / "fixtures" / "rl" / "agent_tools.json").read_text())
TOOL_NAMES = ("calculate_math", "unit_converter", "get_current_weather", "get_current_time", "get_exchange_rate",
              "translate_text")  # fmt: skip


@pytest.mark.parametrize("name, arguments, expected", FIXTURE["observations"])
def test_tool_observations_are_minimind(name, arguments, expected):
    assert observation(name, arguments) == expected


@pytest.mark.parametrize("name, arguments, names, expected", FIXTURE["valid_calls"])
def test_valid_calls_are_counted_as_minimind_counts_them(name, arguments, names, expected):
    assert is_valid_call(name, arguments, set(names)) == bool(expected)


@pytest.mark.parametrize("text, answers, expected", FIXTURE["answers"])
def test_gt_answers_are_found_as_minimind_finds_them(text, answers, expected):
    assert answers_in_text(text, answers) == set(expected)  # 72.1 and "72.1" are two answers


@pytest.mark.parametrize("turns, unfinished, answers, names, expected", FIXTURE["rewards"])
def test_trajectory_rewards_are_minimind(turns, unfinished, answers, names, expected):
    tools = None if names is None else [{"type": "function", "function": {"name": name}} for name in names]
    reward = agent_reward(turns, unfinished, answers, tools, "<|im_start|>user\nq<|im_end|>\n", None)
    assert reward == np.float32(expected)


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('touch pwned')", "open('pwned', 'w')", "'a' * 3", "().__class__.__bases__",
     "math.__dict__", "(lambda: 1)()", "[1, 2]", "9 ** 9 ** 9", "2 ** 10 ** 7", "math.factorial(10 ** 7)",
     "math.comb(10 ** 9, 10 ** 8)", "x + 1", "1 if 1 else 2", "1 < 2"],
)  # fmt: skip
def test_the_calculator_runs_nothing_but_bounded_arithmetic(expression, tmp_path, monkeypatch):
    """What eval would run (imports, files, attribute walks, lambdas) or take minutes over (huge powers and
    factorials, which MiniMind's one-second alarm stops) is a failed call, at once and with no effect."""
    monkeypatch.chdir(tmp_path)
    started = time.perf_counter()
    assert observation("calculate_math", {"expression": expression}) == FAILED_CALL
    assert time.perf_counter() - started < 1.0
    assert not (tmp_path / "pwned").exists()
    with pytest.raises((ValueError, ArithmeticError)):
        calculate(expression)


def test_tool_calls_are_parsed_from_their_blocks_and_bad_json_is_dropped():
    text = '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> and <tool_call>{bad</tool_call><tool_call>5</tool_call>'
    assert parse_tool_calls(text) == [{"name": "a", "arguments": {}}, 5]
    # a call that is not an object (MiniMind's code stops on it) is an invalid call and a failed observation
    assert not is_valid_call("", {}, set(TOOL_NAMES)) and observation(["a"], {}) == FAILED_CALL
