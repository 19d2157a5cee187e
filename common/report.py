"""Side-by-side comparison of runs from their metrics.jsonl: a table (printed and written to compare.md) and a
figure (compare.png): held-out accuracy per method at start and end, grouped by family, with error bars over seeds,
and per-family training curves against the fraction of training done.

    python -m common.report runs/sft runs/grpo ...                  one seed: each run is a directory
    python -m common.report --seeds runs/seed0 runs/seed1 -- sft grpo ...   runs/seed*/<name>, mean ± std over seeds
    python -m common.report --study_kl runs/study_kl                the KL study: runs/study_kl.png and a table
    python -m common.report --study_bon runs/study_bon              best-of-N: runs/study_bon.png and a table, mean ±
                                                                    std over the seed<i>/ it holds
    python -m common.report --by_operation runs sft sft_add ...     held-out accuracy of runs/<name> on additions and
                                                                    on subtractions, into runs/by_operation.json

A specialist (sft_add, sft_sub) is judged on its own operation and a merge of specialists on both: the table and the
figure show these runs by operation too when the roots hold by_operation.json.
"""
import json
import math
import os
import sys

# family: the methods it holds, in the order the table and figure show them; a run's name starts with its method
FAMILIES = {
    "imitation": ("sft", "rft"),
    "offline preference": ("dpo", "ipo", "kto", "orpo", "simpo"),
    "online RL": ("grpo", "rloo", "remax", "ppo", "online_dpo"),
    "distillation": ("distill",),
    "merging": ("merge",),
    "reward model": ("rm",),
}


def family(name):
    for fam, methods in FAMILIES.items():
        if any(name == m or name.startswith(m + "_") for m in methods):
            return fam
    return "other"


def read(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def values(rows, key):
    return [r[key] for r in rows if key in r]


def mean_std(xs):
    """-> (mean, sample std or None for a single value), or (None, None) without values."""
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    return m, (math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else None)


def fmt(xs, digits=3):
    m, s = mean_std(xs)
    if m is None:
        return "-"
    return f"{m:.{digits}f}" + (f" ± {s:.{digits}f}" if s is not None else "")


def summarise(seed_rows):
    """Per-run figures over seeds: accuracy (eval/accuracy; for rm its pairwise accuracy) at start and end, the gain,
    KL at the end (to the reference; distillation: to the teacher), wall time, tokens processed, peak memory."""
    def per_seed(fn):
        return [v for v in (fn(rows) for rows in seed_rows) if v is not None]

    def first(key):
        return lambda rows: (values(rows, key) or [None])[0]

    def last(key):
        return lambda rows: (values(rows, key) or [None])[-1]

    def tokens(rows):  # logged by none of the scripts as a total: Σ tokens/s x the time between metrics lines
        if values(rows, "tokens"):
            return values(rows, "tokens")[-1]
        timed = [(r["time"], r["tokens_per_s"]) for r in rows if "tokens_per_s" in r and "time" in r]
        return sum(tps * (t - prev) for (prev, _), (t, tps) in zip([(0.0, 0)] + timed, timed)) or None

    acc = [values(rows, "eval/accuracy") for rows in seed_rows]
    return {"start": per_seed(first("eval/accuracy")), "end": per_seed(last("eval/accuracy")),
            "gain": [a[-1] - a[0] for a in acc if len(a) > 1],
            "kl": per_seed(last("kl")), "time": per_seed(last("time")), "tokens": per_seed(tokens),
            "mem": per_seed(lambda rows: max(values(rows, "peak_mem_gb") or [None], key=lambda v: v or 0))}


OPERATIONS = {"+": "addition", "-": "subtraction"}


def by_operation(root, names):
    """Greedy held-out accuracy of each model root/<name> on the embedded held-out additions and subtractions
    separately and on all of them (toy.evaluate, split by the prompt's operator), written to root/by_operation.json."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common import toy
    with open(toy.data("eval.jsonl")) as f:
        records = [json.loads(line) for line in f]
    subsets = {op: [r for r in records if op in r["prompt"]] for op in OPERATIONS} | {"all": records}
    out = {}
    for name in names:
        path = os.path.join(root, name)
        tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path)
        out[name] = {op: toy.evaluate(model, tok, subset) for op, subset in subsets.items()}
        print(f"{name}: " + ", ".join(f"{OPERATIONS.get(op, op)} {acc:.3f}" for op, acc in out[name].items()))
    with open(os.path.join(root, "by_operation.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def read_by_operation(roots):
    """{name: {op: [accuracy per root]}} from the roots' by_operation.json (roots without one are skipped)."""
    merged = {}
    for root in roots:
        path = os.path.join(root, "by_operation.json")
        if os.path.exists(path):
            with open(path) as f:
                for name, accs in json.load(f).items():
                    for op, acc in accs.items():
                        merged.setdefault(name, {}).setdefault(op, []).append(acc)
    return merged


def operation_table(accuracies):
    lines = ["| run | additions | subtractions | all |", "|---|---|---|---|"]
    lines += [f"| {name} | " + " | ".join(fmt(accs.get(op, [])) for op in (*OPERATIONS, "all")) + " |"
              for name, accs in accuracies.items()]
    return ("\n".join(lines) + "\n\nby operation: greedy exact match on the held-out additions and subtractions "
            "separately (a specialist is judged on its own operation), and on all 256.\n")


def table(names, summaries, n_seeds):
    head = ["run", "family", "held-out acc start", "end", "gain", "KL end", "time s", "tokens", "peak mem GB"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for name in names:
        s = summaries[name]
        tokens = mean_std(s["tokens"])[0]
        cells = [name, family(name), fmt(s["start"]), fmt(s["end"]), fmt(s["gain"], 3), fmt(s["kl"], 3),
                 fmt(s["time"], 0), f"{tokens:.3g}" if tokens else "-", fmt(s["mem"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    seeds = f"mean ± std over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    legend = (f"held-out acc: greedy exact match on the 256 held-out problems ({seeds}); for rm: held-out pairwise "
              "accuracy. gain: end - start, per seed.\n"
              "KL end: the last logged per-token KL to the reference (to the teacher for distill; kto: its "
              "reference point z0, per sequence, clamped at 0);\n'-' where none is logged: sft and the offline "
              "methods sample nothing from the policy to estimate it on.\n"
              "time: wall seconds; tokens: tokens processed, Σ tokens/s x interval; peak mem: the largest logged.\n")
    return "\n".join(lines) + "\n\n" + legend


def colours(names):
    """Distinct colours within a family (tab10); families are told apart by their panels and labels."""
    import matplotlib.pyplot as plt
    cmap, out = plt.get_cmap("tab10"), {}
    for fam in FAMILIES | {"other": ()}:
        for i, name in enumerate(n for n in names if family(n) == fam):
            out[name] = cmap(i % 10)
    return out


def figure(names, seed_rows_by_name, summaries, path, operations=None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colour = colours(names)
    curve_families = [f for f in FAMILIES if f not in ("merging", "reward model")
                      and any(family(n) == f for n in names)]
    rows = 3 if operations else 2
    fig = plt.figure(figsize=(4.2 * max(len(curve_families), 3), 9.5 + 4 * (rows - 2)))
    grid = fig.add_gridspec(rows, max(len(curve_families), 1), height_ratios=[1, 1.1, 0.9][:rows], hspace=0.6,
                            wspace=0.3)

    # Summary: start (hollow) and end (filled) held-out accuracy per method, families separated, bars = std.
    ax = fig.add_subplot(grid[0, :])
    shown = [n for n in names if family(n) != "reward model" and summaries[n]["end"]]
    x, ticks, prev = 0, [], None
    for name in shown:
        if prev is not None and family(name) != family(prev):
            x += 0.8  # a gap between families
            ax.axvline(x - 0.9, color="0.85", lw=1)
        s = summaries[name]
        for key, face in (("start", "white"), ("end", colour[name])):
            m, sd = mean_std(s[key])
            if m is not None:
                ax.errorbar(x + (0.15 if key == "end" else -0.15), m, yerr=sd or 0, fmt="o", color=colour[name],
                            mfc=face, ms=7, capsize=3)
        ticks.append((x, name))
        x, prev = x + 1, name
    ax.set_xticks([t for t, _ in ticks], [n for _, n in ticks], rotation=35, ha="right")
    for fam in dict.fromkeys(family(n) for n in shown):
        xs = [t for t, n in ticks if family(n) == fam]
        ax.text(sum(xs) / len(xs), 1.02, fam, transform=ax.get_xaxis_transform(), ha="center", fontsize=9)
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("start (hollow) and end (filled) of each run" + (", error bars: std over seeds"
                 if max(len(summaries[n]["end"]) for n in shown or names) > 1 else ""), pad=18)
    ax.grid(axis="y", alpha=0.3)

    # Per-family curves against the fraction of training done, so 50- and 2000-step runs share an axis.
    for col, fam in enumerate(curve_families):
        ax = fig.add_subplot(grid[1, col])
        for name in (n for n in names if family(n) == fam):
            runs = [rows for rows in seed_rows_by_name[name] if len(values(rows, "eval/accuracy")) > 1]
            if not runs:
                continue
            rows = runs[0]  # the curve of the first seed; the summary above carries the spread
            steps = [r["step"] for r in rows if "eval/accuracy" in r]
            ax.plot([s / max(steps[-1], 1) for s in steps], values(rows, "eval/accuracy"), marker=".",
                    color=colour[name], label=name)
        ax.set_title(fam)
        ax.set_xlabel("fraction of training")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        if col == 0:
            ax.set_ylabel("held-out accuracy")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8, frameon=False)
    if operations:  # the specialists and merges on each operation, error bars over seeds
        ax = fig.add_subplot(grid[2, :])
        for i, (op, marker) in enumerate(zip((*OPERATIONS, "all"), "^sD")):
            label = {**OPERATIONS, "all": "all"}[op]
            for x, accs in enumerate(operations.values()):
                m, sd = mean_std(accs.get(op, []))
                if m is not None:
                    ax.errorbar(x + 0.2 * (i - 1), m, yerr=sd or 0, fmt=marker, color=f"C{i}", ms=7, capsize=3,
                                label=label if x == 0 else None)
        ax.set_xticks(range(len(operations)), list(operations))
        ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="by operation: specialists and merges")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def study_kl(root):
    """The KL-reward frontier (runs ROOT/<method>_beta<β>): for each run, its held-out gold (verifier) accuracy and its
    training reward against its KL to the reference, at every evaluation; the sequence KL is the logged per-token KL
    times the mean completion length. With a learned reward (ppo), gold accuracy can rise and then fall while the
    reward keeps rising as KL grows: reward over-optimisation (Gao et al. 2022, arXiv:2210.10760)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "metrics.jsonl")))
    methods = sorted({d.split("_beta")[0] for d in runs})
    fig, axes = plt.subplots(2, len(methods), figsize=(5.5 * len(methods), 8), squeeze=False)
    lines = ["| run | β | KL (nats/seq) | held-out gold accuracy | training reward |", "|---|---|---|---|---|"]
    for col, method in enumerate(methods):
        mine = sorted((d for d in runs if d.split("_beta")[0] == method), key=lambda d: float(d.split("_beta")[1]))
        cmap = plt.get_cmap("viridis")
        for i, d in enumerate(mine):
            rows, beta = read(os.path.join(root, d)), float(d.split("_beta")[1])
            train = [r for r in rows if "kl" in r and "response_length" in r]
            seq_kl = {r["step"]: r["kl"] * r["response_length"] for r in train}
            points = [(seq_kl.get(r["step"], 0.0), r["eval/accuracy"], r.get("reward/mean"))
                      for r in rows if "eval/accuracy" in r and (r["step"] == 0 or r["step"] in seq_kl)]
            reward = [(seq_kl[r["step"]], r["reward/mean"]) for r in train]
            colour = cmap(i / max(len(mine) - 1, 1))
            axes[0, col].plot(*zip(*[(k, a) for k, a, _ in points]), "o-", color=colour, label=f"β = {beta:g}")
            axes[1, col].plot(*zip(*reward), ".", color=colour, alpha=0.5, label=f"β = {beta:g}")
            last = train[-5:]
            lines.append(f"| {d} | {beta:g} | {sum(seq_kl[r['step']] for r in last) / len(last):.3f} | "
                         f"{points[0][1]:.3f} -> {points[-1][1]:.3f} | "
                         f"{sum(r['reward/mean'] for r in last) / len(last):.3f} |")
        reward_name = "reward-model score" if method.startswith("ppo") else "verifier reward"
        axes[0, col].set(title=f"{method}: gold accuracy against KL", ylabel="held-out gold (verifier) accuracy")
        axes[1, col].set(title=f"{method}: training reward against KL", ylabel=f"training {reward_name}")
        for ax in axes[:, col]:
            ax.set_xlabel("KL to the reference (nats per completion)")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(os.path.join(os.path.dirname(os.path.normpath(root)), "study_kl.png"), dpi=100, bbox_inches="tight")
    text = "\n".join(lines) + ("\n\nKL: the last five logged steps' mean; gold accuracy: held-out greedy, "
                               "start -> end; training reward: the last five logged steps' mean.\n")
    print(text)
    with open(os.path.join(root, "study_kl.md"), "w") as f:
        f.write(text)


JUDGES = {"verifier": "verifier (oracle)", "prm_min": "PRM, min", "prm_product": "PRM, product",
          "prm_last": "PRM, last step", "orm": "ORM (rm.py)", "majority": "majority vote"}


def study_bon(root):
    """Best-of-N (ROOT/seed<i>/best_of_n/best_of_n.json from algos/best_of_n.py): held-out accuracy of each judge's
    pick against N, mean ± std over the seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = sorted(d for d in os.listdir(root) if os.path.exists(os.path.join(root, d, "best_of_n", "best_of_n.json")))
    if not seeds:
        raise SystemExit(f"error: no {root}/seed*/best_of_n/best_of_n.json: run ./run.sh study bon")
    results = [json.load(open(os.path.join(root, d, "best_of_n", "best_of_n.json"))) for d in seeds]
    ns = results[0]["n"]
    judges = [j for j in JUDGES if all(j in r["accuracy"] for r in results)]
    acc = {j: {n: [r["accuracy"][j][str(n)] for r in results] for n in ns} for j in judges}
    lines = [f"| judge | {' | '.join(f'N = {n}' for n in ns)} |", "|---" * (len(ns) + 1) + "|"]
    lines += [f"| {JUDGES[j]} | {' | '.join(fmt(acc[j][n]) for n in ns)} |" for j in judges]
    learned = [j for j in judges if all(j in r.get("auroc", {}) for r in results)]
    lines += ["", "| judge | AUROC within a problem | AUROC pooled over problems |", "|---|---|---|"]
    lines += [f"| {JUDGES[j]} | {fmt([r['auroc'][j]['within'] for r in results])} | "
              f"{fmt([r['auroc'][j]['pooled'] for r in results])} |" for j in learned]
    text = "\n".join(lines) + (f"\n\nHeld-out accuracy of the solution each judge picks from N samples, and how "
                               f"well each learned judge ranks a right solution above a wrong one "
                               f"({results[0]['problems']} problems; {len(seeds)} seed(s): {', '.join(seeds)}).\n")
    print(text)
    with open(os.path.join(root, "study_bon.md"), "w") as f:
        f.write(text)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j in judges:
        means = [mean_std(acc[j][n])[0] for n in ns]
        stds = [mean_std(acc[j][n])[1] or 0.0 for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", capsize=3, label=JUDGES[j],
                    linestyle="--" if j == "verifier" else "-")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set(xlabel="N (solutions sampled per problem)", ylabel="held-out accuracy of the pick",
           title="best-of-N on the multi-step task")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.savefig(os.path.join(os.path.dirname(os.path.normpath(root)), "study_bon.png"), dpi=100, bbox_inches="tight")
    plt.close(fig)
    return acc


def main(argv):
    if argv[:1] == ["--study_kl"]:
        return study_kl(argv[1])
    if argv[:1] == ["--study_bon"]:
        return study_bon(argv[1])
    if argv[:1] == ["--by_operation"]:
        return by_operation(argv[1], argv[2:])
    if "--seeds" in argv:  # --seeds ROOT... -- NAME...
        split = argv.index("--")
        roots, names = argv[argv.index("--seeds") + 1:split], argv[split + 1:]
        out = os.path.commonpath(roots) if len(roots) > 1 else roots[0]
    else:
        roots, names, out = [None], [os.path.basename(os.path.normpath(r)) for r in argv], "runs"
        paths = dict(zip(names, argv))
    seed_rows = {}
    for name in names:
        dirs = [os.path.join(root, name) for root in roots] if roots != [None] else [paths[name]]
        rows = [read(d) for d in dirs if os.path.exists(os.path.join(d, "metrics.jsonl"))]
        if rows:
            seed_rows[name] = rows
    order = list(FAMILIES) + ["other"]  # grouped by family, in the given order within one
    names = sorted((n for n in names if n in seed_rows), key=lambda n: order.index(family(n)))
    summaries = {n: summarise(seed_rows[n]) for n in names}
    text = table(names, summaries, len(roots))
    operations = {n: accs for n, accs in read_by_operation(roots if roots != [None] else [out]).items()
                  if n in names}  # the runs compared, not every run the file holds
    if operations:
        text += "\n" + operation_table(operations)
    print(text)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text)
    figure(names, seed_rows, summaries, os.path.join(out, "compare.png"), operations)
    return summaries


if __name__ == "__main__":
    main(sys.argv[1:])
