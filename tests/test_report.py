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


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb"])
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
