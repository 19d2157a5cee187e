#!/usr/bin/env bash
# ./run.sh               set up .venv if needed, run the pipeline on the embedded default, print the comparison
#                        (SEEDS=3 ./run.sh: over seeds 0-2, mean ± std)
# ./run.sh test [args]   set up .venv if needed, run the test suite (pytest args pass through)
# ./run.sh bench         throughput and memory benchmarks
# ./run.sh study kl      the KL study: β sweep of grpo and ppo, gold accuracy and reward against KL
# ./run.sh study bon     best-of-N on the multi-step task: PRM, ORM, majority vote and the verifier at N = 1..64
#                        (SEEDS=3 ./run.sh study bon: over seeds 0-2, mean ± std)
# ./run.sh gpu           the GPU check (tests/gpu.py): every algorithm on CUDA, attention paths, 0.5B-shape throughput
# ./run.sh behaviour record DIR | compare A B   every script's metrics for a few steps, recorded before a change
#                        that moves code and compared after it (tests/behaviour.py)
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

# Runs in parallel lanes: the default model is tiny, so one thread per process trains as fast as several, and the
# lanes use the machine's cores instead. Each run's output goes to <output_dir>.log; a line reports its end.
step() {  # step NAME LOGFILE ALGO ARGS...: one run, its output in LOGFILE
  local name=$1 log=$2 t=$SECONDS; shift 2
  if algo "$@" > "$log" 2>&1; then
    echo "$(date +%H:%M:%S) $name done in $((SECONDS - t)) s"
  else
    echo "$(date +%H:%M:%S) $name FAILED, see $log" >&2; return 1
  fi
}

lanes() {  # lanes FN...: each function in a process of its own; fails if any failed
  local pids=() failed=0
  for fn in "$@"; do "$fn" & pids+=($!); done
  for p in "${pids[@]}"; do wait "$p" || failed=1; done
  return $failed
}

pipeline() {  # pipeline ROOT SEED: every method on the embedded default, outputs in ROOT/<run>
  r=$1 seed=(--seed "$2")
  export OMP_NUM_THREADS=1
  mkdir -p "$r"
  # (a script given its own --data evaluates only on an --eval_data it is given: here the embedded held-out set)
  held_out=(--eval_data runs/toy/data/eval.jsonl)
  $PY -c "from common import toy; toy.ensure('data'); toy.ensure('base'); toy.ensure('base_large')"
  rm -f "$r/sft.status"
  lanes lane_sft lane_distill   # the teacher needs no SFT model, so it trains beside sft
  rm -f "$r/sft.status"
  # WiSE-FT of grpo (a lane above) and TIES of the two specialists
  step merge_wiseft "$r/merge_wiseft.log" merge --sweep --base "$r/sft" --models "$r/grpo" \
    --output_dir "$r/merge_wiseft"
  step merge_ties "$r/merge_ties.log" merge --method ties --scale 0.5 --base "$r/sft" \
    --models "$r/sft_add" "$r/sft_sub" --output_dir "$r/merge_ties"
  # the specialists are judged on their own operation, their merges on both: accuracy by operation
  $PY -m common.report --by_operation "$r" sft sft_add sft_sub merge_ties merge_wiseft > "$r/by_operation.log" 2>&1 ||
    { echo "accuracy by operation FAILED, see $r/by_operation.log" >&2; return 1; }
}

lane_sft() {  # base -> SFT (the start of every run but the teacher), then two lanes from it
  if step sft "$r/sft.log" sft "${seed[@]}" --output_dir "$r/sft"; then
    echo 0 > "$r/sft.status"
  else
    echo 1 > "$r/sft.status"; return 1
  fi
  lanes lane_preferences lane_online
}

lane_preferences() {  # the reward model and PPO on it; offline preference methods; the two merge specialists
  from_sft() { step "$1" "$r/$1.log" "$1" "${seed[@]}" --model "$r/sft" --output_dir "$r/$1" "${@:2}"; }
  from_sft rm                                                # Bradley-Terry reward model (PPO's reward)
  from_sft ppo --reward_model "$r/rm"                        # RLHF: PPO on the learned reward
  for a in dpo ipo kto orpo simpo; do from_sft "$a"; done    # offline preference methods, from SFT
  for op in add sub; do                                      # specialists on one operation each (curated data)
    step "sft_$op" "$r/sft_$op.log" sft "${seed[@]}" --model "$r/sft" --data "runs/toy/data/sft_$op.jsonl" \
      --lr 1e-3 --max_steps 300 "${held_out[@]}" --output_dir "$r/sft_$op"
  done
}

lane_online() {  # online methods on the verifier, from SFT
  for a in grpo rloo remax online_dpo rft; do
    step "$a" "$r/$a.log" "$a" "${seed[@]}" --model "$r/sft" --output_dir "$r/$a"
  done
  step ppo_verifier "$r/ppo_verifier.log" ppo "${seed[@]}" --model "$r/sft" --reward verifier \
    --output_dir "$r/ppo_verifier"
}

lane_distill() {  # the teacher (the larger base, SFT on curated data), then each distillation mode from SFT
  # lr 1e-3 for the 4-layer model: sft's default 3e-3 left it below its own student on some seeds and machines
  # (the recipe's measurements: docs/results.md)
  step sft_large "$r/sft_large.log" sft "${seed[@]}" --model runs/toy/base_large --lr 1e-3 \
    --data runs/toy/data/sft_curated.jsonl --max_steps 1000 "${held_out[@]}" --output_dir "$r/sft_large"
  until [ -f "$r/sft.status" ]; do sleep 2; done   # the students start from SFT: wait for lane_sft's
  [ "$(cat "$r/sft.status")" = 0 ] || return 1
  for m in seqkd forward_kl reverse_kl on_policy; do
    step "distill_$m" "$r/distill_$m.log" distill "${seed[@]}" --mode "$m" --model "$r/sft" \
      --teacher "$r/sft_large" --output_dir "$r/distill_$m"
  done
}

case "${1:-}" in
  # two workers (pytest-xdist), one thread each (tests/conftest.py); -n 0 after it runs in one process, as -s needs
  test) shift; setup; $PY -m pytest -n 2 tests "$@" ;;
  bench)
    shift; setup
    # The peer, Hugging Face TRL, in an environment of its own (never needed by the project itself).
    if [ ! -x .venv-trl/bin/python ]; then
      { python3 -m venv .venv-trl && .venv-trl/bin/pip install --quiet torch==2.13.0 trl; } ||
        { echo "could not install TRL; measuring this project only"; rm -rf .venv-trl; }
    fi
    $PY tests/bench.py "$@"
    $PY tests/bench_dpo.py
    $PY tests/bench_grpo.py
    $PY tests/bench_lora.py
    # our losses against TRL's own loss code on the same tensors, where TRL has the same option
    if [ -x .venv-trl/bin/python ]; then .venv-trl/bin/python tests/trl_match.py || echo "trl_match: see above"; fi ;;
  study)
    # ./run.sh study kl: a sweep of the KL coefficient β for grpo (verifier) and ppo (reward model) from runs/sft,
    # plotted as gold accuracy and reward against KL to the reference (runs/study_kl.png, runs/study_kl/study_kl.md)
    shift; setup
    case "${1:-}" in kl | bon) ;; *) echo "error: unknown study '${1:-}' (available: kl, bon)" >&2; exit 2 ;; esac
    export OMP_NUM_THREADS=1
    if [ "$1" = bon ]; then
      # ./run.sh study bon: per seed, the policy (the distillation teacher, SFT for 300 more steps on the multi-step
      # task), a PRM on its Monte Carlo step labels, an ORM (rm.py) on pairs of its right and wrong solutions, and
      # best-of-N search with every judge (runs/study_bon.png, runs/study_bon/study_bon.md)
      $PY -c "from common import toy; toy.ensure('data'); toy.ensure('base_large')"
      study_bon() {  # study_bon SEED
        local r=runs/study_bon/seed$1 seed=(--seed "$1")
        mkdir -p "$r"
        [ -f "$r/sft_large/config.json" ] || step "teacher seed $1" "$r/sft_large.log" sft "${seed[@]}" \
          --model runs/toy/base_large --lr 1e-3 --data runs/toy/data/sft_curated.jsonl --max_steps 1000 \
          --eval_data runs/toy/data/eval.jsonl --output_dir "$r/sft_large"
        [ -f "$r/sft_chain/config.json" ] || step "sft_chain seed $1" "$r/sft_chain.log" sft "${seed[@]}" \
          --model "$r/sft_large" --lr 1e-3 --max_steps 300 --data runs/toy/data/chain_sft.jsonl \
          --eval_data runs/toy/data/chain_eval.jsonl --output_dir "$r/sft_chain"
        step "prm seed $1" "$r/prm.log" prm "${seed[@]}" --model "$r/sft_chain" --output_dir "$r/prm"
        step "orm pairs seed $1" "$r/orm_pairs.log" best_of_n "${seed[@]}" --policy "$r/sft_chain" \
          --pairs_out "$r/orm_pairs.jsonl"
        step "orm seed $1" "$r/orm.log" rm "${seed[@]}" --model "$r/sft_chain" --data "$r/orm_pairs.jsonl" \
          --max_steps 300 --output_dir "$r/orm"
        step "best-of-N seed $1" "$r/best_of_n.log" best_of_n "${seed[@]}" --policy "$r/sft_chain" \
          --prm "$r/prm" --orm "$r/orm" --output_dir "$r/best_of_n"
      }
      seeds=${SEEDS:-1} lane_seeds=()
      for ((lane = 0; lane < 2 && lane < seeds; lane++)); do  # two lanes, the seeds dealt out between them
        eval "bon_lane$lane() { for ((s = $lane; s < $seeds; s += 2)); do study_bon \$s; done; }"
        lane_seeds+=("bon_lane$lane")
      done
      lanes "${lane_seeds[@]}"
      $PY -m common.report --study_bon runs/study_bon
      exit 0
    fi
    [ -f runs/sft/config.json ] || step sft runs/sft.log sft
    [ -f runs/rm/config.json ] || step rm runs/rm.log rm
    mkdir -p runs/study_kl
    study_grpo() {
      for beta in ${GRPO_BETAS:-0.001 0.01 0.04 0.2 1}; do
        step "grpo β=$beta" "runs/study_kl/grpo_beta$beta.log" grpo --beta "$beta" --eval_every 25 \
          --output_dir "runs/study_kl/grpo_beta$beta"
      done
    }
    study_ppo() {
      for beta in ${PPO_BETAS:-0.01 0.05 0.2 0.5}; do
        step "ppo β=$beta" "runs/study_kl/ppo_beta$beta.log" ppo --beta "$beta" --eval_every 10 \
          --output_dir "runs/study_kl/ppo_beta$beta"
      done
    }
    lanes study_grpo study_ppo
    $PY -m common.report --study_kl runs/study_kl ;;
  behaviour) shift; setup; OMP_NUM_THREADS=1 $PY tests/behaviour.py "$@" ;;
  gpu)
    # A GPU machine usually brings its own torch and transformers: use them unless .venv exists.
    shift; [ -x "$PY" ] || PY=python3
    $PY -c "import torch, transformers" 2>/dev/null || {
      echo "error: $PY has no torch or transformers: run ./run.sh test once (it creates .venv), or install them" >&2
      exit 1; }
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
