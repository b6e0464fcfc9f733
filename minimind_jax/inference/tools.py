"""Tools a chat can call, run by the server (never by the page): the 8 of MiniMind's scripts/web_demo.py, and
the calculator that v3's agentic RL shares.

The calculator parses the expression and runs arithmetic only (numbers, + − × ÷ // % **, and `math`'s
functions and constants), with bounds where MiniMind's eval has a one-second alarm; it never calls `eval`.
Time, random numbers, text length and unit conversion are computed for real; weather, exchange rates and
translation answer with web_demo's fixed demo values, as MiniMind's page does. A result goes back to the
model as web_demo sends it: the JSON of `{"result": ...}` (or `{"error": ...}`) as a tool turn's content.
"""

from __future__ import annotations

import ast
import datetime
import json
import math
import operator
import random
import zoneinfo
from typing import Any

# The calculator's bounds (MiniMind stops eval after one second)
MAX_INTEGER_BITS = 100_000
MAX_MATH_INTEGER_ARGUMENT = 10_000
BINARY_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
                    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}  # fmt: skip
UNARY_OPERATORS = {ast.UAdd: operator.pos, ast.USub: operator.neg}
MATH_NAMES = {name for name in dir(math) if not name.startswith("_")}


def _bounded(value):
    if isinstance(value, int) and value.bit_length() > MAX_INTEGER_BITS:
        raise OverflowError("integer too large")
    return value


def _evaluate(node: ast.AST):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, complex):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in BINARY_OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
            if right > 0 and right * max(abs(left).bit_length(), 1) > MAX_INTEGER_BITS:
                raise OverflowError("power too large")
        return _bounded(BINARY_OPERATORS[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in UNARY_OPERATORS:
        return UNARY_OPERATORS[type(node.op)](_evaluate(node.operand))
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "math"
            and node.attr in MATH_NAMES):  # fmt: skip
        return getattr(math, node.attr)
    if isinstance(node, ast.Call) and not node.keywords:
        function = _evaluate(node.func)
        if not callable(function):
            raise ValueError("not a function")
        arguments = [_evaluate(argument) for argument in node.args]
        if any(isinstance(a, int) and abs(a) > MAX_MATH_INTEGER_ARGUMENT for a in arguments):
            raise OverflowError("argument too large")  # factorial, comb, perm: MiniMind's alarm would stop them
        return _bounded(function(*arguments))
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def calculate(expression: str) -> str:
    """The calculator's answer, str(value) as MiniMind's eval gives it, for arithmetic written as MiniMind
    accepts it (^ for **, ×, ÷, −, full-width parentheses). Raises ValueError (or ArithmeticError) otherwise."""
    for written, python in (("^", "**"), ("×", "*"), ("÷", "/"), ("−", "-"), ("（", "("), ("）", ")")):
        expression = expression.replace(written, python)
    try:  # eval ignores leading spaces and tabs; ast.parse would call them an indent
        tree = ast.parse(expression.lstrip(" \t"), mode="eval")
    except SyntaxError as error:
        raise ValueError(str(error)) from None
    return str(_evaluate(tree))


def _function(name: str, description: str, properties: dict, required: list[str]) -> dict:
    schema = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": schema}}


# web_demo's tools as its page offers them to the model: names, descriptions, parameters
DEMO_TOOLS = [
    _function("calculate_math", "计算数学表达式", {"expression": {"type": "string", "description": "数学表达式"}},
              ["expression"]),
    _function("get_current_time", "获取当前时间", {"timezone": {"type": "string", "default": "Asia/Shanghai"}}, []),
    _function("random_number", "生成随机数", {"min": {"type": "integer"}, "max": {"type": "integer"}}, ["min", "max"]),
    _function("text_length", "计算文本长度", {"text": {"type": "string"}}, ["text"]),
    _function("unit_converter", "单位转换", {"value": {"type": "number"}, "from_unit": {"type": "string"},
                                         "to_unit": {"type": "string"}}, ["value", "from_unit", "to_unit"]),
    _function("get_current_weather", "获取天气", {"city": {"type": "string"}}, ["city"]),
    _function("get_exchange_rate", "获取汇率", {"from_currency": {"type": "string"},
                                            "to_currency": {"type": "string"}}, ["from_currency", "to_currency"]),
    _function("translate_text", "翻译文本", {"text": {"type": "string"}, "target_lang": {"type": "string"}},
              ["text", "target_lang"]),
]  # fmt: skip

# unit -> (quantity, its size in the quantity's base unit); temperatures convert through kelvin instead
UNITS = {"m": ("length", 1.0), "meter": ("length", 1.0), "meters": ("length", 1.0), "km": ("length", 1000.0),
         "cm": ("length", 0.01), "mm": ("length", 0.001), "mile": ("length", 1609.344), "miles": ("length", 1609.344),
         "ft": ("length", 0.3048), "foot": ("length", 0.3048), "feet": ("length", 0.3048),
         "inch": ("length", 0.0254), "inches": ("length", 0.0254), "kg": ("mass", 1.0), "g": ("mass", 0.001),
         "lb": ("mass", 0.45359237), "pound": ("mass", 0.45359237), "pounds": ("mass", 0.45359237),
         "l": ("volume", 1.0), "liter": ("volume", 1.0), "ml": ("volume", 0.001)}  # fmt: skip
TO_KELVIN = {"c": lambda t: t + 273.15, "celsius": lambda t: t + 273.15, "k": lambda t: t, "kelvin": lambda t: t,
             "f": lambda t: (t - 32) / 1.8 + 273.15, "fahrenheit": lambda t: (t - 32) / 1.8 + 273.15}  # fmt: skip
FROM_KELVIN = {"c": lambda k: k - 273.15, "celsius": lambda k: k - 273.15, "k": lambda k: k, "kelvin": lambda k: k,
               "f": lambda k: (k - 273.15) * 1.8 + 32, "fahrenheit": lambda k: (k - 273.15) * 1.8 + 32}  # fmt: skip
MAX_RANDOM_BOUND = 10**18


def convert_units(value: float, from_unit: str, to_unit: str) -> float:
    source, target = from_unit.strip().lower(), to_unit.strip().lower()
    if source in TO_KELVIN and target in FROM_KELVIN:
        return FROM_KELVIN[target](TO_KELVIN[source](value))
    if source not in UNITS or target not in UNITS or UNITS[source][0] != UNITS[target][0]:
        raise ValueError(f"cannot convert {from_unit!r} to {to_unit!r}")
    return value * UNITS[source][1] / UNITS[target][1]


def _finite_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("value must be a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError("value must be a finite number")
    return number


def _current_time(args: dict) -> str:
    timezone = args.get("timezone") or "Asia/Shanghai"
    try:
        zone = zoneinfo.ZoneInfo(str(timezone))
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone: {timezone}") from None
    return datetime.datetime.now(zone).strftime("%Y-%m-%d %H:%M:%S")


def _random_number(args: dict) -> int:
    low, high = args.get("min"), args.get("max")
    if not all(isinstance(x, int) and not isinstance(x, bool) and abs(x) <= MAX_RANDOM_BOUND for x in (low, high)):
        raise ValueError(f"min and max must be integers within ±{MAX_RANDOM_BOUND}")
    if low > high:
        raise ValueError("min is larger than max")
    return random.randint(low, high)


DEMO_RESULTS = {
    "calculate_math": lambda args: calculate(str(args.get("expression", "0"))),
    "get_current_time": _current_time,
    "random_number": _random_number,
    "text_length": lambda args: len(str(args.get("text", ""))),
    "unit_converter": lambda args: round(convert_units(_finite_number(args.get("value", 0)),
                                                       str(args.get("from_unit", "")), str(args.get("to_unit", ""))), 6),
    "get_current_weather": lambda args: f"{args.get('city', 'Unknown')}: 晴, 7~10°C",
    "get_exchange_rate": lambda args: f"1 {args.get('from_currency', 'USD')} = 7.2 {args.get('to_currency', 'CNY')}",
    "translate_text": lambda args: "[翻译结果]: hello world",
}  # fmt: skip


def run_demo_tool(name: Any, arguments: Any) -> str:
    """A tool turn's content for one call of a web_demo tool: the JSON of {"result": ...}, or of {"error": ...}
    when the tool is unknown, its arguments are not an object (or a JSON string of one), or it fails."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments or "{}")
        except ValueError:
            arguments = None
    if not isinstance(name, str) or name not in DEMO_RESULTS:
        result = {"error": f"unknown tool: {name}"}
    elif not isinstance(arguments, dict):
        result = {"error": "the arguments must be a JSON object"}
    else:
        try:
            result = {"result": DEMO_RESULTS[name](arguments)}
        except (ArithmeticError, ValueError, TypeError, RecursionError) as error:
            result = {"error": str(error) or type(error).__name__}
    return json.dumps(result, ensure_ascii=False)
