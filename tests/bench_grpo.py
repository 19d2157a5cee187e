"""GRPO throughput and memory (./run.sh bench); nothing here is asserted, only measured.

Seconds per step, completions/s and peak memory of algos/grpo.py, and of Hugging Face TRL's GRPOTrainer
(in .venv-trl) on the same model (the 3.2M-parameter 'large' toy Llama of tests/bench.py), the same prompts,
group size, completion length, β, learning rate and reward (the toy verifier).
"""
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import OUT, ROOT, TRL_PY, make_inputs, trl_side  # noqa: E402

# 64 completions of at most 8 tokens a step
PROMPTS, G, MAX_NEW, BETA, LR, STEPS, WARMUP = 8, 8, 8, 0.04, 1e-5, 30, 5


def ours(model_dir):
    out = os.path.join(OUT, "grpo_ours")
    eval_data = os.path.join(OUT, "eval_tiny.jsonl")
    with open(eval_data, "w") as f:
        f.write(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n")
    subprocess.run([sys.executable, "algos/grpo.py", "--model", model_dir, "--eval_data", eval_data,
                    "--output_dir", out, "--batch_size", str(PROMPTS), "--group_size", str(G),
                    "--max_new_tokens", str(MAX_NEW), "--beta", str(BETA), "--lr", str(LR),
                    "--max_steps", str(STEPS), "--log_every", str(WARMUP), "--eval_every", "0", "--save_every", "0"],
                   cwd=ROOT, check=True, capture_output=True)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in line]
    # rows are logged every WARMUP steps; time from the first row to the one before the last
    # (the last includes the final eval)
    per_step = (rows[-2]["time"] - rows[0]["time"]) / (rows[-2]["step"] - rows[0]["step"])
    return per_step, rows[-1]["peak_mem_gb"]


def trl(model_dir):
    """Runs in the TRL environment: GRPOTrainer, same model, prompts, group size, completion length, β, lr,
    reward."""
    from datasets import load_dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, ROOT)
    from common import toy

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks.append(time.time())

    def reward(completions, answer, **kw):
        return [toy.verify(c[-1]["content"], a) for c, a in zip(completions, answer)]

    ds = load_dataset("json", data_files=toy.data("rl.jsonl"), split="train")
    ds = ds.select(range(PROMPTS * STEPS))
    ds = ds.map(lambda r: {"prompt": [{"role": "user", "content": r["prompt"]}]})
    cfg = GRPOConfig(output_dir=os.path.join(OUT, "grpo_trl"), per_device_train_batch_size=PROMPTS * G,
                     num_generations=G, max_completion_length=MAX_NEW, beta=BETA, learning_rate=LR,
                     max_steps=STEPS, logging_steps=WARMUP, save_strategy="no", report_to="none", use_cpu=True,
                     dataloader_num_workers=0, lr_scheduler_type="constant")
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward, args=cfg, train_dataset=ds, callbacks=[Clock()])
    trainer.train()
    per_step = (marks[-1] - marks[WARMUP - 1]) / (len(marks) - WARMUP)
    print(json.dumps({"s_per_step": per_step,
                      "peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main():
    model_dir, _ = make_inputs()
    import torch
    n = PROMPTS * G
    print(f"GRPO benchmark: 'large' toy Llama, {PROMPTS} prompts x {G} samples = {n} completions "
          f"of at most {MAX_NEW} tokens a step, beta {BETA}, {STEPS} steps (first {WARMUP} not timed), "
          f"{torch.get_num_threads()} threads")
    s, mem = ours(model_dir)
    if os.path.exists(TRL_PY):
        r, err = trl_side(__file__, model_dir)
        # ours before and after TRL: a load that changes during the run hits both sides alike
        s = (s + ours(model_dir)[0]) / 2
    line = f"  ours: {s:6.3f} s/step  {n / s:7.1f} completions/s  peak {mem:.2f} GB"
    if os.path.exists(TRL_PY):
        line += (f" | TRL failed: {err}" if err else f" | TRL {r['s_per_step']:6.3f} s/step  "
                 f"{n / r['s_per_step']:7.1f} completions/s  peak {r['peak_mem_gb']:.2f} GB | ours/TRL "
                 f"{r['s_per_step'] / s:.2f}x")
    print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl"]:
        trl(sys.argv[2])
    else:
        main()
