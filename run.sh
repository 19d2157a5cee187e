#!/usr/bin/env bash
# ./run.sh               set up .venv if needed, run the pipeline on the embedded default, print the comparison
#                        (SEEDS=3 ./run.sh: over seeds 0-2, mean ± std)
# ./run.sh test [args]   set up .venv if needed, run the test suite (pytest args pass through)
# ./run.sh bench         throughput and memory benchmarks
# ./run.sh study kl      the KL study: β sweep of grpo and ppo, gold accuracy and reward against KL
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

# The runs of the pipeline, in the report's order.
RUNS=(sft rm dpo ipo kto orpo simpo grpo rloo remax ppo ppo_verifier online_dpo rft sft_large
      distill_seqkd distill_forward_kl distill_reverse_kl distill_on_policy sft_add sft_sub merge_wiseft merge_ties)

pipeline() {  # pipeline ROOT SEED: every method on the embedded default, outputs in ROOT/<run>
  local r=$1 seed=(--seed "$2")
  algo sft "${seed[@]}" --output_dir "$r/sft"                 # base -> SFT (the start of everything below)
  algo rm "${seed[@]}" --model "$r/sft" --output_dir "$r/rm"  # Bradley-Terry reward model (PPO's reward)
  for a in dpo ipo kto orpo simpo; do                         # offline preference methods, from SFT
    algo "$a" "${seed[@]}" --model "$r/sft" --output_dir "$r/$a"
  done
  for a in grpo rloo remax online_dpo rft; do                 # online methods on the verifier, from SFT
    algo "$a" "${seed[@]}" --model "$r/sft" --output_dir "$r/$a"
  done
  algo ppo "${seed[@]}" --model "$r/sft" --reward_model "$r/rm" --output_dir "$r/ppo"   # RLHF: the learned reward
  algo ppo "${seed[@]}" --model "$r/sft" --reward verifier --output_dir "$r/ppo_verifier"
  # distillation teacher: the larger base, SFT on curated data
  $PY -c "from common import toy; toy.ensure('base_large')"
  # (a script given its own --data evaluates only on an --eval_data it is given: here the embedded held-out set)
  local held_out=(--eval_data runs/toy/data/eval.jsonl)
  algo sft "${seed[@]}" --model runs/toy/base_large --data runs/toy/data/sft_curated.jsonl --max_steps 1000 \
    "${held_out[@]}" --output_dir "$r/sft_large"
  for m in seqkd forward_kl reverse_kl on_policy; do
    algo distill "${seed[@]}" --mode "$m" --model "$r/sft" --teacher "$r/sft_large" --output_dir "$r/distill_$m"
  done
  # two specialists fine-tuned from SFT on the two operations (curated data), then merged by task vectors
  for op in add sub; do
    algo sft "${seed[@]}" --model "$r/sft" --data "runs/toy/data/sft_$op.jsonl" --lr 1e-3 --max_steps 300 \
      "${held_out[@]}" --output_dir "$r/sft_$op"
  done
  algo merge --sweep --base "$r/sft" --models "$r/grpo" --output_dir "$r/merge_wiseft"
  algo merge --method ties --scale 0.5 --base "$r/sft" --models "$r/sft_add" "$r/sft_sub" --output_dir "$r/merge_ties"
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
  study)
    # ./run.sh study kl: a sweep of the KL coefficient β for grpo (verifier) and ppo (reward model) from runs/sft,
    # plotted as gold accuracy and reward against KL to the reference (runs/study_kl.png, runs/study_kl/study_kl.md)
    shift; setup
    [ "${1:-}" = kl ] || { echo "error: unknown study '${1:-}' (available: kl)" >&2; exit 2; }
    [ -f runs/sft/config.json ] || algo sft
    [ -f runs/rm/config.json ] || algo rm
    for beta in ${GRPO_BETAS:-0.001 0.01 0.04 0.2}; do
      algo grpo --beta "$beta" --eval_every 25 --output_dir "runs/study_kl/grpo_beta$beta"
    done
    for beta in ${PPO_BETAS:-0.01 0.05 0.2 0.5}; do
      algo ppo --beta "$beta" --eval_every 10 --output_dir "runs/study_kl/ppo_beta$beta"
    done
    $PY -m common.report --study_kl runs/study_kl ;;
  gpu)
    # A GPU machine usually brings its own torch and transformers: use them unless .venv exists.
    shift; [ -x "$PY" ] || PY=python3
    $PY tests/gpu.py "$@" ;;
  "")
    setup
    # SEEDS=N repeats the pipeline over seeds 0..N-1 into runs/seed<i>/ and reports mean ± std over them;
    # by default one seed (0) into runs/.
    seeds=${SEEDS:-1}
    if [ "$seeds" -gt 1 ]; then
      roots=(); for ((s = 0; s < seeds; s++)); do roots+=("runs/seed$s"); pipeline "runs/seed$s" "$s"; done
      $PY -m common.report --seeds "${roots[@]}" -- "${RUNS[@]}"
    else
      pipeline runs 0
      $PY -m common.report "${RUNS[@]/#/runs/}"
    fi
    ;;
  *) setup; algo "$@" ;;
esac
