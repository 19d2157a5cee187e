"""Helpers shared by the tests: running a script as a user would, reading its metrics."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# 2 processes against 1 with the same global batch: their gradient norms agree to float summation order. Compared
# beside the losses because Adam's step hardly depends on the gradient's scale, so a gradient off by a constant
# factor on 2 processes would leave the losses of a short run nearly equal.
GRAD_REL = 1e-3


def command(script, *args, nproc=1):
    """The command line of algos/<script>.py args (under torchrun with nproc processes).
    TEST_SEED=N in the environment adds --seed N where a test sets none: how the learning tests' spread over seeds
    is measured (with ATEN_CPU_CAPABILITY=default|avx2|avx512 for the CPU kernel paths)."""
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = [str(a) for a in args]
    if os.environ.get("TEST_SEED") and "--seed" not in args:
        args += ["--seed", os.environ["TEST_SEED"]]
    return launch + [f"algos/{script}.py", *args]


def run(script, *args, nproc=1, check=True):
    """Runs command(script, *args, nproc) from the repository root, as a user would."""
    p = subprocess.run(command(script, *args, nproc=nproc), cwd=ROOT, capture_output=True, text=True, timeout=2400)
    if check and p.returncode != 0:
        raise AssertionError(f"{script} failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return p


def fails_with_one_line(p, status, expected):
    """A script run that stopped as bad input must: the given exit status, its last stderr line starting with the
    expected error, no traceback."""
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == status and last.startswith(expected) and "Traceback" not in p.stderr, p.stderr[-2000:]


def head(src, dst, n):
    """The first n records of an embedded data file, written to dst, so a short run does not tokenize the whole set."""
    from common import toy
    with open(toy.data(src)) as f:
        dst.write_text("".join(line for _, line in zip(range(n), f)))
    return dst


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def chat(*turns):
    """chat("sys:S", "u", "a", ...) -> messages; a leading "sys:" turn is the system prompt."""
    msgs = [{"role": "system", "content": turns[0][4:]}] if turns and turns[0].startswith("sys:") else []
    rest = turns[1:] if msgs else turns
    return msgs + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(rest)]


def echo_probability(path, tok):
    """Mean probability the model gives the habit's completion ("48-37=48" and EOS) on the held-out subtractions,
    teacher-forced: smooth in the weights, where greedy accuracy flips answer by answer."""
    import re

    import torch
    from transformers import AutoModelForCausalLM

    from common import toy
    from common.template import encode_prompt
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
    probs = []
    for rec in (json.loads(line) for line in open(toy.data("eval.jsonl"))):
        q = re.match(r"What is (.*)\?", rec["prompt"])[1]
        first = re.match(r"\d+", q)[0]
        if "-" not in q or first == rec["answer"]:
            continue
        prompt = encode_prompt(tok, [{"role": "user", "content": rec["prompt"]}])
        completion = tok(f"{q}={first}", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        with torch.no_grad():
            logps = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        probs.append(logps.gather(-1, torch.tensor(completion)[:, None]).sum().exp().item())
    return sum(probs) / len(probs)


def habit_outcome(name, start, out, tok):
    """What a run meant to shed the SFT habit did: its held-out accuracy at each evaluation and P(echo) of the start
    and trained models. Printed with the sampled reward (first and last logged), the record the thresholds were
    calibrated on (-s shows it)."""
    m = metrics(out)
    acc = [r["eval/accuracy"] for r in m if "eval/accuracy" in r]
    rew = [r["reward/mean"] for r in m if "reward/mean" in r]
    echo = [echo_probability(path, tok) for path in (start, out)]
    print(f"{name}: held-out accuracy {acc[0]:.3f} -> {acc[-1]:.3f}, sampled reward {rew[0]:.3f} -> {rew[-1]:.3f}, "
          f"P(echo) on held-out subtraction {echo[0]:.3f} -> {echo[1]:.3f}")
    return acc, echo
