"""Side-by-side comparison of runs from their metrics.jsonl: a table (printed and runs/compare.md)
and the training curves (runs/compare.png).   python -m common.report runs/sft runs/rm ...
"""
import json
import os
import sys

COLUMNS = [("eval/accuracy", "eval acc (start -> end)"), ("eval/pref_accuracy", "pref acc (start -> end)"),
           ("eval/rm_score", "RM score (start -> end)"), ("reward/mean", "reward"), ("kl", "KL"),
           ("time", "time s"), ("tokens_per_s", "tokens/s"), ("peak_mem_gb", "peak mem GB")]


def read(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def cell(rows, key):
    vals = [r[key] for r in rows if key in r]
    if not vals:
        return "-"
    if key in ("eval/accuracy", "eval/pref_accuracy", "eval/rm_score"):
        return f"{vals[0]:.3f} -> {vals[-1]:.3f}" if len(vals) > 1 else f"{vals[-1]:.3f}"
    if key == "tokens_per_s":
        return f"{sum(vals) / len(vals):.0f}"
    return f"{vals[-1]:.3g}"


def main(runs, out="runs"):
    runs = [r for r in runs if os.path.exists(os.path.join(r, "metrics.jsonl"))]
    table = ["| run | " + " | ".join(c for _, c in COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    table += [f"| {os.path.basename(r)} | " + " | ".join(cell(read(r), k) for k, _ in COLUMNS) + " |"
              for r in runs]
    legend = ("eval acc: greedy exact-match accuracy on the held-out problems (for rm: held-out pairwise "
              "accuracy); pref acc: held-out pairs whose implicit reward ranks chosen above rejected;\n"
              "RM score: ppo's reward-model score of greedy held-out completions; reward: mean training reward "
              "(verifier for grpo/rloo/remax, reward model for ppo); "
              "KL: to the reference (to the teacher for distill).\n")
    text = "\n".join(table) + "\n\n" + legend
    print(text)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        rows = read(r)
        for ax, key in zip(axes, ("loss", "eval/accuracy")):
            pts = [(x["step"], x[key]) for x in rows if key in x]
            if pts:
                ax.plot(*zip(*pts), label=os.path.basename(r), marker="." if key != "loss" else None)
    for ax, key in zip(axes, ("training loss", "eval accuracy")):
        ax.set_xlabel("step"), ax.set_title(key), ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "compare.png"), dpi=100)


if __name__ == "__main__":
    main(sys.argv[1:])
