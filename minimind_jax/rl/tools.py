"""The tools of v3's agentic RL (train_agent.py): MiniMind's mocks, their argument checks, and the parsing of
the model's `<tool_call>` blocks.

The mocks answer from MiniMind's fixed tables, so a rollout's observations are what MiniMind's would be. The
calculator is the one difference: MiniMind evaluates the model's expression with `eval`; here it is parsed
and only arithmetic runs (numbers, + − × ÷ // % **, and `math`'s functions and constants), with bounds where
MiniMind has a one-second alarm. Whatever else `eval` would have computed gets MiniMind's answer for a
failed call, `{"error": "tool not found"}`.
"""

from __future__ import annotations

import json
import re
from typing import Any

from minimind_jax.inference.tools import calculate

WEATHER_DATA = {"北京": ("28°C", "晴"), "上海": ("15°C", "多云"), "广州": ("32°C", "闷热"), "深圳": ("30°C", "晴"),
                "杭州": ("22°C", "阴"), "成都": ("18°C", "小雨"), "武汉": ("25°C", "多云"), "南京": ("20°C", "晴"),
                "西安": ("16°C", "大风"), "重庆": ("26°C", "阴"), "Tokyo": ("12°C", "晴"), "New York": ("8°C", "多云"),
                "London": ("5°C", "小雨"), "Paris": ("10°C", "阴"), "Sydney": ("25°C", "晴朗")}  # fmt: skip
TIME_DATA = {"Asia/Shanghai": "2025-03-07 14:30:00", "America/New_York": "2025-03-07 01:30:00",
             "Europe/London": "2025-03-07 06:30:00", "Asia/Tokyo": "2025-03-07 15:30:00",
             "Europe/Paris": "2025-03-07 07:30:00", "Australia/Sydney": "2025-03-07 17:30:00"}  # fmt: skip
EXCHANGE_DATA = {("USD", "CNY"): 7.21, ("EUR", "CNY"): 7.85, ("GBP", "CNY"): 9.12, ("JPY", "CNY"): 0.048,
                 ("USD", "EUR"): 0.92, ("USD", "GBP"): 0.79, ("CNY", "JPY"): 20.83, ("AUD", "CNY"): 4.72}  # fmt: skip
TRANSLATE_DATA = {("你好世界", "english"): "Hello World", ("Good morning", "chinese"): "早上好",
                  ("今天天气真好", "english"): "The weather is nice today", ("I love programming", "chinese"): "我喜欢编程",
                  ("机器学习很有趣", "english"): "Machine learning is interesting", ("Happy birthday", "chinese"): "生日快乐"}  # fmt: skip
UNIT_DATA = {"km_miles": 0.621371, "miles_km": 1.60934, "kg_pounds": 2.20462, "pounds_kg": 0.453592,
             "meters_feet": 3.28084, "feet_meters": 0.3048, "celsius_fahrenheit": 1.8, "fahrenheit_celsius": 0.5556}  # fmt: skip
FAILED_CALL = '{"error": "tool not found"}'  # MiniMind's observation for any call that returns nothing
MAX_OBSERVATION_CHARS = 2048
TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


def _unit_converter(args):
    key = f"{args.get('from_unit', '').lower()}_{args.get('to_unit', '').lower()}"
    return {"result": round(float(args.get("value", 0)) * UNIT_DATA.get(key, 1), 4)}


def _weather(args):
    temperature, condition = WEATHER_DATA.get(args.get("location"), ("22°C", "晴"))
    return {"city": args.get("location"), "temperature": temperature, "humidity": "65%", "condition": condition}


MOCK_RESULTS = {
    "calculate_math": lambda args: {"result": calculate(str(args.get("expression", "0")))},
    "unit_converter": _unit_converter,
    "get_current_weather": _weather,
    "get_current_time": lambda args: {
        "datetime": TIME_DATA.get(args.get("timezone", "Asia/Shanghai"), "2025-03-07 14:30:00"),
        "timezone": args.get("timezone", "Asia/Shanghai"),
    },  # fmt: skip
    "get_exchange_rate": lambda args: {
        "from": args.get("from_currency"),
        "to": args.get("to_currency"),
        "rate": EXCHANGE_DATA.get((args.get("from_currency"), args.get("to_currency")), 1.0),
    },  # fmt: skip
    "translate_text": lambda args: {
        "translated_text": TRANSLATE_DATA.get((args.get("text"), args.get("target_language")), args.get("text", ""))
    },  # fmt: skip
}
CHECK_ARGS = {
    "calculate_math": lambda a: bool(a.get("expression")),
    "unit_converter": lambda a: a.get("value") is not None and a.get("from_unit") and a.get("to_unit"),
    "get_current_weather": lambda a: bool(a.get("location")),
    "get_current_time": lambda a: True,
    "get_exchange_rate": lambda a: bool(a.get("from_currency")) and bool(a.get("to_currency")),
    "translate_text": lambda a: bool(a.get("text")) and bool(a.get("target_language")),
}


def parse_tool_calls(text: str) -> list[Any]:
    """The JSON of each <tool_call>…</tool_call> block that parses (MiniMind drops the others)."""
    calls = []
    for block in TOOL_CALL.findall(text):
        try:
            calls.append(json.loads(block.strip()))
        except ValueError:
            pass
    return calls


def call_parts(call: Any) -> tuple[Any, Any]:
    """(name, arguments) of a parsed call: arguments given as a JSON string are parsed, {} when they do not.
    A call that is not an object has no name (MiniMind's code would stop on it)."""
    if not isinstance(call, dict):
        return "", {}
    name, arguments = call.get("name", ""), call.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            arguments = {}
    return name, arguments


def execute_tool(name: Any, arguments: Any) -> dict | None:
    """The mock's result, or None for an unknown tool or a call that fails."""
    function = MOCK_RESULTS.get(name) if isinstance(name, str) else None
    if function is None:
        return None
    try:
        return function(arguments)
    except (ArithmeticError, AttributeError, KeyError, TypeError, ValueError, RecursionError):
        return None


def observation(name: Any, arguments: Any) -> str:
    """What the tool turn holds: the result as JSON, or MiniMind's failure, cut to 2048 characters."""
    result = execute_tool(name, arguments)
    return (json.dumps(result, ensure_ascii=False) if result else FAILED_CALL)[:MAX_OBSERVATION_CHARS]


def is_valid_call(name: Any, arguments: Any, tool_names: set[str]) -> bool:
    """A call of an offered tool whose arguments pass MiniMind's check."""
    check = CHECK_ARGS.get(name) if isinstance(name, str) else None
    if check is None or name not in tool_names:
        return False
    try:
        return bool(check(arguments))
    except (AttributeError, TypeError):
        return False
