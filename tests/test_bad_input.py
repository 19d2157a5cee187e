"""Bad input: one line naming file, line and field; exit status 1; no output directory."""
import json
import shutil

import pytest
from util import ROOT, fails_with_one_line, run

from algos import rm, sft

GOOD = {"messages": [{"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "1+1=2"}]}
CASES = {  # name: (file content, what the one-line error must say)
    "malformed json": (json.dumps(GOOD) + "\n{\"messages\": [\n", ":2: malformed JSON"),
    "missing field": (json.dumps(GOOD) + "\n" + json.dumps({"prompt": "What is 1+1?"}) + "\n",
                      ":2: missing field 'completion'"),
    "unknown role": (json.dumps({"messages": [{"role": "robot", "content": "hi"}, GOOD["messages"][1]]}) + "\n",
                     ":1: field 'messages[0].role' is 'robot'"),
    "no assistant turn": (json.dumps({"messages": GOOD["messages"][:1]}) + "\n",
                          ":1: field 'messages' has no assistant turn"),
    "empty file": ("", ": no records (empty file)"),
    "mistyped field": (json.dumps({"prompt": 3, "completion": "x"}) + "\n", ":1: field 'prompt' must be str or list"),
}


@pytest.mark.parametrize("case", CASES)
def test_sft_bad_data(case, base, tmp_path):
    content, expected = CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sft.main(sft.parse_args(["--data", str(path), "--output_dir", str(out)]))
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg and str(path) + expected in msg
    assert not out.exists()


def test_tokenizer_without_chat_template(base, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(base, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=r"^error: tokenizer .* has no chat template") as e:
        sft.main(sft.parse_args(["--model", str(model), "--output_dir", str(tmp_path / "out")]))
    assert "\n" not in str(e.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("rec,expected", [
    ({"prompt": "What is 1+1?", "chosen": "1+1=2"}, ":1: missing field 'rejected'"),
    ({"prompt": "What is 1+1?", "chosen": "1+1=2", "rejected": "1+1=2"},
     ":1: fields 'chosen' and 'rejected' are identical"),
    ({"prompt": "What is 1+1?", "chosen": "1+1=2", "rejected": " "}, ":1: field 'rejected' is an empty completion"),
])
def test_rm_bad_pairs(rec, expected, sft_run, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(SystemExit, match="^error: " + str(path) + expected):
        rm.main(rm.parse_args(["--model", str(sft_run), "--data", str(path), "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_exit_status_and_stderr_from_the_command_line(base, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n")
    p = run("sft", "--data", path, "--output_dir", tmp_path / "out", check=False)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: {path}:1: malformed JSON")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,expected,status", [
    (["--bogus", "1"], "error: unrecognized arguments: --bogus 1", 2),
    (["--batch_size", "0"], "error: --batch_size must be positive, got 0", 2),
    (["--max_steps", "-1"], "error: --max_steps must be non-negative, got -1", 2),
    (["--max_len", "0"], "error: --max_len must be positive, got 0", 2),
    (["--data", "nowhere.jsonl"], "error: nowhere.jsonl: no such file", 1),
    (["--data", "tests"], "error: tests: is a directory, expected a JSONL file", 1),
    (["--report_to", "mlflow"], "error: --report_to must be one of none, tensorboard, wandb, trackio, got 'mlflow'", 2),
    (["--compile", "maybe"], "error: --compile must be one of auto, true, false, got 'maybe'", 2),
])
def test_bad_arguments_one_line_nonzero_nothing_written(args, expected, status, tmp_path):
    p = run("sft", *args, "--output_dir", tmp_path / "out", check=False)
    fails_with_one_line(p, status, expected)
    assert "usage:" not in p.stderr  # argparse's usage block is replaced by the one line
    assert not (tmp_path / "out").exists()


# Each script's own sizes and files, from the embedded base model (the shared checks are sft's, above).
OWN = [
    ("dpo", ["--compile", "yes"], "error: --compile must be one of auto, true, false, got 'yes'", 2),
    ("grpo", ["--static_cache", "on"], "error: --static_cache must be one of auto, true, false, got 'on'", 2),
    ("grpo", ["--kl_estimator", "k4"], "error: --kl_estimator must be one of k1, k2, k3, got 'k4'", 2),
    ("grpo", ["--scale_rewards", "false"], "error: --scale_rewards must be one of group, batch, none, got 'false'", 2),
    ("grpo", ["--overlong_buffer", "13"], "error: --overlong_buffer 13 must lie in 0..max_new_tokens=12", 1),
    ("grpo", ["--scale_rewards", "batch", "--kl_placement", "reward"],
     "error: --scale_rewards batch needs every score of the batch before the first update", 1),
    ("distill", ["--mode", "gkd", "--lmbda", "1.5"], "error: --lmbda 1.5 must lie in [0, 1]", 1),
    ("dpo", ["--rpo_alpha", "-1"], "error: --rpo_alpha must be non-negative, got -1", 2),
    ("dpo", ["--lora_r", "-1"], "error: --lora_r must be non-negative, got -1", 2),
    ("dpo", ["--merge_lora", "true"], "error: --merge_lora needs --lora_r > 0", 2),
    ("grpo", ["--lora_r", "4", "--lora_targets", "q_proj,nope"], "error: --lora_targets 'q_proj,nope': ", 1),
    ("prm", ["--rollouts", "0"], "error: --rollouts must be positive, got 0", 2),
    ("prm", ["--eval_data", "runs/toy/data/eval.jsonl"], "error: runs/toy/data/eval.jsonl:1: missing field 'steps'", 1),
    ("rloo", ["--share_prompt", "yes"], "error: --share_prompt must be one of auto, true, false, got 'yes'", 2),
    ("online_dpo", ["--batch_size", "0"], "error: --batch_size must be positive, got 0", 2),
    ("online_dpo", ["--max_new_tokens", "0"], "error: --max_new_tokens must be positive, got 0", 2),
    ("online_dpo", ["--data", "nowhere.jsonl"], "error: nowhere.jsonl: no such file", 1),
    ("rft", ["--num_samples", "0"], "error: --num_samples must be positive, got 0", 2),
    ("rft", ["--rounds", "0"], "error: --rounds must be positive, got 0", 2),
    ("rft", ["--keep_per_prompt", "0"], "error: --keep_per_prompt must be positive, got 0", 1),
    ("rft", ["--steps_per_round", "-1"], "error: --steps_per_round must be non-negative, got -1", 1),
    ("rft", ["--prompts_per_round", "100"],
     "error: --prompts_per_round must be a multiple of gen_batch_size x processes", 1),
]


@pytest.mark.parametrize("script,args,expected,status", OWN, ids=[f"{c[0]} {' '.join(c[1])}" for c in OWN])
def test_each_scripts_own_bad_arguments(script, args, expected, status, base, tmp_path):
    p = run(script, "--model", base, *args, "--output_dir", tmp_path / "out", check=False)
    fails_with_one_line(p, status, expected)
    assert not (tmp_path / "out").exists()


def test_invalid_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(SystemExit, match=f"^error: {path}:2: invalid UTF-8"):
        sft.main(sft.parse_args(["--data", str(path), "--output_dir", str(tmp_path / "out")]))
    assert not (tmp_path / "out").exists()


def test_help_gives_each_arguments_meaning_and_default():
    p = run("grpo", "--help")
    assert "completions per prompt (default: 8)" in " ".join(p.stdout.split())
    assert "sampling temperature" in p.stdout and "--kl_estimator" in p.stdout


def test_epochs_alone_runs_epochs_not_the_default_step_budget(base, tmp_path):
    """sft's default budget is 2000 steps; --epochs 1 on 400 conversations is one pass (their rows / batch)."""
    from util import head, metrics
    assert sft.parse_args(["--epochs", "2"]).max_steps == 0
    assert sft.parse_args(["--epochs", "2", "--max_steps", "7"]).max_steps == 7
    data = head("sft.jsonl", tmp_path / "sft_400.jsonl", 400)
    out = tmp_path / "out"
    run("sft", "--data", data, "--epochs", 1, "--output_dir", out, "--save_every", 0, "--log_every", 1)
    steps = [m["step"] for m in metrics(out)]
    assert 1 <= steps[-1] < 20 and all(m["epoch"] == 0 for m in metrics(out) if "epoch" in m)


def test_own_data_builds_nothing_under_runs_toy(base, tmp_path, monkeypatch):
    """With a user's --data (and the embedded base as the model), no embedded data or eval set is touched."""
    from common import toy
    from util import head, metrics
    data = head("sft.jsonl", tmp_path / "sft_64.jsonl", 64)

    def refuse(name):
        raise AssertionError(f"runs/toy data {name!r} was asked for")
    monkeypatch.setattr(toy, "data", refuse)
    out = tmp_path / "out"
    sft.main(sft.parse_args(["--model", base, "--data", str(data), "--max_steps", "2", "--batch_size", "2",
                             "--log_every", "1", "--save_every", "0", "--output_dir", str(out)]))
    assert [m["step"] for m in metrics(out)] == [1, 2]
    assert not any(k.startswith("eval/") for m in metrics(out) for k in m)


def test_gpu_check_without_torch_says_what_to_run(tmp_path):
    """`./run.sh gpu` on a fresh clone (no .venv) whose python3 lacks torch: one line naming what to run, exit 1."""
    import os
    import subprocess
    if subprocess.run(["python3", "-c", "import torch, transformers"], capture_output=True).returncode == 0:
        pytest.skip("this machine's python3 has torch: the check runs instead")
    shutil.copy(os.path.join(ROOT, "run.sh"), tmp_path / "run.sh")
    p = subprocess.run(["bash", str(tmp_path / "run.sh"), "gpu"], capture_output=True, text=True, timeout=60)
    fails_with_one_line(p, 1, "error: python3 has no torch or transformers: run ./run.sh test once")


@pytest.mark.parametrize("args,expected,status", [
    (["--n", "3,4"], "error: --n 3,4: every N must be a positive divisor of the largest", 1),
    (["--pairs_out", "x.jsonl", "--pairs_per_prompt", "1"],
     "error: --pairs_per_prompt 1: a pair needs at least 2 solutions per prompt", 1),
    (["--prm", "runs/nowhere"], "error: runs/nowhere not found: train it first", 1),
    (["--best", "3"], "error: unrecognized arguments: --best 3", 2),
])
def test_best_of_n_bad_arguments(args, expected, status, base, tmp_path):
    """Every check comes before the minutes of sampling, and writes nothing."""
    p = run("best_of_n", "--policy", base, "--prm", base, "--orm", base, *args, "--output_dir", tmp_path / "out",
            check=False)
    fails_with_one_line(p, status, expected)
    assert not (tmp_path / "out").exists()
