"""Where metrics go: metrics.jsonl always (the source of truth), and the trackers --report_to names."""
import importlib.util
import json
import sys
import types

import pytest
from util import run

from common import data


class Recorder:
    """Stands in for a tracker: records every call made on it."""

    def __init__(self, *args, **kwargs):
        self.calls = [("init", args, kwargs)]

    def __getattr__(self, name):
        return lambda *args, **kwargs: self.calls.append((name, args, kwargs))


def test_metrics_go_to_tensorboard_and_jsonl(tmp_path, monkeypatch):
    writers = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda *a, **k: writers.append(Recorder(*a, **k)) or writers[-1]
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    metrics = data.Metrics(str(tmp_path), True, report_to="tensorboard")
    metrics.log(3, loss=0.5, **{"eval/accuracy": 0.25})
    (writer,) = writers
    assert writer.calls[0][1] == (str(tmp_path / "tensorboard"),)
    scalars = {args[0]: (args[1], args[2]) for name, args, _ in writer.calls if name == "add_scalar"}
    assert scalars["loss"] == (0.5, 3) and scalars["eval/accuracy"] == (0.25, 3) and "step" not in scalars
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["step"] == 3 and row["loss"] == 0.5 and row["eval/accuracy"] == 0.25


def test_metrics_go_to_wandb_from_rank_0_only(tmp_path, monkeypatch):
    runs = []
    fake = types.ModuleType("wandb")
    fake.init = lambda *a, **k: runs.append(Recorder(*a, **k)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", fake)
    data.Metrics(str(tmp_path / "rank1"), False, report_to="wandb").log(1, loss=1.0)
    assert not runs  # only the process that writes metrics.jsonl reports
    (tmp_path / "sft").mkdir()
    metrics = data.Metrics(str(tmp_path / "sft"), True, report_to="wandb", config={"lr": 0.1})
    metrics.log(7, loss=0.5, lr=0.1)
    (wandb_run,) = runs
    assert wandb_run.calls[0][2]["name"] == "sft" and wandb_run.calls[0][2]["config"] == {"lr": 0.1}
    (logged,) = [(args, kwargs) for name, args, kwargs in wandb_run.calls if name == "log"]
    assert logged[0][0] == {"loss": 0.5, "lr": 0.1, "time": logged[0][0]["time"]} and logged[1] == {"step": 7}


def test_metrics_go_to_trackio(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("trackio")
    for name in ("init", "log", "finish"):
        setattr(fake, name, lambda *a, _name=name, **k: calls.append((_name, a, k)))
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setenv("TRACKIO_PROJECT", "p")
    monkeypatch.setattr(data.atexit, "register", lambda fn: calls.append(("atexit", (fn,), {})))
    (tmp_path / "dpo").mkdir()
    data.Metrics(str(tmp_path / "dpo"), True, report_to="trackio", config={"beta": 0.1}).log(5, loss=0.25)
    assert calls[0] == ("init", (), {"project": "p", "name": "dpo", "config": {"beta": 0.1}, "resume": "allow"})
    assert calls[1] == ("atexit", (fake.finish,), {})
    name, args, kwargs = calls[2]
    assert name == "log" and args[0]["loss"] == 0.25 and kwargs == {"step": 5}


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio"])
def test_a_missing_tracker_package_is_a_one_line_error(tracker, tmp_path):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    p = run("sft", "--report_to", tracker, "--output_dir", tmp_path / "out", check=False)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: --report_to {tracker} needs the '{tracker}' package")
    assert not (tmp_path / "out").exists()


def test_tensorboard_event_files_when_installed(base, tmp_path):
    if importlib.util.find_spec("tensorboard") is None:
        pytest.skip("tensorboard is not installed (an optional package)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run("sft", "--max_steps", 4, "--log_every", 2, "--eval_every", 0, "--save_every", 0, "--report_to", "tensorboard",
        "--output_dir", tmp_path / "out")
    events = EventAccumulator(str(tmp_path / "out" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]


def test_comparison_over_seeds_mean_std_and_figure(tmp_path):
    """Two seeds of two runs: the table's cells are mean ± sample std over seeds, the runs are grouped by family
    (a 2000-step and a 50-step run side by side), and the figure is written."""
    from common import report
    curves = {"sft": {0: [0.0, 0.2], 1: [0.0, 0.3]}, "dpo": {0: [0.2, 0.3], 1: [0.3, 0.5]}}
    for name, by_seed in curves.items():
        for seed, (start, end) in by_seed.items():
            (tmp_path / f"seed{seed}" / name).mkdir(parents=True)
            steps = {"sft": 2000, "dpo": 50}[name]
            rows = [{"step": 0, "eval/accuracy": start}, {"step": steps, "eval/accuracy": end, "kl": 0.1 * (seed + 1),
                                                          "time": 10.0, "tokens": 1000, "peak_mem_gb": 0.5}]
            (tmp_path / f"seed{seed}" / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    roots = [str(tmp_path / "seed0"), str(tmp_path / "seed1")]
    summaries = report.main(["--seeds", *roots, "--", "dpo", "sft", "missing"])
    assert summaries["dpo"]["gain"] == pytest.approx([0.1, 0.2]) and "missing" not in summaries
    table = (tmp_path / "compare.md").read_text().splitlines()
    assert table[2].startswith("| sft | imitation | 0.000 ± 0.000 | 0.250 ± 0.071 | 0.250 ± 0.071 | 0.150 ± 0.071")
    assert table[3].startswith("| dpo | offline preference | 0.250 ± 0.071 | 0.400 ± 0.141 | 0.150 ± 0.071")
    assert (tmp_path / "compare.png").stat().st_size > 10000
    assert report.family("distill_on_policy") == "distillation" and report.family("ppo_verifier") == "online RL"


def test_specialists_by_operation_over_seeds(tmp_path):
    """by_operation.json in each seed's root (the accuracy of each model on additions, subtractions and all): the
    comparison adds a table of them, mean ± sample std over the seeds that hold one, and the figure a panel."""
    from common import report
    accs = {"seed0": {"sft_add": {"+": 0.7, "-": 0.1, "all": 0.4}, "merge_ties": {"+": 0.5, "-": 0.5, "all": 0.5}},
            "seed1": {"sft_add": {"+": 0.8, "-": 0.2, "all": 0.5}}}
    for root, by_name in accs.items():
        (tmp_path / root / "sft").mkdir(parents=True)
        (tmp_path / root / "sft" / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.4}) + "\n")
        (tmp_path / root / "by_operation.json").write_text(json.dumps(by_name))
    for root in accs:
        for name in ("sft_add", "merge_ties"):
            (tmp_path / root / name).mkdir()
            (tmp_path / root / name / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/accuracy": 0.4}) + "\n")
    report.main(["--seeds", str(tmp_path / "seed0"), str(tmp_path / "seed1"), "--", "sft", "sft_add", "merge_ties"])
    lines = (tmp_path / "compare.md").read_text().splitlines()
    assert "| sft_add | 0.750 ± 0.071 | 0.150 ± 0.071 | 0.450 ± 0.071 |" in lines
    assert "| merge_ties | 0.500 | 0.500 | 0.500 |" in lines  # one seed: no spread
    assert (tmp_path / "compare.png").stat().st_size > 10000


def test_by_operation_splits_the_held_out_evaluation(sft_run, tmp_path):
    """The accuracy on all held-out problems is the sft run's own final evaluation, and the count-weighted mean of
    the accuracies on additions and on subtractions."""
    from common import report, toy
    (tmp_path / "sft").symlink_to(sft_run)
    accs = report.by_operation(str(tmp_path), ["sft"])["sft"]
    assert json.loads((tmp_path / "by_operation.json").read_text()) == {"sft": accs}
    with open(toy.data("eval.jsonl")) as f:
        n_add = sum("+" in json.loads(line)["prompt"] for line in f)
    assert accs["all"] == pytest.approx((n_add * accs["+"] + (256 - n_add) * accs["-"]) / 256, abs=1e-6)
    assert accs["all"] == pytest.approx(report.values(report.read(sft_run), "eval/accuracy")[-1], abs=1e-6)
    assert accs["+"] != accs["-"]  # the habit is on subtractions only
