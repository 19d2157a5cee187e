"""DPO throughput and memory (./run.sh bench); nothing here is asserted, only measured.

Pairs/s and peak memory of algos/dpo.py and of Hugging Face TRL's DPOTrainer (run in .venv-trl) on the
same model (the 3.2M-parameter toy Llama of tests/bench.py), the same pairs (the embedded preference
pairs as chat messages, through the same chat template), the same batch, learning rate and beta.
The three runs (TRL, ours, ours with gradient checkpointing) go one after another, each with the whole
machine. Pairs/s is timed over steps WARMUP..STEPS, in wall-clock seconds and in the process's CPU
seconds (user + system; less sensitive to a busy machine); peak memory is the process's peak RSS, so it
includes each side's reference handling: ours precomputes the reference log-probs and frees the
reference model, TRL's default keeps a reference model and runs it every step (and, by default,
recomputes activations: gradient checkpointing).
Run:  .venv/bin/python tests/bench_dpo.py
"""
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import OUT, ROOT, TRL_PY, make_inputs, trl_side  # noqa: E402

BATCH, STEPS, WARMUP, MAX_LEN, LR, BETA, N_PAIRS = 16, 40, 10, 128, 1e-4, 0.1, 2000


def make_pairs():
    """The first N_PAIRS embedded pairs with message-list fields (both sides apply the chat template)."""
    sys.path.insert(0, ROOT)
    from common import toy
    path, tiny = os.path.join(OUT, "dpo_pairs.jsonl"), os.path.join(OUT, "dpo_pairs_tiny.jsonl")
    with open(toy.data("prefs.jsonl")) as f:
        recs = [json.loads(line) for _, line in zip(range(N_PAIRS), f)]
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in recs]
    for p, rs in ((path, rows), (tiny, rows[:1])):
        with open(p, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rs)
    return path, tiny


def ours(model_dir, pairs, tiny, ckpt):
    """Starts algos/dpo.py; returns a function that waits for it and gives (pairs/s, pairs/CPU-s, peak GB)."""
    out, eval_tiny = os.path.join(OUT, f"dpo_ours_ckpt{ckpt}"), os.path.join(OUT, "eval_tiny.jsonl")
    with open(eval_tiny, "w") as f:
        f.write(json.dumps({"prompt": "What is 1+1?", "answer": "2"}) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # no stale metrics for the watcher below
    # one step past STEPS, so that the row at STEPS is not the final one (which includes the evaluation)
    p = subprocess.Popen([sys.executable, "algos/dpo.py", "--model", model_dir, "--data", pairs,
                          "--eval_data", eval_tiny, "--eval_pairs", tiny, "--output_dir", out,
                          "--max_len", str(MAX_LEN), "--batch_size", str(BATCH), "--max_steps", str(STEPS + 1),
                          "--log_every", str(WARMUP), "--eval_every", "0", "--save_every", "0",
                          "--lr", str(LR), "--beta", str(BETA), "--gradient_checkpointing", str(ckpt)],
                         cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    cpu, path = {}, os.path.join(out, "metrics.jsonl")

    def watch():
        """Polls the metrics file, reading the process's CPU time (/proc) when the rows of WARMUP and STEPS
        appear."""
        while p.poll() is None:
            steps = set()
            if os.path.exists(path):
                # complete lines only: the trainer may be midway through writing the last one
                steps = {json.loads(line)["step"] for line in open(path) if line.endswith("\n")}
            for s in (WARMUP, STEPS):
                if s in steps and s not in cpu:
                    with open(f"/proc/{p.pid}/stat") as f:
                        # the fields after the command name (which may contain spaces and parentheses)
                        fields = f.read().rsplit(")", 1)[1].split()
                        # utime + stime, from clock ticks to seconds
                        cpu[s] = sum(map(int, fields[11:13])) / os.sysconf("SC_CLK_TCK")
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()

    def result():
        watcher.join()
        assert p.returncode == 0, f"algos/dpo.py failed ({p.returncode})"
        rows = {r["step"]: r for r in map(json.loads, open(path))}
        n = BATCH * (STEPS - WARMUP)
        pairs_per_s = n / (rows[STEPS]["time"] - rows[WARMUP]["time"])
        pairs_per_cpu_s = n / (cpu[STEPS] - cpu[WARMUP])
        return pairs_per_s, pairs_per_cpu_s, rows[STEPS + 1]["peak_mem_gb"]
    return result


def trl(model_dir, pairs):
    """Runs in the TRL environment: DPOTrainer with its defaults (a reference model kept in memory), same
    model, pairs, batch, max length, learning rate, schedule and beta."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            marks[state.global_step] = (time.time(), time.process_time())

    cfg = DPOConfig(output_dir=os.path.join(OUT, "dpo_trl"), per_device_train_batch_size=BATCH, max_length=MAX_LEN,
                    max_steps=STEPS, logging_steps=WARMUP, save_strategy="no", report_to="none", learning_rate=LR,
                    beta=BETA, lr_scheduler_type="cosine", warmup_steps=STEPS // 10, use_cpu=True,
                    dataloader_num_workers=0)
    train = load_dataset("json", data_files=pairs, split="train")
    trainer = DPOTrainer(model=model_dir, args=cfg, train_dataset=train,
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
    trainer.train()
    n = BATCH * (STEPS - WARMUP)
    print(json.dumps({"pairs_per_s": n / (marks[STEPS][0] - marks[WARMUP][0]),
                      "pairs_per_cpu_s": n / (marks[STEPS][1] - marks[WARMUP][1]),
                      "peak_mem_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))


def main():
    model_dir, _ = make_inputs()
    pairs, tiny = make_pairs()
    import torch
    print(f"DPO benchmark: 3.2M-param Llama, {BATCH} pairs a step, steps {WARMUP}..{STEPS} timed, "
          f"{torch.get_num_threads()} threads", flush=True)
    # One run at a time: each has the whole machine, as a user's training run would.
    r = None
    if os.path.exists(TRL_PY):  # TRL's defaults include gradient checkpointing
        r, err = trl_side(__file__, model_dir, pairs)
        print(f"  TRL failed: {err}" if err else f"  {'TRL DPOTrainer (defaults)':32s}: {r['pairs_per_s']:6.1f} "
              f"pairs/s {r['pairs_per_cpu_s']:6.1f} pairs/CPU-s  peak {r['peak_mem_gb']:.2f} GB", flush=True)
    for ckpt in (False, True):
        pps, ppc, mem = ours(model_dir, pairs, tiny, ckpt)()
        name = " --gradient_checkpointing" if ckpt else " (defaults)"
        line = f"  ours{name:28s}: {pps:6.1f} pairs/s {ppc:6.1f} pairs/CPU-s  peak {mem:.2f} GB"
        if r:
            line += (f" | ours/TRL {pps / r['pairs_per_s']:.2f}x pairs/s, "
                     f"{ppc / r['pairs_per_cpu_s']:.2f}x pairs/CPU-s, {mem / r['peak_mem_gb']:.2f}x peak memory")
        print(line, flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--trl"]:
        trl(sys.argv[2], sys.argv[3])
    else:
        main()
