"""web_demo's tools as the server runs them for the chat page: arithmetic parsed (never `eval`), real
conversions, errors as the model's tool results."""

import json
import random

import pytest

from minimind_jax.inference.tools import DEMO_TOOLS, calculate, convert_units, run_demo_tool


def result(name, arguments):
    return json.loads(run_demo_tool(name, arguments))


@pytest.mark.parametrize(
    "expression, value",
    [("12×7", "84"), ("2^10", "1024"), ("（3+4）÷2", "3.5"), ("math.sqrt(16) + 1", "5.0"), ("  7 // 2 % 3", "0")],
)
def test_the_calculator_computes_arithmetic(expression, value):
    assert calculate(expression) == value
    assert result("calculate_math", {"expression": expression}) == {"result": value}


@pytest.mark.parametrize(
    "expression",
    ["__import__('os').system('touch /tmp/pwned')", "().__class__.__bases__", "open('/etc/passwd')",
     "[x for x in (1,)]", "lambda: 1", "9**9**9", "math.factorial(10**6)", "1/0", "3 +"],
)  # fmt: skip
def test_the_calculator_refuses_everything_else(expression):
    assert set(result("calculate_math", {"expression": expression})) == {"error"}


def test_conversions_time_random_and_length():
    assert result("unit_converter", {"value": 100, "from_unit": "celsius", "to_unit": "fahrenheit"}) == {
        "result": 212.0
    }
    assert result("unit_converter", {"value": "3", "from_unit": "km", "to_unit": "m"}) == {"result": 3000.0}
    assert convert_units(1, "mile", "km") == pytest.approx(1.609344)
    assert "error" in result("unit_converter", {"value": 1, "from_unit": "km", "to_unit": "kg"})
    assert "error" in result("unit_converter", {"value": float("nan"), "from_unit": "km", "to_unit": "m"})
    assert len(result("get_current_time", {"timezone": "Europe/Paris"})["result"]) == len("2026-01-01 00:00:00")
    assert "error" in result("get_current_time", {"timezone": "Mars/Olympus"})
    random.seed(0)
    assert all(3 <= result("random_number", {"min": 3, "max": 5})["result"] <= 5 for _ in range(20))
    assert "error" in result("random_number", {"min": 5, "max": 3})
    assert "error" in result("random_number", {"min": "a", "max": 3})
    assert result("text_length", '{"text": "你好, world"}') == {"result": 9}


def test_bad_calls_become_error_results():
    assert result("no_such_tool", {}) == {"error": "unknown tool: no_such_tool"}
    assert "error" in result("text_length", "not json")
    assert "error" in result("text_length", [1, 2])
    assert [tool["function"]["name"] for tool in DEMO_TOOLS] == [
        "calculate_math", "get_current_time", "random_number", "text_length", "unit_converter",
        "get_current_weather", "get_exchange_rate", "translate_text"]  # fmt: skip
