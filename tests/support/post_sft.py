"""The post-SFT trainers' command lines on the 2510 golden inputs (../shared/golden/post_sft/2510/inputs)."""

from tests.conftest import require_shared


def command(mode: str, inputs, out) -> tuple[list[str], str]:
    """(argv, the weight file it writes) for a 3-update run of `mode` on the golden inputs."""
    common = ["--arch", "minimind2", "--tokenizer_path", str(require_shared("minimind/2510")), "--epochs", "3",
              "--learning_rate", "1e-3", "--max_seq_len", "64", "--log_interval", "1", "--save_interval", "1",
              "--save_dir", str(out), "--no_progress", "--mesh", "data=2"]  # fmt: skip
    model = ["--hidden_size", "32", "--num_hidden_layers", "2", "--from_weight", str(inputs / "full_sft_32.pth")]
    if mode == "lora":
        argv = [*model, "--batch_size", "8", "--data_path", str(inputs / "sft.jsonl"), "--lora_name", "lora_t",
                "--from_lora", str(inputs / "lora_init_32.pth")]  # fmt: skip
        return ["lora", *common, *argv], "lora_t_32.pth"
    if mode == "dpo":
        return ["dpo", *common, *model, "--batch_size", "4", "--data_path", str(inputs / "dpo.jsonl")], "dpo_32.pth"
    argv = [*model, "--teacher_hidden_size", "64", "--teacher_num_layers", "2", "--batch_size", "8",
            "--from_teacher_weight", str(inputs / "full_sft_64.pth"), "--data_path", str(inputs / "sft.jsonl")]  # fmt: skip
    return ["distill", *common, *argv], "full_dist_32.pth"
