"""Reward functions of your own (--reward_fn): the examples by hand, the loader's one-line errors, weighted sums
logged apart, and a reward file equal to the embedded verifier reproducing the default run."""
import textwrap

import pytest
from util import fails_with_one_line, head, metrics, run

from common.rewards import boxed, final_number, gsm8k, load_rewards, think_format


def test_final_number_by_hand():
    assert final_number("48+37=85", {"answer": "85"}) == 1.0
    assert final_number("it costs 1,234 dollars", {"answer": "1234"}) == 1.0  # thousands separators
    assert final_number("x = 3.50", {"answer": "3.5"}) == 1.0  # compared as numbers
    assert final_number("85, no: 86", {"answer": "85"}) == 0.0  # the last number counts
    assert final_number("no number", {"answer": "85"}) == 0.0
    assert final_number("-7", {"answer": "-7"}) == 1.0


def test_gsm8k_by_hand():
    ref = {"answer": "Natalia sold 48/2 = 24 clips in May.\n#### 72"}
    assert gsm8k("48 + 24 = 72\n#### 72", ref) == 1.0
    assert gsm8k("#### 72.0", ref) == 1.0
    assert gsm8k("the answer is 72", ref) == 0.0  # no '####': the format is part of the task
    assert gsm8k("#### 71", ref) == 0.0
    assert gsm8k("#### 1,000", {"answer": "1000"}) == 1.0  # a bare reference answer


def test_boxed_by_hand():
    assert boxed(r"so \boxed{\frac{1}{2}}.", {"answer": r"\dfrac{1}{2}"}) == 1.0  # dfrac = frac
    assert boxed(r"\boxed{ \left( 1, 2 \right) }", {"answer": r"\boxed{(1,2)}"}) == 1.0  # \left \right, spaces
    assert boxed(r"first \boxed{3} then \boxed{4}", {"answer": "4"}) == 1.0  # the last box
    assert boxed(r"\boxed{0.50}", {"answer": "0.5"}) == 1.0  # as numbers
    assert boxed(r"\boxed{x^{2}}", {"answer": "x^{2}"}) == 1.0  # nested braces
    assert boxed("4", {"answer": "4"}) == 0.0  # no box
    assert boxed(r"\boxed{5", {"answer": "5"}) == 0.0  # unbalanced


def test_think_format_by_hand():
    assert think_format("<think>48+37 is 85</think> 85", {}) == 1.0
    assert think_format("<think>48+37 is 85</think>", {}) == 0.0  # no answer after the reasoning
    assert think_format("85 <think>late</think> 85", {}) == 0.0
    assert think_format("<think></think> 85", {}) == 0.0  # no reasoning


def test_a_repeated_reward_fn_gives_both():
    from algos.grpo import parse_args
    args = parse_args(["--reward_fn", "common/rewards.py:boxed", "--reward_fn", "common/rewards.py:think_format:0.2"])
    assert args.reward_fn == ["common/rewards.py:boxed", "common/rewards.py:think_format:0.2"]
    fns = load_rewards(args.reward_fn)
    assert [(f.name, f.weight) for f in fns] == [("boxed", 1.0), ("think_format", 0.2)]


REWARDS = textwrap.dedent('''
    from common import toy

    def correct(completion, record):
        return toy.verify(completion, record["answer"])

    def short(completion, record):
        return float(len(completion) < 6)

    def raises(completion, record):
        return record["no such field"]

    def text(completion, record):
        return "1"
''')


@pytest.mark.parametrize("spec,expected", [
    ("{dir}/missing.py:f", "error: --reward_fn {dir}/missing.py:f: {dir}/missing.py: no such file"),
    ("{dir}/broken.py:f", "error: --reward_fn {dir}/broken.py:f: {dir}/broken.py does not import: SyntaxError"),
    ("{dir}/rewards.py:absent", "error: --reward_fn {dir}/rewards.py:absent: {dir}/rewards.py has no function absent"),
    ("{dir}/rewards.py", "error: --reward_fn {dir}/rewards.py: expected FILE.py:NAME or FILE.py:NAME:WEIGHT"),
    ("{dir}/rewards.py:short:heavy", "error: --reward_fn {dir}/rewards.py:short:heavy: the weight 'heavy' is not"),
    ("{dir}/rewards.py:raises", "error: reward {dir}/rewards.py:raises raised KeyError: 'no such field' on {data}:1"),
    ("{dir}/rewards.py:text", "error: reward {dir}/rewards.py:text returned '1', not a finite number, on {data}:1"),
])
def test_a_bad_reward_fn_is_one_line_and_writes_nothing(spec, expected, base, tmp_path):
    (tmp_path / "rewards.py").write_text(REWARDS)
    (tmp_path / "broken.py").write_text("def f(:\n")
    data = head("rl.jsonl", tmp_path / "rl_32.jsonl", 32)
    p = run("grpo", "--model", base, "--data", data, "--reward_fn", spec.format(dir=tmp_path),
            "--output_dir", tmp_path / "out", check=False)
    fails_with_one_line(p, 1, expected.format(dir=tmp_path, data=data))
    assert not (tmp_path / "out").exists()


def test_weighted_reward_fns_are_logged_apart_and_summed(sft_run, tmp_path):
    """correct (the verifier's rule) + 0.5 x short; and correct alone reproduces the default run exactly."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    common = ["--model", sft_run, "--data", head("rl.jsonl", tmp_path / "rl_64.jsonl", 64), "--max_steps", 2,
              "--log_every", 1, "--eval_every", 0, "--save_every", 0, "--lr", 1e-3]
    run("grpo", *common, "--output_dir", tmp_path / "default")
    run("grpo", *common, "--output_dir", tmp_path / "file", "--reward_fn", f"{tmp_path}/rewards.py:correct")
    run("grpo", *common, "--output_dir", tmp_path / "two", "--reward_fn", f"{tmp_path}/rewards.py:correct",
        "--reward_fn", f"{tmp_path}/rewards.py:short:0.5")
    default, file, two = ([r for r in metrics(tmp_path / d) if "loss" in r] for d in ("default", "file", "two"))
    timing = {"tokens_per_s", "step_s", "generate_s", "time", "peak_mem_gb", "reward/correct"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in file] == \
        [{k: v for k, v in r.items() if k not in timing} for r in default]
    assert all(r["reward/correct"] == r["reward/mean"] for r in file)
    for r in two:
        assert r["reward/mean"] == pytest.approx(r["reward/correct"] + 0.5 * r["reward/short"], abs=2e-6)
    assert any(r["reward/short"] > 0 for r in two)


BUDGET = {"rft": ["--rounds", 1, "--prompts_per_round", 64, "--steps_per_round", 2],
          "ppo": ["--reward", "verifier", "--max_steps", 2, "--log_every", 1, "--batch_size", 4]}


@pytest.mark.parametrize("algo", ["rloo", "remax", "online_dpo", "rft", "ppo"])
def test_reward_fns_in_every_sampling_script(algo, sft_run, tmp_path):
    """Every other sampling script (remax's greedy baseline scored by the same functions; ppo with --reward
    verifier) logs each function and sums them with their weights."""
    (tmp_path / "rewards.py").write_text(REWARDS)
    budget = BUDGET.get(algo, ["--max_steps", 2, "--log_every", 1])
    run(algo, "--model", sft_run, "--data", head("rl.jsonl", tmp_path / "rl_64.jsonl", 64), *budget,
        "--eval_every", 0, "--save_every", 0, "--output_dir", tmp_path / "out",
        "--reward_fn", f"{tmp_path}/rewards.py:correct", "--reward_fn", f"{tmp_path}/rewards.py:short:0.5")
    rows = [r for r in metrics(tmp_path / "out") if "reward/mean" in r]
    assert rows
    for r in rows:
        assert r["reward/mean"] == pytest.approx(r["reward/correct"] + 0.5 * r["reward/short"], abs=2e-6)


@pytest.mark.parametrize("algo", ["online_dpo", "rft", "ppo"])
def test_reward_fn_and_reward_model_together_is_one_line(algo, base, tmp_path):
    extra = ["--reward", "model"] if algo == "ppo" else []
    p = run(algo, "--model", base, "--reward_model", base, *extra, "--reward_fn", "common/rewards.py:boxed",
            "--output_dir", tmp_path / "out", check=False)
    assert p.returncode == 1 and "--reward_fn" in p.stderr.strip().splitlines()[-1] and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
