"""Rewards: MiniMind's rule rewards per era, a Hugging Face reward model, and a user's reward function.

Every reward is one float per completion. Sums are taken in float32 in MiniMind's order (its rewards live
in a float32 torch tensor that each rule adds into), so a run and MiniMind's agree to the last bit.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from minimind_jax.errors import UserError, first_line

SCORE_LIMIT = 3.0  # MiniMind clips every reward-model score to ±3
CHAT_TURN = re.compile(r"<\|im_start\|>(system|user|assistant)\s+(.*?)<\|im_end\|>", re.DOTALL)
REASONING_FORMATS = (
    re.compile(r"^<think>\n.*?\n</think>\n<answer>\n.*?\n</answer>$", re.S),
    re.compile(r"^<think>\n.*?\n</think>\n\n<answer>\n.*?\n</answer>$", re.S),
)
REASONING_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def repetition_penalty(text: str, n: int = 3, cap: float = 0.5) -> float:
    """v3's rep_penalty: the share of repeated word n-grams, capped. Words are runs of Unicode \\w (so a run of
    Chinese characters is one word) or single other non-space characters."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return min(cap, (len(grams) - len(set(grams))) * cap * 2 / len(grams)) if grams else 0.0


def reasoning_rule_rewards(responses: Sequence[str]) -> np.ndarray:
    """2510's --reasoning 1 rules: 0.5 for the exact <think>/<answer> format, and 0.25 for each of the four
    tags that occurs exactly once."""
    rewards = np.zeros(len(responses), np.float32)
    rewards += np.asarray([0.5 if any(p.match(r) for p in REASONING_FORMATS) else 0.0 for r in responses], np.float32)
    rewards += np.asarray([sum(0.25 for tag in REASONING_TAGS if r.count(tag) == 1) for r in responses], np.float32)
    return rewards


def v3_rule_reward(response: str) -> tuple[np.float32, str]:
    """v3's rules for one completion: (the rule reward, the answer the reward model scores). Length of the
    reply, then of the thinking and the count of </think> when there is one, then the repetition penalty of
    the answer; each step rounded to float32 as MiniMind's tensor does."""
    reward = np.float32(0.5 if 20 <= len(response.strip()) <= 800 else -0.5)
    answer = response
    if "</think>" in response:
        thinking, after = response.split("</think>", 1)
        reward = np.float32(reward + np.float32(1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5))
        reward = np.float32(reward + np.float32(0.25 if response.count("</think>") == 1 else -0.25))
        answer = after.strip()
    return np.float32(reward - np.float32(repetition_penalty(answer))), answer


def chat_messages(prompt: str) -> list[dict[str, str]]:
    """The turns of a rendered prompt, as MiniMind's reward code parses them back out of the string."""
    return [{"role": role, "content": content.strip()} for role, content in CHAT_TURN.findall(prompt)]


def v3_reward_model_chat(messages: list[dict], answer: str) -> list[dict]:
    """v3's LMForRewardModel: the history flattened into one user turn, then the answer."""
    history = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:-1])
    last = messages[-1]["content"] if messages else ""
    context = f"{history}\n以上是对话历史。我的新问题是：\n{last}" if history else last
    return [{"role": "user", "content": context}, {"role": "assistant", "content": answer}]


class RewardModel:
    """A local Hugging Face reward model: AutoModelForSequenceClassification with one label, or, with
    trust_remote_code, a model of its own code that has `get_score(tokenizer, chat)` (InternLM2-Reward, which
    MiniMind uses). Scores are clipped to ±3, as MiniMind clips them."""

    def __init__(self, path: str, trust_remote_code: bool = False):
        try:
            import torch
            import transformers
        except ImportError:
            raise UserError(
                f"--reward_model_path {path}: needs torch and transformers (pip install 'minimind-jax[reward_model]')"
            ) from None
        self.torch = torch
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
            loader = transformers.AutoModel if trust_remote_code else transformers.AutoModelForSequenceClassification
            self.model = loader.from_pretrained(path, trust_remote_code=trust_remote_code).eval()
        except (OSError, ValueError) as error:
            hint = (
                " (a model with its own code needs --trust_remote_code 1)" if "trust_remote_code" in str(error) else ""
            )
            raise UserError(
                f"--reward_model_path {path}: cannot load a reward model: {first_line(error)}{hint}"
            ) from None
        if not hasattr(self.model, "get_score") and getattr(self.model.config, "num_labels", 1) != 1:
            raise UserError(f"--reward_model_path {path}: a reward model has one label, this one has "
                            f"{self.model.config.num_labels}")  # fmt: skip

    def score(self, chat: list[dict]) -> float:
        with self.torch.no_grad():
            if hasattr(self.model, "get_score"):
                value = float(self.model.get_score(self.tokenizer, chat))
            else:
                encoded = self.tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True, return_tensors="pt")
                value = float(self.model(**encoded).logits[0, 0])
        return max(min(value, SCORE_LIMIT), -SCORE_LIMIT)


def reward_model_score_2510(model: RewardModel, prompt: str, response: str, reasoning: bool) -> float:
    """2510: the whole reply scored after the prompt's turns; with --reasoning 1 and an <answer> part, 0.4 of
    that and 0.6 of the answer alone's score."""
    messages = chat_messages(prompt)
    score = model.score(messages + [{"role": "assistant", "content": response}])
    found = ANSWER.search(response) if reasoning else None
    if found:
        answer_score = model.score(messages + [{"role": "assistant", "content": found.group(1).strip()}])
        score = score * 0.4 + answer_score * 0.6
    return score


def era_rewards(arch: str, prompts: Sequence[str], responses: Sequence[str], num_generations: int, *,
                reasoning: bool = False, reward_model: RewardModel | None = None) -> np.ndarray:  # fmt: skip
    """MiniMind's calculate_rewards: prompt i's completions are responses[i*G : (i+1)*G]. [B·G] float32."""
    if arch == "minimind2":
        rules = reasoning_rule_rewards(responses) if reasoning else np.zeros(len(responses), np.float32)
        if reward_model is None:
            return rules
        scores = [reward_model_score_2510(reward_model, prompts[i // num_generations], r, reasoning)
                  for i, r in enumerate(responses)]  # fmt: skip
        return rules + np.asarray(scores, np.float32)
    rules, scores = np.zeros(len(responses), np.float32), np.zeros(len(responses), np.float32)
    for i, response in enumerate(responses):
        rules[i], answer = v3_rule_reward(response)
        if reward_model is not None:
            scores[i] = reward_model.score(v3_reward_model_chat(chat_messages(prompts[i // num_generations]), answer))
    return rules + scores


def load_reward_fn(spec: str) -> Callable:
    """--reward_fn module:function, imported (the module from the working directory or the Python path)."""
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise UserError(f"--reward_fn {spec}: give module:function, e.g. my_rewards:score")
    here = os.getcwd()  # a module beside the command, as `python -m` finds it
    sys.path.insert(0, here)
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError, SyntaxError) as error:
        raise UserError(f"--reward_fn {spec}: cannot import it: {first_line(error)}") from None
    finally:
        sys.path.remove(here)
    if not callable(function):
        raise UserError(f"--reward_fn {spec}: {function_name} is not callable")
    function.spec = spec
    return function


def call_reward_fn(function: Callable, prompts: list[str], completions: list[str], first_row: int,
                   **record_fields: Any) -> np.ndarray:  # fmt: skip
    """The user's rewards for these completions, checked: one finite float each. first_row: the batch's first
    row in the run's data (for messages)."""
    name = getattr(function, "spec", getattr(function, "__name__", "reward_fn"))
    rows = f"the batch's prompts start at data row {first_row}"
    try:
        values = function(prompts, completions, **record_fields)
    except Exception as error:  # the user's code: whatever it raises is reported in one line
        raise UserError(f"--reward_fn {name} raised {type(error).__name__}: {first_line(error)} ({rows})") from None
    try:
        rewards = np.asarray(values, np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise UserError(f"--reward_fn {name} returned {type(values).__name__}, not one float per completion "
                        f"({rows})") from None  # fmt: skip
    if len(rewards) != len(completions):
        raise UserError(f"--reward_fn {name} returned {len(rewards)} rewards for {len(completions)} completions "
                        f"({rows})")  # fmt: skip
    bad = [i for i, value in enumerate(rewards) if not math.isfinite(value)]
    if bad:
        raise UserError(f"--reward_fn {name} returned {rewards[bad[0]]} for completion {bad[0]} of the batch "
                        f"({rows}): rewards must be finite")  # fmt: skip
    return rewards.astype(np.float32)
