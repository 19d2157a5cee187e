"""Data I/O: JSONL records validated with one-line errors, and the metrics writer.

Every error raised here is a SystemExit carrying one line, `error: <file>:<line>: <what>`, so a
script stops with exit status 1 before it has created any output.
"""
import atexit
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import sys
import time
import typing

from tqdm import tqdm

ROLES = ("system", "user", "assistant", "tool")


def fail(msg):
    raise SystemExit(f"error: {msg}")


def read_jsonl(path):
    """[(where, record)] from a local JSONL file, or a Hugging Face dataset name (needs `datasets`)."""
    if not os.path.exists(path):
        try:
            import datasets
        except ImportError:
            fail(f"{path}: no such file (install `datasets` to load a hub dataset by name)")
        return [(f"{path}:{i + 1}", dict(r)) for i, r in enumerate(datasets.load_dataset(path, split="train"))]
    if os.path.isdir(path):
        fail(f"{path}: is a directory, expected a JSONL file")
    out = []
    try:
        f = open(path, "rb")
    except OSError as e:
        fail(f"{path}: cannot read ({e.strerror})")
    with f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                fail(f"{path}:{i}: invalid UTF-8 (byte {e.start + 1} of the line)")
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                fail(f"{path}:{i}: malformed JSON ({e.msg} at column {e.colno})")
            if not isinstance(rec, dict):
                fail(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
            out.append((f"{path}:{i}", rec))
    if not out:
        fail(f"{path}: no records (empty file)")
    return out


def field(rec, where, name, types):
    if name not in rec:
        fail(f"{where}: missing field '{name}'")
    if not isinstance(rec[name], types) or (types is not bool and isinstance(rec[name], bool)):
        names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        fail(f"{where}: field '{name}' must be {names}, got {type(rec[name]).__name__}")
    return rec[name]


def messages(value, where, name, default_role):
    """A string or a list of {"role", "content"} messages -> a validated message list."""
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list) or not value:
        fail(f"{where}: field '{name}' must be a string or a non-empty list of messages")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            fail(f"{where}: field '{name}[{j}]' must be an object with a string 'content'")
        if m.get("role") not in ROLES:
            fail(f"{where}: field '{name}[{j}].role' is {m.get('role')!r}, expected one of {', '.join(ROLES)}")
    return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation(rec, where):
    """SFT record -> messages: {"messages": [...]} or {"prompt": ..., "completion": ...}."""
    if "messages" in rec:
        msgs = messages(rec["messages"], where, "messages", "user")
    else:
        prompt = messages(field(rec, where, "prompt", (str, list)), where, "prompt", "user")
        msgs = prompt + messages(field(rec, where, "completion", (str, list)), where, "completion", "assistant")
    if not any(m["role"] == "assistant" for m in msgs):
        fail(f"{where}: field 'messages' has no assistant turn (nothing to learn from)")
    return msgs


def preference(rec, where):
    """Pair record -> (prompt messages, chosen messages, rejected messages)."""
    prompt = messages(field(rec, where, "prompt", (str, list)), where, "prompt", "user")
    chosen = messages(field(rec, where, "chosen", (str, list)), where, "chosen", "assistant")
    rejected = messages(field(rec, where, "rejected", (str, list)), where, "rejected", "assistant")
    if chosen == rejected:
        fail(f"{where}: fields 'chosen' and 'rejected' are identical")
    for name, resp in (("chosen", chosen), ("rejected", rejected)):
        if not resp[-1]["content"].strip():
            fail(f"{where}: field '{name}' is an empty completion")
    return prompt, chosen, rejected


POSITIVE = ("max_len", "batch_size", "grad_accum", "epochs", "log_every", "group_size", "max_new_tokens",
            "num_iterations", "ppo_epochs", "num_samples", "rounds", "rollouts",
            "gen_batch_size")  # counts and sizes that must be at least 1
NON_NEGATIVE = ("max_steps", "eval_every", "save_every", "dynamic_sampling", "overlong_penalty", "tis_cap",
                "rpo_alpha", "lora_r", "num_prompts")  # 0 has a meaning of its own (see each Args)
TRACKERS = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb",
            "trackio": "trackio"}  # --report_to: name -> its optional package


def resolve(choice, auto):
    """A true|false|auto option -> bool, `auto` deciding the last."""
    return choice == "true" or (choice == "auto" and auto)


def gathered(argv, flags):
    """A list option given more than once (`--reward_fn a --reward_fn b`) -> once, with every value (`a b`):
    argparse would keep only the last."""
    values, order, i = {}, [], 0
    while i < len(argv):
        j = i + 1
        if argv[i] in flags:
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            if argv[i] not in values:
                order.append(argv[i])
            values.setdefault(argv[i], []).extend(argv[i + 1:j])
        else:
            order.append(argv[i])
        i = j
    return [x for a in order for x in ([a, *values[a]] if a in values else [a])]


def parse(cls, argv=None):
    """Args dataclass <- command line, through transformers' HfArgumentParser, with what it lacks:
    - `--help` shows each field's comment from the source (`name: type = default  # meaning`) and its default;
    - an unknown or mistyped argument is argparse's one-line usage error (exit status 2), not a traceback;
    - a field typed `Literal["a", "b"]` takes only those values: `--name must be one of a, b, got 'c'`;
    - `--epochs N` given without `--max_steps` runs N epochs (max_steps 0) instead of the default step budget;
    - counts and sizes that must be positive are checked, each with a one-line error;
    - `--merge_lora` without adapters (`--lora_r 0`) is refused here, before any model or data is loaded;
    - a list option may be repeated: `--reward_fn a.py:f --reward_fn b.py:g` gives both."""
    from transformers import HfArgumentParser

    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    argv = gathered(argv, {f"--{f.name}" for f in dataclasses.fields(cls) if typing.get_origin(f.type) is list})
    source = inspect.getsource(cls)
    helps = dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, flags=re.M))
    parser = HfArgumentParser(cls)

    def error(message):  # one line, not argparse's usage block
        choice = re.match(r"argument --(\w+)[^:]*: invalid choice: '(.*)' \(choose from (.*)\)", message)
        if choice:  # a Literal-typed field: the same words as every other choice
            message = f"--{choice[1]} must be one of {choice[3].replace(chr(39), '')}, got '{choice[2]}'"
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)

    parser.error = error
    parser.description = (inspect.getmodule(cls).__doc__ or "").split("\n\n")[0]
    for action in parser._actions:
        if action.dest in helps:
            action.help = helps[action.dest].replace("%", "%%") + " (default: %(default)s)"
    ns = parser.parse_args(argv)
    args = cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)})
    given = {a.split("=")[0] for a in argv if a.startswith("--")}
    if "--epochs" in given and "--max_steps" not in given and hasattr(args, "max_steps"):
        args.max_steps = 0
    report_to = getattr(args, "report_to", "none")
    if report_to not in TRACKERS:
        parser.error(f"--report_to must be one of {', '.join(TRACKERS)}, got '{report_to}'")
    if TRACKERS[report_to] and importlib.util.find_spec(TRACKERS[report_to]) is None:
        parser.error(f"--report_to {report_to} needs the '{TRACKERS[report_to]}' package (pip install it)")
    for name in POSITIVE + NON_NEGATIVE:
        value, least = getattr(args, name, None), int(name in POSITIVE)
        if value is not None and value < least:
            parser.error(f"--{name} must be {'positive' if least else 'non-negative'}, got {value}")
    if getattr(args, "merge_lora", False) and not getattr(args, "lora_r", 0):
        parser.error("--merge_lora needs --lora_r > 0: without adapters the saved model is already whole")
    return args


class Metrics:
    """metrics.jsonl (one object per logged step, the source of truth) plus one human-readable line; rank 0 only.
    report_to="tensorboard" also writes event files to output_dir/tensorboard, "wandb" logs to a Weights & Biases
    run (offline with WANDB_MODE=offline), "trackio" to a local Trackio project (TRACKIO_PROJECT, default
    "post-training"; the dashboard: `trackio show`; nothing leaves the machine unless its settings ask); all
    optional packages, checked by parse() before anything runs."""

    def __init__(self, output_dir, enabled, resume_step=0, report_to="none", config=None):
        self.enabled, self.path, self.t0 = enabled, os.path.join(output_dir, "metrics.jsonl"), time.time()
        if enabled and resume_step and os.path.exists(self.path):  # drop what a killed run logged past its checkpoint
            with open(self.path) as f:
                keep = [ln for ln in f if json.loads(ln).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(keep)
        elif enabled and os.path.exists(self.path):
            os.remove(self.path)
        self.tensorboard = self.wandb = self.trackio = None
        if enabled and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"), purge_step=resume_step or None)
        elif enabled and report_to == "wandb":
            import wandb
            name = os.path.basename(os.path.normpath(output_dir))
            self.wandb = wandb.init(name=name, dir=output_dir, config=config, resume="allow")
        elif enabled and report_to == "trackio":
            import trackio
            name = os.path.basename(os.path.normpath(output_dir))
            trackio.init(project=os.environ.get("TRACKIO_PROJECT", "post-training"), name=name, config=config,
                         resume="allow")
            self.trackio = trackio
            atexit.register(trackio.finish)  # its logging thread flushes at finish

    def log(self, step, **m):
        if not self.enabled:
            return
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in m.items()}}
        row["time"] = round(time.time() - self.t0, 2)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        tqdm.write(line)
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tensorboard:
            for k, v in scalars.items():
                self.tensorboard.add_scalar(k, v, step)
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=step)
        if self.trackio:
            self.trackio.log(scalars, step=step)


def unpaired(rec, where):
    """KTO record -> [(prompt, completion, desirable)]: {"prompt", "completion", "label": bool},
    or a pair split in two."""
    if "chosen" in rec or "rejected" in rec:
        prompt, chosen, rejected = preference(rec, where)
        return [(prompt, chosen, True), (prompt, rejected, False)]
    prompt = messages(field(rec, where, "prompt", (str, list)), where, "prompt", "user")
    completion = messages(field(rec, where, "completion", (str, list)), where, "completion", "assistant")
    label = field(rec, where, "label", bool)
    if not completion[-1]["content"].strip():
        fail(f"{where}: field 'completion' is an empty completion")
    return [(prompt, completion, label)]
