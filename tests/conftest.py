import os
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from util import ROOT, run  # noqa: E402

sys.path.insert(0, ROOT)

# torch.compile's on-disk caches do not key on ATEN_CPU_CAPABILITY: kernels generated for one CPU path and compiled
# for another fail to build ("'at::vec' has not been declared"). Imitating another CPU gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    cache = os.path.join(tempfile.gettempdir(), f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY']}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)


@pytest.fixture(scope="session")
def base():
    from common import toy
    toy.ensure("data")
    return toy.ensure("base")


@pytest.fixture(scope="session")
def tok(base):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(base)


@pytest.fixture(scope="session")
def model(base):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(base, attn_implementation="sdpa").eval()


@pytest.fixture(scope="session")
def sft_run(base, tmp_path_factory):
    """algos/sft.py with its defaults, once per session (also the starting point of rm)."""
    out = tmp_path_factory.mktemp("sft")
    run("sft", "--output_dir", out, "--save_every", 0)
    return out


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory):
    """algos/rm.py with its defaults on top of sft_run, once per session (the reward model of PPO)."""
    out = tmp_path_factory.mktemp("rm")
    run("rm", "--model", sft_run, "--output_dir", out, "--save_every", 0)
    return out
