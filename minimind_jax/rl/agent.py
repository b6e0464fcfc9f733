"""v3's agentic RL (train_agent.py): multi-turn rollouts with tool calls, their rewards, and the rows of the
one sharded step (CISPO or GRPO over whole trajectories, PolicyLoss).

Data: `agent_rl*.jsonl`, {"conversations": [system (with "tools": a JSON list), user, …, last turn], "gt":
[the answers a good trajectory states]}; the last turn is dropped, as AgentRLDataset drops it. A replay
record (`--rollouts`) is such a record with "completions": G trajectories, each a list of its turns' ids
(each turn up to and including its eos, or max_gen_len ids without one) and optionally "rewards".

A trajectory, as rollout_single runs it, for up to 3 turns: the messages are rendered with the tools (thinking
open with probability thinking_ratio, drawn once per trajectory) and continued by the policy; the turn's ids
but eos and pad join the response (trained on), its text the messages; without a tool call it ends, else
every call runs (rl/tools.py), the results join the messages as tool turns, and the ids the re-rendered
conversation adds beyond what the trajectory holds join the response untrained (the template's end of turn,
the tool turns, the next generation prompt). A third turn that still calls tools leaves it unfinished. The
old log-probs of each turn come from the policy on that turn's own context, as MiniMind's rollout engine
computes them. Rows are the prompt then the response, the last max_total_len ids, right-padded.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from typing import Any

import numpy as np
from flax import nnx

from minimind_jax.data.records import BadRecord, SkipReport, check_data_file, decode_line, iter_lines, read_jsonl
from minimind_jax.data.tokenizer import Tokenizer
from minimind_jax.errors import UserError
from minimind_jax.inference.generation import bucket_length, generate
from minimind_jax.rl.algorithms import group_advantages
from minimind_jax.rl.data import PromptRecord
from minimind_jax.rl.rewards import RewardModel, call_reward_fn, chat_messages, repetition_penalty, v3_reward_model_chat
from minimind_jax.rl.rollout import ERA_SAMPLING, PromptBatches, layout_rows, make_old_log_probs, on_mesh
from minimind_jax.rl.tools import call_parts, is_valid_call, observation, parse_tool_calls

MAX_TURNS = 3
NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w.])")
WHOLE_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def _agent_fields(record: dict) -> tuple[list[dict], list | None, list]:
    """(the messages but the last turn, the tools of the system turn, gt); raises BadRecord."""
    conversations = record["conversations"] if "conversations" in record else record.get("messages")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise BadRecord("'conversations' needs a prompt turn and the last turn")
    tools = None
    for message in conversations:
        if message.get("role") == "system" and message.get("tools"):
            tools = message["tools"]
            if isinstance(tools, str):
                try:
                    tools = json.loads(tools)
                except ValueError:
                    raise BadRecord("the system turn's 'tools' is not JSON") from None
    if tools is not None and not (isinstance(tools, list) and all(
            isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)
            for t in tools)):  # fmt: skip
        raise BadRecord('\'tools\' must be a list of {"function": {"name": …}} objects')
    gt = record.get("gt")
    if not isinstance(gt, list) or not all(isinstance(g, (str, int, float)) and not isinstance(g, bool) for g in gt):
        raise BadRecord("'gt' must be a list of answers (strings or numbers)")
    return conversations[:-1], tools, gt


def load_agent_prompts(path: str, *, strict: bool = False) -> list[PromptRecord]:
    """The records of an agent_rl jsonl; malformed lines are skipped and counted (strict: an error)."""
    check_data_file(path)
    report, records = SkipReport(str(path)), []
    for line_no, record in read_jsonl(path, kind="sft", strict=strict, report=report):
        try:
            messages, tools, gt = _agent_fields(record)
        except BadRecord as bad:
            if strict:
                raise UserError(f"{path}:{line_no}: {bad}") from None
            report.add(line_no, bad.reason, malformed=True)
            continue
        fields = {k: v for k, v in record.items() if k not in ("conversations", "messages", "gt")}
        records.append(PromptRecord(line_no, messages=tuple(messages), fields={**fields, "gt": gt, "tools": tools}))
    report.warn()
    if not records:
        raise UserError(f"{path}: no usable record ({report.summary() if report.num_skipped else 'the file is empty'})")
    return records


def load_agent_replay(path: str, *, num_generations: int, max_gen_len: int, vocab_size: int,
                      eos_id: int) -> list[PromptRecord]:  # fmt: skip
    """The records of an agent replay file, every line checked before anything runs."""
    check_data_file(path)
    records = []
    for line_no, line in iter_lines(path):
        try:
            record = decode_line(line)
            messages, tools, gt = _agent_fields(record)
            trajectories = record.get("completions")
            if not isinstance(trajectories, list) or len(trajectories) != num_generations:
                found = len(trajectories) if isinstance(trajectories, list) else "no list of"
                raise BadRecord(f"{found} trajectories; --num_generations {num_generations} needs {num_generations}")
            for index, turns in enumerate(trajectories):
                if not isinstance(turns, list) or not 1 <= len(turns) <= MAX_TURNS:
                    raise BadRecord(f"trajectory {index} is not a list of 1 to {MAX_TURNS} turns of ids")
                for turn, ids in enumerate(turns):
                    _check_turn(ids, f"trajectory {index} turn {turn}", max_gen_len, vocab_size, eos_id)
            rewards = record.get("rewards")
            if rewards is not None and not (isinstance(rewards, list) and len(rewards) == num_generations and all(
                    isinstance(r, (int, float)) and not isinstance(r, bool) and np.isfinite(r) for r in rewards)):  # fmt: skip
                raise BadRecord(f"'rewards' must be {num_generations} finite numbers")
        except BadRecord as bad:
            raise UserError(f"{path}:{line_no}: {bad}") from None
        fields = {
            k: v for k, v in record.items() if k not in ("conversations", "messages", "gt", "completions", "rewards")
        }
        records.append(PromptRecord(line_no, messages=tuple(messages), fields={**fields, "gt": gt, "tools": tools},
                                    completions=tuple(tuple(map(tuple, turns)) for turns in trajectories),
                                    rewards=None if rewards is None else tuple(map(float, rewards))))  # fmt: skip
    if not records:
        raise UserError(f"{path}: no replay record (the file is empty)")
    return records


def _check_turn(ids: Any, what: str, max_gen_len: int, vocab_size: int, eos_id: int) -> None:
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise BadRecord(f"{what} is not a non-empty list of token ids")
    outside = [i for i in ids if not 0 <= i < vocab_size]
    if outside:
        raise BadRecord(f"{what} holds id {outside[0]}, outside the vocabulary (0..{vocab_size - 1})")
    if len(ids) > max_gen_len or (ids[-1] != eos_id and len(ids) != max_gen_len) or eos_id in ids[:-1]:
        raise BadRecord(f"{what}: a turn ends at its first eos ({eos_id}), or has exactly --max_gen_len "
                        f"{max_gen_len} ids without one")  # fmt: skip


def answers_in_text(text: str, answers: list) -> set:
    """The gt answers a text states (validate_gt_in_text): as a case-blind substring, or, for a number, any
    number in the text within 1e-6 of it (thousands commas ignored)."""
    numbers = [float(x) for x in NUMBER.findall(str(text).replace(",", ""))]
    found = set()
    for answer in answers:
        written = str(answer).strip()
        plain = written.replace(",", "")
        if (written and written.lower() in str(text).lower()) or (
                WHOLE_NUMBER.fullmatch(plain) and any(abs(float(plain) - n) < 1e-6 for n in numbers)):  # fmt: skip
            found.add(answer)
    return found


def agent_reward(turn_outputs: list[str], unfinished: bool, answers: list, tools: list | None, prompt: str,
                 reward_model: RewardModel | None) -> np.float32:  # fmt: skip
    """train_agent.py's calculate_rewards for one trajectory (a Python float, clipped to ±3, then float32).

    Each turn's answer is its text after </think>. Unbalanced <tool_call> tags cost 0.5 each. Without a tool
    call: ±0.5 for the last turn's length (5..800 characters), the thinking rules, the reward model's score of
    the answer, minus the repetition penalty. With calls: +0.5 when the valid calls match gt's count, else
    −0.5 per call off; 2.5 × the share of gt stated after the last </tool_call> of a finished trajectory;
    −0.5 when unfinished; minus the repetition penalty."""
    response = turn_outputs[-1]
    turn_answers = [t.split("</think>", 1)[-1].strip() if "</think>" in t else t.strip() for t in turn_outputs]
    answer = turn_answers[-1]
    calls = [call for turn in turn_answers for call in parse_tool_calls(turn)]
    reward = -0.5 * sum(abs(t.count("<tool_call>") - t.count("</tool_call>")) for t in turn_answers)
    if not calls:
        reward += 0.5 if 5 <= len(response.strip()) <= 800 else -0.5
        if "</think>" in response:
            thinking, answer = response.split("</think>", 1)
            reward += 1.0 if 20 <= len(thinking.strip()) <= 300 else -0.5
            reward += 0.25 if response.count("</think>") == 1 else -0.25
            answer = answer.strip()
        if reward_model is not None:
            reward += reward_model.score(v3_reward_model_chat(chat_messages(prompt), answer))
        reward -= repetition_penalty(answer)
    else:
        names = {t["function"]["name"] for t in tools} if tools else set()
        valid = sum(is_valid_call(*call_parts(call), names) for call in calls)
        gap = abs(valid - len(answers)) + max(0, len(calls) - valid)
        reward += 0.5 if gap == 0 else -0.5 * gap
        final_text = "" if unfinished else (answer.split("</tool_call>")[-1] if "</tool_call>" in answer else answer)
        if answers:
            reward += 2.5 * len(answers_in_text(final_text, answers)) / len(answers)
        if unfinished:
            reward -= 0.5
        reward -= repetition_penalty(final_text if final_text else answer)
    return np.float32(max(min(reward, 3.0), -3.0))


@dataclasses.dataclass
class Trajectory:
    messages: list[dict]
    tools: list | None
    open_thinking: bool
    replayed: tuple | None = None  # a replay's turns
    prompt_ids: list[int] | None = None
    response_ids: list[int] = dataclasses.field(default_factory=list)
    response_mask: list[int] = dataclasses.field(default_factory=list)
    response_log_probs: list[float] = dataclasses.field(default_factory=list)
    turn_outputs: list[str] = dataclasses.field(default_factory=list)
    unfinished: bool = False
    done: bool = False

    def context(self, tokenizer: Tokenizer, add_generation_prompt: bool = True) -> str:
        return tokenizer.apply_chat_template(self.messages, tools=self.tools, add_generation_prompt=add_generation_prompt,
                                             open_thinking=self.open_thinking)  # fmt: skip


class AgentRollouts:
    """The agent run's data, as RolloutBatches is GRPO's: `next_batch(params, seed)` rolls the next records'
    trajectories out (sampled with v3's sampling, or replayed from the file `replay`) and returns the step's
    rows with statistics."""

    def __init__(self, prompts: PromptBatches, graphdef: nnx.GraphDef, *, tokenizer: Tokenizer, replay: str | None,
                 num_generations: int, max_gen_len: int, max_total_len: int, thinking_ratio: float,
                 reward_model: RewardModel | None = None, reward_fn=None, sharding=None):  # fmt: skip
        self.prompts, self.graphdef, self.tokenizer, self.replay = prompts, graphdef, tokenizer, replay
        self.num_generations, self.max_gen_len, self.max_total_len = num_generations, max_gen_len, max_total_len
        self.thinking_ratio, self.reward_model, self.reward_fn = thinking_ratio, reward_model, reward_fn
        self.sharding = sharding
        self.num_rows = prompts.batch_size * num_generations
        self.turn_log_probs = make_old_log_probs(graphdef)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def step(self) -> int:
        return self.prompts.step

    @property
    def epoch(self) -> int:
        return self.prompts.epoch

    def get_state(self) -> dict:
        return self.prompts.get_state()

    def set_state(self, state: dict) -> None:
        self.prompts.set_state(state)

    def next_batch(self, params, seed: int, old_params=None) -> tuple[dict, dict]:
        """(the micro-batch, its statistics) of the next records' trajectories, rolled out with `params` (the
        old log-probs are theirs: old_params, 2510 PPO's, has no use here)."""
        epoch, indices = self.prompts.next_batch()
        records = [self.prompts.records[i] for i in indices]
        trajectories = []
        for i, record in enumerate(records):
            rng = np.random.default_rng([self.prompts.seed, epoch, indices[i]])
            for g in range(self.num_generations):
                trajectories.append(Trajectory([dict(m) for m in record.messages], record.fields["tools"],
                                               bool(rng.random() < self.thinking_ratio),
                                               record.completions[g] if self.replay else None))  # fmt: skip
        started, log_probs_s = time.perf_counter(), 0.0
        for turn in range(MAX_TURNS):
            active = [t for t in trajectories if not t.done]
            if not active:
                break
            log_probs_s += self._turn(params, active, turn, seed + turn)
        for index, t in enumerate(trajectories):
            if t.replayed is not None and len(t.replayed) != len(t.turn_outputs):
                line = records[index // self.num_generations].line
                raise UserError(f"{self.replay}:{line}: trajectory {index % self.num_generations} records "
                                f"{len(t.replayed)} turns, but its tool calls end it after {len(t.turn_outputs)}")  # fmt: skip
        rollout_s = time.perf_counter() - started - log_probs_s
        prompts = [self.tokenizer.apply_chat_template(list(r.messages), tools=r.fields["tools"],
                                                      add_generation_prompt=True) for r in records]  # fmt: skip
        rewards = self.rewards_for(records, prompts, trajectories)
        rows, token_counts = self._rows(trajectories)
        num_real = len(trajectories)
        advantages = np.zeros(self.num_rows, np.float32)
        advantages[:num_real] = group_advantages(rewards, self.num_generations, "minimind3")
        rows.update(advantages=advantages, row_weight=np.zeros(self.num_rows, np.float32))
        rows["row_weight"][:num_real] = token_counts > 0  # MiniMind drops rows with no trained token
        grouped = rewards.reshape(-1, self.num_generations)
        stats = {
            "reward": float(rewards.mean(dtype=np.float32)),
            "group_reward_std": float(grouped.std(1, dtype=np.float32).mean(dtype=np.float32)),
            "advantages_mean": float(advantages[:num_real].mean(dtype=np.float32)),
            "advantages_std": float(advantages[:num_real].std(ddof=1, dtype=np.float32)) if num_real > 1 else 0.0,
            "avg_response_len": float(token_counts.mean()),
            "turns": float(np.mean([len(t.turn_outputs) for t in trajectories])),
            "rollout_tokens": int(rows["attention_mask"].sum()),
            "completions": num_real,
            "rollout_s": rollout_s,
            "log_probs_s": log_probs_s,
        }
        return on_mesh(rows, self.sharding), stats

    def _turn(self, params, active: list[Trajectory], turn: int, seed: int) -> float:
        """Runs one turn of every active trajectory; returns the seconds its old log-probs took."""
        tokenizer = self.tokenizer
        contexts = [t.context(tokenizer) for t in active]
        context_ids = [tokenizer.encode(text) for text in contexts]
        width = max(map(len, context_ids))
        prompt_ids = np.full((self.num_rows, width), tokenizer.pad_id, np.int32)
        prompt_mask = np.zeros((self.num_rows, width), np.int32)
        for row in range(self.num_rows):  # the batch keeps its size (one compile); the fill repeats row 0
            ids = context_ids[row if row < len(active) else 0]
            prompt_ids[row, width - len(ids) :], prompt_mask[row, width - len(ids) :] = ids, 1
        if self.replay:
            completions = [list(t.replayed[turn]) if turn < len(t.replayed) else [tokenizer.eos_id] for t in active]
        else:
            temperature, top_k, top_p, _ = ERA_SAMPLING["minimind3"]
            out = generate(nnx.merge(self.graphdef, params), prompt_ids, self.max_gen_len, do_sample=True,
                           temperature=temperature, top_k=top_k, top_p=top_p, attention_mask=prompt_mask,
                           eos_token_id=tokenizer.eos_id, seed=seed)[: len(active), width:]  # fmt: skip
            completions = []
            for row in out:
                ends = np.flatnonzero(row == tokenizer.eos_id)
                completions.append([int(i) for i in row[: ends[0] + 1 if len(ends) else len(row)]])
        started = time.perf_counter()
        filled = completions + [completions[0]] * (self.num_rows - len(active))
        rows = layout_rows(prompt_ids, filled, arch="minimind3", num_rows=self.num_rows, max_seq_len=bucket_length(width),
                           max_gen_len=self.max_gen_len, pad_id=tokenizer.pad_id, eos_id=tokenizer.eos_id,
                           mask_padding=True)  # fmt: skip
        # MiniMind runs each trajectory alone: its positions start at its first id, not at the batch's padding
        rows["positions"] -= np.argmax(rows["attention_mask"], axis=1)[:, None].astype(np.int32)
        log_probs = np.asarray(self.turn_log_probs(params, on_mesh(rows, self.sharding)))
        seconds = time.perf_counter() - started
        for row, (t, ids, new_ids) in enumerate(zip(active, context_ids, completions)):
            if t.prompt_ids is None:
                t.prompt_ids = ids
            kept = [k for k, token in enumerate(new_ids) if token not in (tokenizer.pad_id, tokenizer.eos_id)]
            text = tokenizer.decode(new_ids, skip_special_tokens=True)
            t.turn_outputs.append(text)
            t.response_ids += [new_ids[k] for k in kept]
            t.response_mask += [1] * len(kept)
            t.response_log_probs += [float(log_probs[row, k]) for k in kept]
            calls = parse_tool_calls(text)
            if not calls:
                t.done = True
                continue
            t.unfinished = t.done = turn == MAX_TURNS - 1
            t.messages.append({"role": "assistant", "content": text})
            t.messages.extend({"role": "tool", "content": observation(*call_parts(call))} for call in calls)
            observed = tokenizer.encode(t.context(tokenizer, add_generation_prompt=not t.unfinished))
            added = observed[len(t.prompt_ids) + len(t.response_ids) :]
            t.response_ids += added
            t.response_mask += [0] * len(added)
            t.response_log_probs += [0.0] * len(added)
        return seconds

    def rewards_for(
        self, records: list[PromptRecord], prompts: list[str], trajectories: list[Trajectory]
    ) -> np.ndarray:
        generations = self.num_generations
        if all(r.rewards is not None for r in records):
            return np.asarray([x for r in records for x in r.rewards], np.float32)
        if self.reward_fn is not None:
            fields = {key: [r.fields.get(key) for r in records for _ in range(generations)]
                      for key in sorted({k for r in records for k in r.fields})}  # fmt: skip
            return call_reward_fn(self.reward_fn, [p for p in prompts for _ in range(generations)],
                                  [t.turn_outputs[-1] for t in trajectories], records[0].line, **fields)  # fmt: skip
        return np.asarray([agent_reward(t.turn_outputs, t.unfinished, records[i // generations].fields["gt"],
                                        t.tools, prompts[i // generations], self.reward_model)
                           for i, t in enumerate(trajectories)], np.float32)  # fmt: skip

    def _rows(self, trajectories: list[Trajectory]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """The step's rows: each trajectory's prompt and response, its last max_total_len ids, right-padded;
        completion_mask and old_log_probs [N, L − 1] on the targets (ids 1..), as PolicyLoss reads a completion
        that starts after the first id."""
        packed = []
        for t in trajectories:
            ids = t.prompt_ids + t.response_ids
            mask = [0] * len(t.prompt_ids) + t.response_mask
            old = [0.0] * (len(t.prompt_ids) - 1) + t.response_log_probs
            if len(ids) > self.max_total_len:
                ids, mask, old = (
                    ids[-self.max_total_len :],
                    mask[-self.max_total_len :],
                    old[-(self.max_total_len - 1) :],
                )
            packed.append((ids, mask, old))
        width = max(min(bucket_length(max(len(ids) for ids, _, _ in packed)), self.max_total_len), 2)
        pad = self.tokenizer.pad_id
        sequences = np.full((self.num_rows, width), pad, np.int32)
        completion_mask = np.zeros((self.num_rows, width - 1), np.int32)
        old_log_probs = np.zeros((self.num_rows, width - 1), np.float32)
        for row, (ids, mask, old) in enumerate(packed):
            sequences[row, : len(ids)] = ids
            completion_mask[row, : len(ids) - 1] = mask[1:]
            old_log_probs[row, : len(old)] = old
        attention_mask = (sequences != pad).astype(np.int32)
        attention_mask[len(packed) :] = 0
        positions = np.broadcast_to(np.arange(width, dtype=np.int32), sequences.shape).copy()
        return ({"sequences": sequences, "attention_mask": attention_mask, "positions": positions,
                 "completion_mask": completion_mask, "old_log_probs": old_log_probs},
                completion_mask[: len(packed)].sum(1))  # fmt: skip
