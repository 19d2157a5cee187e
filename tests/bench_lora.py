"""LoRA against full fine-tuning: peak memory and speed of sft and dpo (./run.sh bench); measured, not asserted.

Each run is a process of its own, one after another, on the embedded 'large' model (runs/toy/base_large, 3.2M
parameters) with the embedded data, for STEPS steps at its default batch: full fine-tuning, then rank-16 adapters on
every linear layer but the head. Peak memory is the process's peak RSS (on CPU it includes the Python and torch
runtime, several hundred MB that both sides share). Beside it, the model state each side keeps for training, counted
from the parameter numbers: fp32 weights, plus gradients and AdamW's two moments for the parameters that train.
Run:  .venv/bin/python tests/bench_lora.py
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import OUT, ROOT  # noqa: E402

STEPS, RANK = 20, 16


def count(model_dir, lora_r):
    """(all parameters, those that train) of the model as the script builds it."""
    sys.path.insert(0, ROOT)
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from common import lora
    args = SimpleNamespace(lora_r=lora_r, lora_alpha=2.0 * RANK, lora_targets="all-linear", merge_lora=False)
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(model_dir), args)
    return sum(p.numel() for p in model.parameters()), sum(p.numel() for p in lora.trainable(model))


def one(script, lora_r):
    from common import toy
    model = toy.ensure("base_large")
    out = os.path.join(OUT, f"lora_{script}_r{lora_r}")
    args = ["--model", model, "--output_dir", out, "--max_steps", STEPS, "--log_every", STEPS, "--eval_every", 0,
            "--save_every", 0, "--lora_r", lora_r, "--lora_alpha", 2.0 * RANK]
    t = time.time()
    subprocess.run([sys.executable, f"algos/{script}.py", *map(str, args)], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.time() - t
    with open(os.path.join(out, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    total, trained = count(model, lora_r)
    state_mb = (4 * total + 12 * trained) / 2**20  # fp32 weights; gradient, Adam's m and v for what trains
    return {"script": script, "lora_r": lora_r, "params": total, "trained": trained, "state_mb": state_mb,
            "peak_rss_gb": last["peak_mem_gb"], "seconds": seconds}


def main():
    sys.path.insert(0, ROOT)
    os.makedirs(OUT, exist_ok=True)
    rows = [one(script, r) for script in ("sft", "dpo") for r in (0, RANK)]
    print(f"| script | LoRA rank | parameters that train | model state (MB) | peak RSS (GB) | wall s, {STEPS} steps |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        share = f"{r['trained']:,} of {r['params']:,}"
        print(f"| {r['script']} | {r['lora_r'] or 'full'} | {share} | {r['state_mb']:.1f} | {r['peak_rss_gb']:.3f} "
              f"| {r['seconds']:.1f} |")
    with open(os.path.join(OUT, "lora.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
