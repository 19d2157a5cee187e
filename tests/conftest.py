import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from util import ROOT, command, run  # noqa: E402

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


# The slow session fixtures, name: (script, arguments): sft with its defaults, rm with its defaults on top of it, and
# sft on the multi-step task (the policy of prm and best-of-N), built in this order.
SLOW = {"sft": ("sft", []), "rm": ("rm", ["--model", "{dir}/sft"]),
        "sft_chain": ("sft", ["--data", "runs/toy/data/chain_sft.jsonl",
                              "--eval_data", "runs/toy/data/chain_eval.jsonl"])}
prebuild, stopping = [], threading.Event()  # the controller's running build, stopped at the end of the session


def pytest_configure(config):
    """Under pytest-xdist (-n 2), the controller, idle otherwise, trains the slow fixtures in the background as the
    session starts, so no worker waits for them while tests that need neither could run. The workers, started
    after this hook, inherit SUITE_FIXTURES and wait for the outputs there."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        if os.environ.get("SUITE_FIXTURES"):
            os.nice(5)  # the fixtures' build, which every later test waits for, goes first on a busy CPU
        return
    if not config.getoption("numprocesses", default=None):
        return
    os.environ["SUITE_FIXTURES"] = shared = tempfile.mkdtemp(prefix="suite-fixtures-")

    def build():
        for name, (script, args) in SLOW.items():
            out = os.path.join(shared, name)
            if stopping.is_set():
                return
            with open(f"{out}.log", "w") as log:
                prebuild[:] = [subprocess.Popen(command(script, *[a.format(dir=shared) for a in args], "--output_dir",
                                                        out, "--save_every", 0), cwd=ROOT, stdout=log, stderr=log)]
                status = prebuild[0].wait()
            open(f"{out}.done" if status == 0 else f"{out}.failed", "w").close()
            if status:
                return

    threading.Thread(target=build, daemon=True).start()


def pytest_collection_modifyitems(items):
    """Tests that need no slow fixture first, then those that need sft, then rm, then sft_chain (SLOW's order): the
    workers take tests in this order, so they rarely wait for a fixture still being built."""
    order = ("sft_run", "rm_run", "sft_chain_run")
    items.sort(key=lambda item: max((order.index(f) + 1 for f in item.fixturenames if f in order), default=0))


def pytest_unconfigure(config):
    if prebuild and os.environ.get("SUITE_FIXTURES") and not os.environ.get("PYTEST_XDIST_WORKER"):
        stopping.set()
        prebuild[0].kill()  # a session that needed neither fixture ends before they are built
        prebuild[0].wait()
        shutil.rmtree(os.environ["SUITE_FIXTURES"], ignore_errors=True)


def slow_fixture(tmp_path_factory, name, *extra):
    """The output directory of one of SLOW's runs: the controller's, waited for, under pytest-xdist; else run here."""
    shared = os.environ.get("SUITE_FIXTURES")
    if not shared:
        out = tmp_path_factory.mktemp(name)
        run(SLOW[name][0], *extra, "--output_dir", out, "--save_every", 0)
        return out
    out, needed = os.path.join(shared, name), list(SLOW)[:list(SLOW).index(name) + 1]  # those built before it too
    while not os.path.exists(f"{out}.done"):
        for failed in (n for n in needed if os.path.exists(os.path.join(shared, f"{n}.failed"))):
            with open(os.path.join(shared, f"{failed}.log")) as log:
                raise AssertionError(f"{failed} failed:\n{log.read()[-4000:]}")
        time.sleep(1)
    return pathlib.Path(out)


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
    return slow_fixture(tmp_path_factory, "sft")


@pytest.fixture(scope="session")
def rm_run(sft_run, tmp_path_factory):
    """algos/rm.py with its defaults on top of sft_run, once per session (the reward model of PPO)."""
    return slow_fixture(tmp_path_factory, "rm", "--model", sft_run)


@pytest.fixture(scope="session")
def sft_chain_run(base, tmp_path_factory):
    """algos/sft.py with its defaults on the multi-step task, once per session (the policy of prm and best-of-N)."""
    return slow_fixture(tmp_path_factory, "sft_chain", *SLOW["sft_chain"][1])
