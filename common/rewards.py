"""Rewards of sampled completions: the embedded verifier, or reward functions of your own (--reward_fn).

A reward function takes a completion's text and its record (every field of its data line) and returns a number:

    def correct(completion, record):
        return float(last_number(completion) == record["answer"])

`--reward_fn FILE.py:NAME[:WEIGHT]`, repeatable: a completion's reward is Σ_k w_k·f_k(completion, record), and each
f_k is logged as reward/NAME. Without it the reward is the embedded verifier (common/toy.py: the last integer of the
completion equals "answer"). The functions run on the host, one call a completion, on every process for its own
samples. The examples at the end of this file can be named directly, e.g.
`--reward_fn common/rewards.py:boxed --reward_fn common/rewards.py:think_format:0.2`.
"""
import importlib.util
import math
import numbers
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch

from common import data, toy


@dataclass
class Reward:
    name: str  # logged as reward/<name>
    fn: Callable  # fn(completion text, record) -> number
    weight: float
    source: str  # FILE.py, named in errors


def verifier(completion, record):
    """The embedded task's reward: 1 if the completion's last integer equals the record's "answer", else 0."""
    return toy.verify(completion, record["answer"])


def load_rewards(specs):
    """['FILE.py:NAME[:WEIGHT]', ...] -> [Reward]; [] -> the embedded verifier. A file that does not import or lacks
    the name is a one-line error here, before anything is written."""
    if not specs:
        return [Reward("correct", verifier, 1.0, "common/rewards.py")]
    out = []
    for spec in specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or not parts[0].endswith(".py") or not parts[1]:
            data.fail(f"--reward_fn {spec}: expected FILE.py:NAME or FILE.py:NAME:WEIGHT")
        path, name = parts[0], parts[1]
        try:
            weight = float(parts[2]) if len(parts) == 3 else 1.0
        except ValueError:
            data.fail(f"--reward_fn {spec}: the weight {parts[2]!r} is not a number")
        if not os.path.isfile(path):
            data.fail(f"--reward_fn {spec}: {path}: no such file")
        try:
            where = importlib.util.spec_from_file_location(f"reward_fn_{len(out)}", path)
            module = importlib.util.module_from_spec(where)
            where.loader.exec_module(module)
        except Exception as e:  # anything the file raises on import, reported in one line
            data.fail(f"--reward_fn {spec}: {path} does not import: {type(e).__name__}: {one_line(e)}")
        if not callable(getattr(module, name, None)):
            data.fail(f"--reward_fn {spec}: {path} has no function {name}")
        if name in [r.name for r in out]:
            data.fail(f"--reward_fn {spec}: a second reward named {name} (each is logged as reward/{name})")
        out.append(Reward(name, getattr(module, name), weight, path))
    return out


def one_line(e):
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def reward(rewards, texts, records, wheres, device):
    """-> (Σ_k w_k·f_k of each completion, {name: f_k of each completion}), tensors on device. A function that raises
    or returns what is not a finite number stops the run with one line naming it and the record (file:line)."""
    parts = {}
    for r in rewards:
        values = []
        for text, rec, where in zip(texts, records, wheres):
            try:
                v = r.fn(text, rec)
            except Exception as e:  # the user's code: any error, one line
                data.fail(f"reward {r.source}:{r.name} raised {type(e).__name__}: {one_line(e)} on {where}")
            if not isinstance(v, numbers.Real) or not math.isfinite(v):
                data.fail(f"reward {r.source}:{r.name} returned {v!r}, not a finite number, on {where}")
            values.append(float(v))
        parts[r.name] = torch.tensor(values, device=device)
    total = parts[rewards[0].name] * rewards[0].weight
    for r in rewards[1:]:
        total = total + r.weight * parts[r.name]
    return total, parts


# ---- Examples: reward functions for common answer formats ----

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def as_number(text):
    """'1,234' -> 1234.0, '3.50' -> 3.5; None when the text is no number."""
    try:
        return float(text.replace(",", "").strip())
    except (ValueError, AttributeError):
        return None


def final_number(completion, record):
    """1 if the last number in the completion equals the record's "answer" as a number (1,234 = 1234, 3.50 = 3.5)."""
    found = NUMBER.findall(completion)
    want = as_number(str(record["answer"]))
    return float(bool(found) and want is not None and as_number(found[-1]) == want)


def gsm8k(completion, record):
    """GSM8K's form: the number after the last '####' of the completion equals the one after '####' in the
    record's "answer" (the data set's reference solution ends '#### 42'), or the whole answer without one."""
    if "####" not in completion:
        return 0.0
    mine = as_number(completion.rsplit("####", 1)[1].split("\n")[0])
    ref = str(record["answer"])
    want = as_number(ref.rsplit("####", 1)[1] if "####" in ref else ref)
    return float(mine is not None and mine == want)


def last_boxed(text):
    """The content of the last \\boxed{...}, braces balanced; None without one."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def normalise_tex(s):
    """Light normalisation of a TeX answer: no spaces, no \\left \\right \\! \\, $ or trailing '.', dfrac and tfrac
    as frac, a leading '+' dropped."""
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("$", ""), ("dfrac", "frac"),
                     ("tfrac", "frac"), (" ", "")):
        s = s.replace(old, new)
    return s.rstrip(".").lstrip("+")


def boxed(completion, record):
    """MATH's form: the last \\boxed{} of the completion equals the record's "answer" (itself boxed or bare) after
    normalise_tex, or as a number."""
    mine, ref = last_boxed(completion), str(record["answer"])
    ref = last_boxed(ref) if "\\boxed{" in ref else ref
    if mine is None or ref is None:
        return 0.0
    mine, ref = normalise_tex(mine), normalise_tex(ref)
    return float(mine == ref or (as_number(mine) is not None and as_number(mine) == as_number(ref)))


THINK = re.compile(r"^\s*<think>.+?</think>\s*\S", re.DOTALL)


def think_format(completion, record):
    """A format reward: 1 if the completion reasons inside <think>...</think> and then answers, else 0."""
    return float(bool(THINK.match(completion)))
