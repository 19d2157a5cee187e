#!/usr/bin/env bash
# ./run.sh               set up .venv if needed, run the pipeline on the embedded default, print the comparison
# ./run.sh test [args]   set up .venv if needed, run the test suite (pytest args pass through)
# ./run.sh bench         throughput and memory benchmarks
# ./run.sh <algo> [args] one algorithm, e.g. ./run.sh sft --max_steps 100; NPROC=2 ./run.sh sft runs it under torchrun
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

setup() {
  if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    .venv/bin/pip install --quiet -r requirements.txt
    touch .venv/.installed
  fi
}

algo() {
  local name=$1; shift
  [ -f "algos/$name.py" ] || { echo "error: no algorithm '$name' (see algos/)" >&2; exit 2; }
  if [ "${NPROC:-1}" -gt 1 ]; then
    .venv/bin/torchrun --standalone --nproc_per_node "$NPROC" "algos/$name.py" "$@"
  else
    $PY "algos/$name.py" "$@"
  fi
}

case "${1:-}" in
  test) shift; setup; $PY -m pytest tests "$@" ;;
  bench)
    shift; setup
    # The peer, Hugging Face TRL, in an environment of its own (never needed by the project itself).
    if [ ! -x .venv-trl/bin/python ]; then
      { python3 -m venv .venv-trl && .venv-trl/bin/pip install --quiet torch==2.13.0 trl; } ||
        { echo "could not install TRL; measuring this project only"; rm -rf .venv-trl; }
    fi
    $PY tests/bench.py "$@" ;;
  "")
    setup
    algo sft
    algo rm
    $PY -m common.report runs/sft runs/rm
    ;;
  *) setup; algo "$@" ;;
esac
