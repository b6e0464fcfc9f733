"""`python main.py demo`: one command that trains a small chat model end to end on real text.

Stages, in order (settings from configs/demo.yaml; `--quick` applies its `quick:` overrides):
  corpus     MiniMind jsonl (pretrain, SFT, held-out) from the chatterbot-corpus and chitchat-dataset packages
  tokenizer  a 6400-token SentencePiece BPE trained on the pretrain text
  pretrain   a small MiniMind from random weights; the trainer writes out/pretrain_{hidden}.pth
  convert    that .pth -> our Orbax checkpoint with `main.py convert`, checked against the .pth and against
             the PyTorch reference loaded with strict=True
  sft        full SFT with the loss mask, started like MiniMind (`--from_weight pretrain`); writes
             out/full_sft_{hidden}.pth
  evaluate   masked loss on the held-out conversations: random init, after pretraining, after SFT
  lora       an identity adapter on the SFT model; the held-out identity loss before and after
  dpo        DPO on pairs built from the corpus; the held-out reward margin and accuracy before and after
  grpo       GRPO on the SFT model with a rule reward (a reply of about 12 characters); the held-out
             prompts' mean reward before and after, and per update
  chat       replies of the pretrained and the SFT model to Chinese and English prompts (`generate`)
  figures    both runs' loss curves in one picture, with the held-out losses

Everything goes under --out_dir. Each finished stage records its settings and results in
{out_dir}/stages/{name}.json; a later run reuses a stage whose settings and outputs are unchanged, and
redoes it and every stage after it otherwise. `--force` redoes them all.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pathlib
import shutil
import sys
import time
from collections.abc import Callable

import yaml

from minimind_jax.errors import UserError, first_line
from minimind_jax.model.config import CONFIG_DIR, weight_stem

DEFAULT_CONFIG = CONFIG_DIR / "demo.yaml"
CORPUS_KEYS = {"sources", "languages", "heldout_fraction", "seed", "max_turns", "max_conversations"}
MODEL_KEYS = {"arch", "hidden_size", "num_hidden_layers"}
CHAT_KEYS = {"prompts", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "seed"}
# TrainConfig fields the demo sets itself: paths, the model (from `model:`) and the starting weights.
DEMO_TRAIN_FIELDS = {
    "mode",
    "save_dir",
    "save_weight",
    "data_path",
    "from_weight",
    "from_resume",
    "tokenizer_path",
    "checkpoint_dir",
    "cache_dir",
    "mesh",
    "progress",
    "arch",
    "hidden_size",
    "num_hidden_layers",
    "use_moe",
    "eval_data_path",
}


def add_arguments(parser, command: str) -> None:
    parser.description = __doc__.splitlines()[0].split(": ", 1)[1]
    parser.add_argument("--out_dir", default="demo_out", help="where every output goes (default: demo_out/)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo settings (default: configs/demo.yaml)")
    parser.add_argument(
        "--quick", action="store_true", help="the short version (a couple of minutes): the config's quick: overrides"
    )
    parser.add_argument("--force", action="store_true", help="redo every stage, even those finished earlier")
    parser.add_argument("--mesh", default=None, help="device mesh for training, e.g. data=2,fsdp=2,tensor=2")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")


# ---------------------------------------------------------------------------------------------------------
# Settings


def _merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values or {})
    return merged


def load_settings(path, quick: bool = False) -> dict[str, dict]:
    """The demo.yaml sections (with `quick:` merged in when asked), every key checked."""
    from minimind_jax.training.config import TrainConfig

    path = pathlib.Path(path)
    try:
        raw = yaml.safe_load(path.read_text("utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UserError(f"{path}: cannot read demo settings ({first_line(error)})") from None
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)} - DEMO_TRAIN_FIELDS
    allowed = {
        "corpus": CORPUS_KEYS,
        "tokenizer": {"vocab_size", "character_coverage"},
        "model": MODEL_KEYS,
        "pretrain": train_keys,
        "sft": train_keys,
        "lora": train_keys - {"lora_name", "from_lora"},
        "dpo": train_keys,
        "grpo": train_keys - {"reward_fn", "rollouts"},
        "eval": {"batch_size"},
        "chat": CHAT_KEYS,
    }
    quick_overrides = raw.pop("quick", None) or {}
    for where, sections in (("", raw), ("quick.", quick_overrides)):
        for section, values in sections.items():
            if section not in allowed:
                raise UserError(f"{path}: unknown section {where}{section} (expected {', '.join(allowed)})")
            if not isinstance(values, dict):
                raise UserError(f"{path}: {where}{section} must be a mapping of settings")
            for key in values:
                if key not in allowed[section]:
                    raise UserError(f"{path}: unknown setting {where}{section}.{key}")
    settings = _merge({section: {} for section in allowed}, raw)
    if quick:
        settings = _merge(settings, quick_overrides)
    if not settings["chat"].get("prompts"):
        raise UserError(f"{path}: chat.prompts must list at least one prompt")
    return settings


# ---------------------------------------------------------------------------------------------------------
# The run: paths, settings and results of earlier stages


class DemoRun:
    """Paths under out_dir, the settings, and the results of the stages run (or reused) so far."""

    def __init__(self, settings: dict[str, dict], out_dir, mesh: str | None = None, progress: bool = True):
        self.settings = settings
        self.out_dir = pathlib.Path(out_dir)
        self.mesh = mesh
        self.progress = progress
        self.results: dict[str, dict] = {}
        self.corpus_dir = self.out_dir / "corpus"
        self.tokenizer_file = self.out_dir / "tokenizer" / "demo.model"
        self.weights_dir = self.out_dir / "out"  # MiniMind's --save_dir
        self.checkpoint_dir = self.out_dir / "checkpoints"
        self.cache_dir = self.out_dir / "cache"
        self.stage_dir = self.out_dir / "stages"
        self.hidden_size = settings["model"].get("hidden_size", 512)

    def weights(self, mode: str) -> pathlib.Path:
        """MiniMind's {save_dir}/{weight}_{hidden}.pth."""
        weight = "pretrain" if mode == "pretrain" else "full_sft"
        return self.weights_dir / f"{weight_stem(weight, self.hidden_size, use_moe=False)}.pth"

    def train_config(self, mode: str, **changes):
        """The demo's run of `mode` (its settings section): pretraining from random weights and SFT from the
        pretrained ones as MiniMind names them; `changes` give the other commands their data and weights."""
        from minimind_jax.training.config import TrainConfig

        fields = dict(
            mode=mode,
            save_dir=str(self.weights_dir),
            save_weight="pretrain" if mode == "pretrain" else "full_sft",
            data_path=str(self.corpus_dir / ("pretrain.jsonl" if mode == "pretrain" else "sft.jsonl")),
            from_weight="none" if mode == "pretrain" else "pretrain",  # MiniMind's {save_dir}/pretrain_{hidden}.pth
            tokenizer_path=str(self.tokenizer_file),
            checkpoint_dir=str(self.checkpoint_dir),
            cache_dir=str(self.cache_dir),
            mesh=self.mesh,
            progress=self.progress,
            **self.settings["model"],
            **self.settings[mode],
        )
        return TrainConfig(**{**fields, **changes})

    def fresh_run(self, cfg) -> dict:
        """The command's training from the start (not resuming a run of an earlier demo); its summary."""
        from minimind_jax.rl.run import train as train_rl
        from minimind_jax.training.config import RL_MODES
        from minimind_jax.training.run import train

        train = train_rl if cfg.mode in RL_MODES else train
        shutil.rmtree(pathlib.Path(cfg.checkpoint_dir) / cfg.run_name, ignore_errors=True)
        return train(cfg)


# ---------------------------------------------------------------------------------------------------------
# Stages


def corpus_stage(run: DemoRun) -> dict:
    from minimind_jax.data.corpus import build_corpus

    paths = build_corpus(run.corpus_dir, **run.settings["corpus"])
    # The held-out conversations as pretraining text, joined as build_corpus joins the training ones.
    heldout_text = run.corpus_dir / "pretrain_heldout.jsonl"
    with paths["sft_heldout"].open(encoding="utf-8") as source, heldout_text.open("w", encoding="utf-8") as target:
        for line in source:
            turns = json.loads(line)["conversations"]
            target.write(json.dumps({"text": "\n".join(t["content"] for t in turns)}, ensure_ascii=False) + "\n")
    stats = json.loads(paths["stats"].read_text("utf-8"))
    files = {name: str(path) for name, path in paths.items()} | {"pretrain_heldout": str(heldout_text)}
    return {
        "files": files,
        "records": {name: info["records"] for name, info in stats["files"].items()},
        "sources": stats["sources"],
        "outputs": list(files.values()),
    }


def tokenizer_stage(run: DemoRun) -> dict:
    from minimind_jax.data.tokenizer import load_tokenizer, train_sentencepiece

    prefix = run.tokenizer_file.with_suffix("")
    model_file = train_sentencepiece([run.corpus_dir / "pretrain.jsonl"], prefix, **run.settings["tokenizer"])
    tokenizer = load_tokenizer(model_file)
    sample = "你好吗? How are you?"
    return {
        "model_file": str(model_file),
        "vocab_size": tokenizer.vocab_size,
        "sample": {"text": sample, "tokens": len(tokenizer.encode(sample))},
        "outputs": [str(model_file)],
    }


def _train_stage(run: DemoRun, mode: str) -> dict:
    cfg = run.train_config(mode)
    summary = run.fresh_run(cfg)
    log_dir = run.weights_dir / "logs" / cfg.run_name
    return {
        "weights": summary["weights"],
        "updates": summary["updates"],
        "final_loss": summary.get("final_loss"),
        "tokens_per_s": summary.get("tokens_per_s"),
        "compile_s": summary["compile_s"],
        "metrics": str(log_dir / "metrics.jsonl"),
        "loss_curve": str(log_dir / "loss_curve.png"),
        "outputs": [summary["weights"], str(log_dir / "metrics.jsonl")],
    }


def pretrain_stage(run: DemoRun) -> dict:
    return _train_stage(run, "pretrain")


def sft_stage(run: DemoRun) -> dict:
    return _train_stage(run, "sft")


def _max_abs_diff(a, b) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def convert_stage(run: DemoRun) -> dict:
    """pretrain_{hidden}.pth -> our checkpoint via the convert CLI; all three readings give the same logits."""
    import numpy as np
    import torch

    from minimind_jax.bench.torch_reference import MiniMindTorch
    from minimind_jax.cli import convert as convert_cli
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.weights import load

    pth = run.weights("pretrain")
    checkpoint = run.out_dir / "converted" / pth.stem
    shutil.rmtree(checkpoint, ignore_errors=True)
    if convert_cli.main([str(pth), str(checkpoint)]) != 0:
        raise UserError(f"converting {pth} to {checkpoint} failed (see the error above)")

    tokenizer = load_tokenizer(run.tokenizer_file)
    ids_1T = np.asarray([tokenizer.encode("What is AI? 什么是经济学")], np.int32)
    from_pth, from_checkpoint = load(pth), load(checkpoint)
    logits_pth = np.asarray(from_pth(ids_1T))
    reference = MiniMindTorch(from_pth.config)
    state_dict = torch.load(pth, map_location="cpu", weights_only=True)
    reference.load_state_dict(state_dict, strict=True)  # every key of MiniMind's layout, nothing missing or extra
    with torch.no_grad():
        logits_torch = reference(torch.from_numpy(ids_1T).long()).logits.numpy()
    return {
        "checkpoint": str(checkpoint),
        "state_dict_keys": len(state_dict),
        "max_abs_diff_checkpoint_vs_pth": _max_abs_diff(np.asarray(from_checkpoint(ids_1T)), logits_pth),
        "max_abs_diff_torch_vs_jax": _max_abs_diff(logits_torch, logits_pth),
        "outputs": [str(checkpoint)],
    }


def evaluate_stage(run: DemoRun) -> dict:
    """Masked held-out loss, Σ(ce·mask)/Σmask as training computes it, before and after each training run."""
    from flax import nnx

    from minimind_jax.data.pipeline import make_batches
    from minimind_jax.training.evaluation import evaluate, make_loss_sums
    from minimind_jax.training.run import build_model, load_run_data, step_settings
    from minimind_jax.weights import load, params_of

    pretrain_cfg, sft_cfg = run.train_config("pretrain"), run.train_config("sft")
    # the exact initial weights of the pretrain run
    random_init = build_model(pretrain_cfg, "float32", step_settings(pretrain_cfg, "float32"))
    pretrained, finetuned = load(run.weights("pretrain")), load(run.weights("sft"))
    graphdef, _ = nnx.split(random_init, nnx.Param)
    eval_sums = make_loss_sums(graphdef)  # one compiled program per batch shape, shared by the three models
    batch_size = run.settings["eval"].get("batch_size", sft_cfg.batch_size)

    def heldout_loss(cfg, data_path, model) -> dict:
        dataset = load_run_data(cfg, str(data_path), model.config)
        batches = make_batches(
            dataset, batch_size=batch_size, seed=0, packing=True, shuffle=False, drop_remainder=False
        )
        try:
            return evaluate(eval_sums, params_of(model), batches)
        finally:
            batches.close()

    text, chats = run.corpus_dir / "pretrain_heldout.jsonl", run.corpus_dir / "sft_heldout.jsonl"
    return {
        "pretrain_text": {
            "data": str(text),
            "before": heldout_loss(pretrain_cfg, text, random_init),
            "after": heldout_loss(pretrain_cfg, text, pretrained),
        },
        "sft_assistant_tokens": {
            "data": str(chats),
            "before": heldout_loss(sft_cfg, chats, pretrained),
            "after": heldout_loss(sft_cfg, chats, finetuned),
        },
        "outputs": [],
    }


def dpo_stage(run: DemoRun) -> dict:
    """main.py dpo on the SFT model, with pairs built from the corpus; the held-out pairs' reward margin and
    accuracy (how often the real reply is preferred) before and after, against the SFT model as reference."""
    from flax import nnx

    from minimind_jax.data.corpus import write_preference_pairs
    from minimind_jax.data.preference import PairBatches
    from minimind_jax.training.evaluation import evaluate_preferences
    from minimind_jax.training.run import load_run_data, objective_for
    from minimind_jax.weights import load, params_of

    train_pairs, heldout_pairs = run.corpus_dir / "dpo.jsonl", run.corpus_dir / "dpo_heldout.jsonl"
    counts = {
        "train": write_preference_pairs(run.corpus_dir / "sft.jsonl", train_pairs),
        "heldout": write_preference_pairs(run.corpus_dir / "sft_heldout.jsonl", heldout_pairs),
    }
    cfg = run.train_config("dpo", save_weight="dpo", from_weight=str(run.weights("sft")), data_path=str(train_pairs))
    summary = run.fresh_run(cfg)
    reference = load(run.weights("sft"))
    heldout = load_run_data(cfg, str(heldout_pairs), reference.config)
    objective = objective_for(cfg, reference.config, {})
    graphdef, reference_params = nnx.graphdef(reference), params_of(reference)

    def scores(params) -> dict:
        batches = PairBatches(heldout, batch_size=cfg.batch_size, seed=0, shuffle=False)
        return evaluate_preferences(objective, graphdef, params, reference_params, batches)

    return {
        "weights": summary["weights"],
        "pairs": counts,
        "heldout": {"before": scores(reference_params), "after": scores(params_of(load(summary["weights"])))},
        "outputs": [summary["weights"], str(train_pairs), str(heldout_pairs)],
    }


DEMO_REPLY_CHARS = 12


def reply_length_reward(prompts: list[str], completions: list[str], **record_fields) -> list[float]:
    """The GRPO stage's rule reward, one a small model learns in a few updates: 1 for a reply of
    DEMO_REPLY_CHARS characters, falling by 1/48 per character away from it (the SFT model's replies are
    longer; an empty one scores 0.75)."""
    return [max(0.0, 1 - abs(len(text.strip()) - DEMO_REPLY_CHARS) / 48) for text in completions]


def grpo_stage(run: DemoRun) -> dict:
    """main.py grpo on the SFT model's replies to the corpus prompts, rewarded by reply_length_reward (a
    --reward_fn); the held-out prompts' mean reward before and after, and the reward per update."""
    from minimind_jax.rl.run import mean_reward

    sft_chats, heldout_chats = run.corpus_dir / "sft.jsonl", run.corpus_dir / "sft_heldout.jsonl"
    cfg = run.train_config("grpo", save_weight="grpo", from_weight=str(run.weights("sft")), data_path=str(sft_chats),
                           reward_fn=f"{__name__}:reply_length_reward")  # fmt: skip
    summary = run.fresh_run(cfg)
    curve = [record["reward"] for record in summary["history"]]
    figure = pathlib.Path(cfg.log_dir) / "reward_curve.png"
    _plot_rewards(figure, curve)
    return {
        "weights": summary["weights"],
        "updates": summary["updates"],
        "reward_curve": curve,
        "heldout_reward": {
            "before": mean_reward(cfg, run.weights("sft"), str(heldout_chats)),
            "after": mean_reward(cfg, summary["weights"], str(heldout_chats)),
        },
        "figure": str(figure),
        "outputs": [summary["weights"], str(figure)],
    }


def _plot_rewards(path: pathlib.Path, rewards: list[float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.plot(range(1, len(rewards) + 1), rewards, linewidth=1)
    axis.set(title="GRPO: mean reward of each update's rollouts", xlabel="optimizer update", ylabel="mean reward")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def chat_stage(run: DemoRun) -> dict:
    """Replies of both models to the same prompts, sampled with the same seed."""
    import numpy as np
    import tqdm

    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.inference.generation import generate
    from minimind_jax.weights import load

    chat = dict(run.settings["chat"])
    prompts = chat.pop("prompts")
    max_new_tokens = chat.pop("max_new_tokens", 64)
    tokenizer = load_tokenizer(run.tokenizer_file)
    encoded = [
        tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
        for p in prompts
    ]
    length = max(len(ids) for ids in encoded)
    ids_BT = np.full((len(encoded), length), tokenizer.pad_id, np.int32)  # left-padded, as MiniMind batches
    mask_BT = np.zeros_like(ids_BT)
    for row, ids in enumerate(encoded):
        ids_BT[row, length - len(ids) :] = ids
        mask_BT[row, length - len(ids) :] = 1

    replies = {}
    for mode in tqdm.tqdm(("pretrain", "sft"), desc="chat", unit="model", disable=not run.progress):
        out_BN = generate(
            load(run.weights(mode)),
            ids_BT,
            max_new_tokens,
            attention_mask=mask_BT,
            eos_token_id=tokenizer.eos_id,
            **chat,
        )[:, length:]
        texts = []
        for new_ids in out_BN.tolist():
            if tokenizer.eos_id in new_ids:
                new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
            texts.append(tokenizer.decode(new_ids, skip_special_tokens=True))
        replies[mode] = texts
    chats = [{"prompt": p, "pretrain": replies["pretrain"][i], "sft": replies["sft"][i]} for i, p in enumerate(prompts)]
    transcript = run.out_dir / "chats.md"
    lines = [f"# Chats (max {max_new_tokens} new tokens, sampling {chat})", ""]
    for turn in chats:
        lines += [
            f"💬 {turn['prompt']}",
            f"- pretrain_{run.hidden_size}: {turn['pretrain']!r}",
            f"- full_sft_{run.hidden_size}: {turn['sft']!r}",
            "",
        ]
    transcript.write_text("\n".join(lines), "utf-8")
    return {"chats": chats, "transcript": str(transcript), "outputs": [str(transcript)]}


# The identity the LoRA stage teaches: MiniMind's lora_identity data asks the model who it is.
IDENTITY = {
    "zh": ("我是MiniMind，一个用JAX训练的小语言模型。", ["你是谁?", "你叫什么名字?", "介绍一下你自己。", "你是什么模型?"],
           ["请问你是谁?", "你的名字是什么?"]),
    "en": ("I am MiniMind, a small language model trained with JAX.",
           ["Who are you?", "What is your name?", "Introduce yourself.", "What model are you?"],
           ["Tell me who you are.", "What should I call you?"]),
}  # fmt: skip


def _identity_records(split: int) -> list[dict]:
    """The identity chats: split 1 the training questions, 2 the held-out ones."""
    return [
        {"conversations": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
        for answer, *questions in IDENTITY.values()
        for question in questions[split - 1]
    ]


def lora_stage(run: DemoRun) -> dict:
    """An identity adapter on the SFT model (main.py lora): held-out identity loss and greedy replies before
    and after, the adapter merged into the weights (as `chat --lora` does)."""
    import numpy as np
    from flax import nnx

    from minimind_jax.data.pipeline import make_batches
    from minimind_jax.data.tokenizer import load_tokenizer
    from minimind_jax.inference.generation import generate
    from minimind_jax.training.evaluation import evaluate, make_loss_sums
    from minimind_jax.training.run import load_run_data
    from minimind_jax.weights import load, params_of
    from minimind_jax.weights.lora import load_lora, merge_adapters

    files = {}
    for split, name in ((1, "lora_identity.jsonl"), (2, "lora_identity_heldout.jsonl")):
        files[split] = run.corpus_dir / name
        records = _identity_records(split) * (8 if split == 1 else 1)  # a few epochs' worth per pass
        files[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")
    cfg = run.train_config(
        "lora", lora_name="lora_identity", from_weight=str(run.weights("sft")), data_path=str(files[1])
    )
    summary = run.fresh_run(cfg)
    base = load(run.weights("sft"))
    adapted = merge_adapters(load_lora(base, summary["weights"]))
    eval_sums = make_loss_sums(nnx.graphdef(base))
    heldout = load_run_data(cfg, str(files[2]), base.config)

    def heldout_loss(model) -> dict:
        batches = make_batches(heldout, batch_size=len(heldout), seed=0, shuffle=False, drop_remainder=False)
        try:
            return evaluate(eval_sums, params_of(model), batches)
        finally:
            batches.close()

    tokenizer = load_tokenizer(run.tokenizer_file)
    questions = [IDENTITY["zh"][2][0], IDENTITY["en"][2][0]]

    def greedy_reply(model, question: str) -> str:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
        ids = np.asarray([tokenizer.encode(prompt)], np.int32)
        new_ids = generate(model, ids, 24, eos_token_id=tokenizer.eos_id)[0, ids.shape[1] :].tolist()
        if tokenizer.eos_id in new_ids:
            new_ids = new_ids[: new_ids.index(tokenizer.eos_id)]
        return tokenizer.decode(new_ids, skip_special_tokens=True)

    return {
        "adapter": summary["weights"],
        "trainable_params": summary["trainable_params"],
        "params": summary["params"],
        "heldout_identity_loss": {"before": heldout_loss(base), "after": heldout_loss(adapted)},
        "replies": [
            {"prompt": q, "before": greedy_reply(base, q), "after": greedy_reply(adapted, q)} for q in questions
        ],
        "outputs": [summary["weights"]],
    }


def figures_stage(run: DemoRun) -> dict:
    from minimind_jax.training.metrics import LossPanel, plot_loss_curves

    losses = run.results["evaluate"]
    panels = []
    for mode, eval_name, title in (
        ("pretrain", "pretrain_text", "pretraining (all text tokens)"),
        ("sft", "sft_assistant_tokens", "SFT (assistant tokens only)"),
    ):
        metrics = pathlib.Path(run.results[mode]["metrics"])
        records = [json.loads(line) for line in metrics.read_text().splitlines()]
        before, after = losses[eval_name]["before"]["loss"], losses[eval_name]["after"]["loss"]
        label = f"held-out, before and after: {before:.2f} → {after:.2f}"
        panels.append(LossPanel(title, records, heldout=(label, [0, records[-1]["update"]], [before, after])))
    path = run.out_dir / "loss_curves.png"
    plot_loss_curves(
        path,
        panels,
        title=f"minimind-jax demo: MiniMind hidden {run.hidden_size}, "
        f"{run.settings['model'].get('num_hidden_layers')} layers, on chatterbot-corpus + chitchat-dataset",
    )
    return {"figure": str(path), "outputs": [str(path)]}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    title: str
    sections: tuple[str, ...]  # the settings it depends on
    run: Callable[[DemoRun], dict]


STAGES = (
    Stage("corpus", "build the corpus", ("corpus",), corpus_stage),
    Stage("tokenizer", "train the tokenizer", ("tokenizer",), tokenizer_stage),
    Stage("pretrain", "pretrain", ("model", "pretrain", "mesh"), pretrain_stage),
    Stage("convert", "convert .pth <-> checkpoint", (), convert_stage),
    Stage("sft", "full SFT", ("sft", "mesh"), sft_stage),
    Stage("evaluate", "held-out loss", ("eval",), evaluate_stage),
    Stage("lora", "LoRA identity adapter", ("lora", "mesh"), lora_stage),
    Stage("dpo", "DPO on pairs from the corpus", ("dpo", "mesh"), dpo_stage),
    Stage("grpo", "GRPO with a reply-length reward", ("grpo", "mesh"), grpo_stage),
    Stage("chat", "chat", ("chat",), chat_stage),
    Stage("figures", "loss curves", (), figures_stage),
)


# ---------------------------------------------------------------------------------------------------------
# Running the stages


def _stage_settings(run: DemoRun, stage: Stage) -> dict:
    return {section: run.mesh if section == "mesh" else run.settings[section] for section in stage.sections}


def run_stages(run: DemoRun, force: bool = False, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Runs (or reuses) every stage in order; returns {name: {"settings", "result", "seconds", "reused"}}."""
    import tqdm

    run.stage_dir.mkdir(parents=True, exist_ok=True)
    redo = force
    records = {}
    bar = tqdm.tqdm(total=len(STAGES), desc="demo", unit="stage", disable=not run.progress, dynamic_ncols=True)
    for number, stage in enumerate(STAGES, start=1):
        bar.set_description(f"demo [{stage.name}]")
        record_path = run.stage_dir / f"{stage.name}.json"
        settings = _stage_settings(run, stage)
        previous = json.loads(record_path.read_text("utf-8")) if record_path.exists() else None
        reusable = (
            not redo
            and previous is not None
            and previous["settings"] == settings
            and all(pathlib.Path(p).exists() for p in previous["result"]["outputs"])
        )
        if reusable:
            run.results[stage.name] = previous["result"]
            records[stage.name] = {**previous, "reused": True}
            tqdm.tqdm.write(
                f"[{number}/{len(STAGES)}] {stage.title}: reused (took {previous['seconds']:.0f} s "
                f"when it ran; --force redoes it)"
            )
        else:
            redo = True  # every later stage depends on this one's outputs
            record_path.unlink(missing_ok=True)
            tqdm.tqdm.write(f"[{number}/{len(STAGES)}] {stage.title} ...")
            started = time.perf_counter()
            result = stage.run(run)
            seconds = time.perf_counter() - started
            run.results[stage.name] = result
            records[stage.name] = {"settings": settings, "result": result, "seconds": seconds}
            record_path.write_text(json.dumps(records[stage.name], ensure_ascii=False, indent=1), "utf-8")
            records[stage.name]["reused"] = False
            tqdm.tqdm.write(f"[{number}/{len(STAGES)}] {stage.title}: done in {seconds:.0f} s")
        bar.update(1)
    bar.close()
    return records


def report(run: DemoRun, records: dict[str, dict], wall_seconds: float) -> str:
    """The end-of-run summary: losses, chats, files and timings."""
    results = run.results
    lines = ["", "=" * 80, "minimind-jax demo"]
    corpus = results["corpus"]["records"]
    lines.append(
        f"corpus: {corpus['sft']} SFT / pretrain records, {corpus['sft_heldout']} held out; "
        f"tokenizer: {results['tokenizer']['vocab_size']} tokens"
    )
    for mode in ("pretrain", "sft"):
        r = results[mode]
        lines.append(
            f"{mode}: {r['updates']} updates, final training loss {r['final_loss']:.3f}, "
            f"{r['tokens_per_s']:,.0f} tokens/s, compile {r['compile_s']:.0f} s -> {r['weights']}"
        )
    convert = results["convert"]
    lines.append(
        f"convert: {convert['checkpoint']}; logits max |Δ| checkpoint vs .pth "
        f"{convert['max_abs_diff_checkpoint_vs_pth']:.1e}, PyTorch reference (strict load) vs JAX "
        f"{convert['max_abs_diff_torch_vs_jax']:.1e}"
    )
    lines.append("held-out masked loss (perplexity):")
    evaluation = results["evaluate"]
    for name, before, after in (
        ("pretrain_text", "random init", "pretrained"),
        ("sft_assistant_tokens", "pretrained", "after SFT"),
    ):
        e = evaluation[name]
        lines.append(
            f"  {name:<22} {before} {e['before']['loss']:.3f} ({e['before']['perplexity']:.1f}) -> "
            f"{after} {e['after']['loss']:.3f} ({e['after']['perplexity']:.1f}) "
            f"over {e['after']['loss_tokens']:.0f} tokens"
        )
    lines.append("chats (pretrained -> after SFT):")
    for turn in results["chat"]["chats"]:
        lines += [f"  💬 {turn['prompt']}", f"     pretrain: {turn['pretrain']!r}", f"     sft:      {turn['sft']!r}"]
    lora = results["lora"]
    before, after = lora["heldout_identity_loss"]["before"], lora["heldout_identity_loss"]["after"]
    lines.append(
        f"LoRA identity adapter ({lora['trainable_params']:,} of {lora['params']:,} parameters trained): held-out "
        f"identity loss {before['loss']:.3f} -> {after['loss']:.3f}; greedy replies (SFT -> with the adapter):"
    )
    for turn in lora["replies"]:
        lines += [f"  💬 {turn['prompt']}", f"     sft:  {turn['before']!r}", f"     lora: {turn['after']!r}"]
    dpo = results["dpo"]
    before, after = dpo["heldout"]["before"], dpo["heldout"]["after"]
    lines.append(
        f"DPO ({dpo['pairs']['train']} pairs; {dpo['pairs']['heldout']} held out): held-out reward margin "
        f"{before['reward_margin']:.4f} -> {after['reward_margin']:.4f}, accuracy {before['reward_accuracy']:.1%} -> "
        f"{after['reward_accuracy']:.1%}, DPO loss {before['loss']:.4f} -> {after['loss']:.4f}"
    )
    grpo = results["grpo"]
    before, after = grpo["heldout_reward"]["before"], grpo["heldout_reward"]["after"]
    lines.append(
        f"GRPO ({grpo['updates']} updates, reward: a reply of about {DEMO_REPLY_CHARS} characters): held-out mean "
        f"reward {before['reward']:.3f} -> {after['reward']:.3f} over {after['completions']} completions; per "
        f"update {' '.join(f'{r:.2f}' for r in grpo['reward_curve'])}; {grpo['figure']}"
    )
    lines.append(
        f"figures: {results['figures']['figure']}, {results['pretrain']['loss_curve']}, {results['sft']['loss_curve']}"
    )
    timings = ", ".join(
        f"{name} {r['seconds']:.0f} s{' (reused)' if r['reused'] else ''}" for name, r in records.items()
    )
    lines.append(f"stages: {timings}")
    lines.append(f"this run: {wall_seconds:.0f} s wall; summary in {run.out_dir / 'summary.json'}")
    return "\n".join(lines)


def run(args) -> int:
    started = time.perf_counter()
    settings = load_settings(args.config, quick=args.quick)
    demo = DemoRun(settings, args.out_dir, mesh=args.mesh, progress=not args.no_progress)
    records = run_stages(demo, force=args.force)
    wall_seconds = time.perf_counter() - started
    summary = {
        "quick": args.quick,
        "wall_seconds_this_run": wall_seconds,
        "stage_seconds": {name: r["seconds"] for name, r in records.items()},
        "reused": [name for name, r in records.items() if r["reused"]],
        "results": demo.results,
    }
    (demo.out_dir / "summary.json").write_text(json.dumps(summary, ensure_ascii=False, indent=1), "utf-8")
    print(report(demo, records, wall_seconds))
    sys.stdout.flush()
    return 0
