import fcntl
import os
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from util import ROOT, run  # noqa: E402

sys.path.insert(0, ROOT)

# torch.compile's on-disk caches do not key on ATEN_CPU_CAPABILITY: kernels generated for one CPU path and compiled
# for another fail to build ("'at::vec' has not been declared"). Imitating another CPU gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY"):
    cache = os.path.join(tempfile.gettempdir(), f"torchinductor_{os.environ['ATEN_CPU_CAPABILITY']}")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache)

# One thread per process, in this process and in every script a test starts (they inherit the environment): the
# suite runs on two workers (pytest-xdist, see run.sh), and the 0.44M-parameter default model trains as fast on one
# thread as on two. It also fixes the thread count, which otherwise follows the machine's cores and changes how
# reductions split, so the learning tests' calibration holds on machines with more cores.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)


def once(tmp_path_factory, name, build):
    """A directory built by build(path) once per test session: under pytest-xdist the workers share it (the first
    builds it under a lock, the others wait and reuse it), so a slow fixture is not trained once per worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp(name)
        build(path)
        return path
    shared = tmp_path_factory.getbasetemp().parent  # the same directory for every worker of this session
    path, done = shared / name, shared / f"{name}.done"
    with open(shared / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            path.mkdir(exist_ok=True)
            build(path)
            done.touch()
    return path


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
    return once(tmp_path_factory, "sft", lambda out: run("sft", "--output_dir", out, "--save_every", 0))


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory):
    """algos/rm.py with its defaults on top of sft_run, once per session (the reward model of PPO)."""
    return once(tmp_path_factory, "rm", lambda out: run("rm", "--model", sft_run, "--output_dir", out, "--save_every", 0))
