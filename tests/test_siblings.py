"""The math copied across sibling files on purpose (each file reads alone) is one text: a fix to one copy must reach
every copy. Machinery is not copied (it is imported from common/), so only math is pinned here."""
import importlib
import inspect

import pytest

COPIES = {  # function -> the files that carry it; the first is the one the others must equal
    "kl_estimate": ["grpo", "rloo", "remax", "ppo"],
    "aggregate": ["grpo", "rloo", "remax"],
    "reinforce_loss": ["rloo", "remax"],
}  # online_dpo's dpo_loss, dpo.py's copy: tests/test_online_dpo.py


@pytest.mark.parametrize("name", COPIES)
def test_copies_are_one_text(name):
    first, *others = COPIES[name]
    want = inspect.getsource(getattr(importlib.import_module(f"algos.{first}"), name))
    for other in others:
        assert inspect.getsource(getattr(importlib.import_module(f"algos.{other}"), name)) == want, (name, other)


def test_no_algorithm_file_carries_machinery():
    """What common/ holds is imported, never redefined, in algos/: the fast log-prob path, sampling, model loading."""
    machinery = {"ChunkedLogps", "label_logps", "seq_logps", "token_logps", "collate", "generate", "bf16_sampler",
                 "group_rows", "sharing_pays", "completion_logps", "logps_entropy", "rm_scores", "distinct2",
                 "load_model", "load_tokenizer"}
    import glob
    import os

    from util import ROOT
    for path in sorted(glob.glob(os.path.join(ROOT, "algos", "*.py"))):
        name = os.path.basename(path)[:-3]
        defined = {n for n, obj in vars(importlib.import_module(f"algos.{name}")).items()
                   if getattr(obj, "__module__", None) == f"algos.{name}"}
        assert not defined & machinery, (name, defined & machinery)
