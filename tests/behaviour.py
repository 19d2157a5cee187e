"""What every script computes, recorded before a change that moves code and compared after it.

    python tests/behaviour.py record DIR [RUN...]     every script (or the named runs) for a few steps -> DIR/<run>/
    python tests/behaviour.py compare A B [RUN...]  field by field, timing and memory aside; exit 1 on a difference

The runs start from fixed input models trained once under runs/behaviour_inputs/ (a short SFT, a reward model on
it, a small teacher, a second SFT for merging), so two recordings on the same machine differ only where the code
does. One thread a process, as the suite runs. `./run.sh behaviour record DIR` and `... compare A B` call this.
"""
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from util import ROOT, command  # noqa: E402

INPUTS = os.path.join(ROOT, "runs", "behaviour_inputs")
TIMING = {"tokens_per_s", "step_s", "generate_s", "peak_mem_gb", "time"}  # differ from run to run by nature
SHORT = ["--max_steps", "4", "--log_every", "1", "--eval_every", "2", "--save_every", "0"]

# Inputs: name -> (script, args); trained in this order, each from the ones before it.
INPUT_RUNS = {
    "sft": ("sft", ["--max_steps", "150", "--eval_every", "0"]),
    "sft_b": ("sft", ["--max_steps", "60", "--seed", "1", "--eval_every", "0"]),
    "rm": ("rm", ["--model", "{in}/sft", "--max_steps", "40", "--eval_every", "0"]),
    "teacher": ("sft", ["--model", "runs/toy/base_large", "--max_steps", "40", "--eval_every", "0"]),
}

# The recorded runs: name -> (script, args), from the inputs above.
RUNS = {
    "sft": ("sft", SHORT),
    "sft_chunked": ("sft", SHORT + ["--loss_chunk", "1"]),  # the chunked log-prob kernel instead of full logits
    "rm": ("rm", ["--model", "{in}/sft"] + SHORT),
    **{a: (a, ["--model", "{in}/sft"] + SHORT) for a in ("dpo", "ipo", "kto", "orpo", "simpo")},
    "dpo_chunked": ("dpo", ["--model", "{in}/sft", "--loss_chunk", "1"] + SHORT),
    **{a: (a, ["--model", "{in}/sft"] + SHORT) for a in ("grpo", "rloo", "remax")},
    "grpo_variants": ("grpo", ["--model", "{in}/sft", "--share_prompt", "false", "--kl_placement", "reward",
                               "--kl_estimator", "k2", "--loss_agg", "sequence", "--num_iterations", "2"] + SHORT),
    "online_dpo": ("online_dpo", ["--model", "{in}/sft"] + SHORT),
    "online_dpo_rm": ("online_dpo", ["--model", "{in}/sft", "--reward_model", "{in}/rm"] + SHORT),
    "rft": ("rft", ["--model", "{in}/sft", "--rounds", "2", "--prompts_per_round", "64", "--steps_per_round", "2"]),
    "ppo": ("ppo", ["--model", "{in}/sft", "--reward_model", "{in}/rm"] + SHORT),
    "ppo_verifier": ("ppo", ["--model", "{in}/sft", "--reward", "verifier"] + SHORT),
    **{f"distill_{m}": ("distill", ["--mode", m, "--model", "{in}/sft", "--teacher", "{in}/teacher"] + SHORT)
       for m in ("seqkd", "forward_kl", "reverse_kl", "on_policy")},
    "merge_ties": ("merge", ["--method", "ties", "--base", "runs/toy/base", "--models", "{in}/sft", "{in}/sft_b"]),
    "merge_linear": ("merge", ["--method", "linear", "--base", "", "--models", "{in}/sft", "{in}/sft_b"]),
}


def launch(script, args, out):
    args = [a.format(**{"in": INPUTS}) for a in args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t = time.time()
    p = subprocess.run(command(script, *args, "--output_dir", out), cwd=ROOT, env=env, capture_output=True,
                       text=True)
    with open(f"{out}.log", "w") as f:
        f.write(p.stdout + p.stderr)
    status = "ok" if p.returncode == 0 else f"FAILED ({p.returncode}), see {out}.log"
    print(f"{os.path.basename(out)}: {status} in {time.time() - t:.0f} s", flush=True)
    return p.returncode == 0


def record(root, only=None):
    from common import toy
    for what in ("data", "base", "base_large"):
        toy.ensure(what)
    os.makedirs(INPUTS, exist_ok=True)
    for name, (script, args) in INPUT_RUNS.items():
        if not os.path.exists(os.path.join(INPUTS, name, "config.json")):
            if not launch(script, args + ["--save_every", "0"], os.path.join(INPUTS, name)):
                sys.exit(1)
    os.makedirs(root, exist_ok=True)
    ok = True
    for name, (script, args) in RUNS.items():
        if not only or name in only:
            ok &= launch(script, args, os.path.join(root, name))
    sys.exit(0 if ok else 1)


def rows(path):
    """metrics.jsonl less timing, with input paths (merge logs them) made independent of the checkout's location."""
    def same_anywhere(v):
        return re.sub(r"\S*/runs/behaviour_inputs", "{in}", v) if isinstance(v, str) else v

    with open(path) as f:
        return [{k: same_anywhere(v) for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def compare(a, b, only=None):
    same = 0
    names = sorted(n for n in os.listdir(a) if os.path.isfile(os.path.join(a, n, "metrics.jsonl")))
    names = [n for n in names if not only or n in only]
    for name in names:
        if not os.path.isfile(os.path.join(b, name, "metrics.jsonl")):
            print(f"{name}: not recorded in {b}")
            continue
        ra, rb = rows(os.path.join(a, name, "metrics.jsonl")), rows(os.path.join(b, name, "metrics.jsonl"))
        diffs = [(x.get("step"), k, x.get(k), y.get(k)) for x, y in zip(ra, rb) for k in sorted(set(x) | set(y))
                 if x.get(k) != y.get(k)]
        if len(ra) != len(rb):
            diffs.append(("rows", "count", len(ra), len(rb)))
        if diffs:
            print(f"{name}: {len(diffs)} differences, first: " + "; ".join(f"step {s} {k}: {x} -> {y}"
                                                                          for s, k, x, y in diffs[:4]))
        else:
            same += 1
    print(f"{same} of {len(names)} runs identical")
    sys.exit(0 if same == len(names) else 1)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "record":
        record(sys.argv[2], sys.argv[3:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "compare":
        compare(sys.argv[2], sys.argv[3], sys.argv[4:])
    else:
        sys.exit(__doc__)
