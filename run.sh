#!/usr/bin/env bash
# ./run.sh               set up .venv if needed, run the pipeline on the embedded default, print the comparison
# ./run.sh test [args]   set up .venv if needed, run the test suite (pytest args pass through)
# ./run.sh bench         throughput and memory benchmarks
# ./run.sh gpu           the GPU check (tests/gpu.py): every algorithm on CUDA, attention paths, 0.5B-shape throughput
# ./run.sh <algo> [args] one algorithm, e.g. ./run.sh sft --max_steps 100; NPROC=2 ./run.sh sft runs it under torchrun
set -euo pipefail
cd "$(dirname "$0")"
PY=.venv/bin/python

setup() {
  if [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ]; then
    python3 -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
    # torch pinned to the release the README's figures were measured with (on CPU machines its CPU build);
    # requirements.txt states the lowest versions the code supports.
    .venv/bin/pip install --quiet torch==2.13.0 -r requirements.txt
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
    $PY tests/bench.py "$@"
    $PY tests/bench_dpo.py
    $PY tests/bench_grpo.py ;;
  gpu)
    # A GPU machine usually brings its own torch and transformers: use them unless .venv exists.
    shift; [ -x "$PY" ] || PY=python3
    $PY tests/gpu.py "$@" ;;
  "")
    setup
    algo sft                                   # base -> SFT (the start of everything below)
    algo rm                                    # Bradley-Terry reward model (PPO's reward)
    for a in dpo ipo kto orpo simpo; do algo "$a"; done        # offline preference methods, from runs/sft
    for a in grpo rloo remax ppo; do algo "$a"; done           # online RL, from runs/sft
    # distillation teacher: the larger base, SFT on curated data
    $PY -c "from common import toy; toy.ensure('base_large')"
    # (a script given its own --data evaluates only on an --eval_data it is given: here the embedded held-out set)
    held_out=(--eval_data runs/toy/data/eval.jsonl)
    algo sft --model runs/toy/base_large --data runs/toy/data/sft_curated.jsonl --max_steps 1000 "${held_out[@]}" \
      --output_dir runs/sft_large
    for m in seqkd forward_kl reverse_kl on_policy; do algo distill --mode "$m"; done
    # two specialists fine-tuned from runs/sft on the two operations (curated data), then merged by task vectors
    algo sft --model runs/sft --data runs/toy/data/sft_add.jsonl --lr 1e-3 --max_steps 300 "${held_out[@]}" \
      --output_dir runs/sft_add
    algo sft --model runs/sft --data runs/toy/data/sft_sub.jsonl --lr 1e-3 --max_steps 300 "${held_out[@]}" \
      --output_dir runs/sft_sub
    algo merge --sweep --base runs/sft --models runs/grpo --output_dir runs/merge_wiseft
    algo merge --method ties --scale 0.5 --base runs/sft --models runs/sft_add runs/sft_sub --output_dir runs/merge_ties
    $PY -m common.report runs/sft runs/rm runs/dpo runs/ipo runs/kto runs/orpo runs/simpo \
      runs/grpo runs/rloo runs/remax runs/ppo runs/sft_large \
      runs/distill_seqkd runs/distill_forward_kl runs/distill_reverse_kl runs/distill_on_policy \
      runs/sft_add runs/sft_sub runs/merge_wiseft runs/merge_ties
    ;;
  *) setup; algo "$@" ;;
esac
