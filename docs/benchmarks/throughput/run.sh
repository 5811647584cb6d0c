#!/usr/bin/env bash
# The runs of docs/benchmarks/throughput.md on one H200, one stage per device call (each under 10 minutes):
#   bash docs/benchmarks/throughput/run.sh mb8    # the 8B shape at micro-batch 8 x 2048, every configuration
#   bash docs/benchmarks/throughput/run.sh mb2    # GPU tests; micro-batch 2 x 2048
#   bash docs/benchmarks/throughput/run.sh seq24  # the longest sequence at micro-batch 1 within 24 GiB
#   RUNS=/root/qlr-runs2 bash docs/benchmarks/throughput/run.sh offload  # offloaded checkpoints, beside stock
#   RUNS=/root/qlr-runs3 bash docs/benchmarks/throughput/run.sh seq24fine  # the 24 GiB limits in finer steps
#   bash docs/benchmarks/throughput/run.sh unsloth  # Unsloth beside the stock stack (its site: UNSLOTH_SITE)
#   bash docs/benchmarks/throughput/run.sh unsloth24  # Unsloth's longest sequence within 24 GiB
#   RUNS=/root/qlr-runs7 bash docs/benchmarks/throughput/run.sh phases8  # a full-length learned-rank run, by phase
#   RUNS=/root/qlr-runs7 bash docs/benchmarks/throughput/run.sh phases2  # the same at micro-batch 2
#   RUNS=/root/qlr-runs7 bash docs/benchmarks/throughput/run.sh profile  # where a pruning step's time goes
#   RUNS=/root/qlr-runs9 bash docs/benchmarks/throughput/run.sh phases2r  # phases2 in two interleaved rounds
#   RUNS=/root/qlr-runs10 bash docs/benchmarks/throughput/run.sh cut2  # the frozen phase cut against uncut, micro-batch 2
#   RUNS=/root/qlr-runs11 ROUNDS=3 bash docs/benchmarks/throughput/run.sh cut8  # the same at micro-batch 8
#   RUNS=/root/qlr-runs12 ROUNDS=2 bash docs/benchmarks/throughput/run.sh dropout8  # dropout inside the adapter's node
#   RUNS=/root/qlr-runs12 ROUNDS=2 bash docs/benchmarks/throughput/run.sh dropout2  # the same at micro-batch 2
#   RUNS=/root/qlr-runs12 bash docs/benchmarks/throughput/run.sh dropout24  # its longest sequence within 24 GiB
#   RUNS=/root/qlr-runs13 bash docs/benchmarks/throughput/run.sh dropout1  # the three above cut to one call (CONFIGS: fewer)
#   RUNS=/root/qlr-runs4 bash docs/benchmarks/throughput/run.sh ckpt2  # checkpointing fewer blocks, micro-batch 2
#   RUNS=/root/qlr-runs4 bash docs/benchmarks/throughput/run.sh ckpt8  # the same at micro-batch 8
#   RUNS=/root/qlr-runs5 bash docs/benchmarks/throughput/run.sh cap24  # micro-batch 2 and 4, every run held to 24 GiB
# Stages add to the same OUT/throughput/throughput.json (kept on the warm machine under $RUNS); each call
# returns it and the logs as one archive.
set -uo pipefail
stage=$1
export QLRLORA_CACHE=${QLRLORA_CACHE:-/root/qlr-cache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
runs=${RUNS:-/root/qlr-runs}/throughput; out=${OUT:-/tmp/out}; mkdir -p "$runs" "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$runs/gpu.txt"
bench() { timeout "${STAGE_LIMIT:-530}" python -m qlrlora.throughput all "$runs" --timeout "${RUN_LIMIT:-240}" "$@" 2>&1 | tee -a "$runs/console.txt"; }
limits24() {  # each configuration's longest sequence in 24 GiB, from SEQ24_START (36,864) in steps of 4,096 (1.5x stock: 43,008)
  build=$(python -c "from qlrlora.assets import build_from_config; from qlrlora.throughput import LLAMA3_8B
print(build_from_config(LLAMA3_8B, 'bfloat16'))")
  mkdir -p "$runs/fine"
  for name in "$@"; do
    timeout "${RUN_LIMIT:-240}" python -m qlrlora.throughput max_seq "$name" --model-path "$build" --seq "${SEQ24_START:-36864}" \
      --seq-step 4096 --memory-gib 24 --json "$runs/fine/$name.json" --work "$runs/work" > "$runs/fine/$name.log" 2>&1
    echo "$name: exit $?"; cat "$runs/fine/$name.json"; echo
  done
}
case $stage in
mb8)
  bench --micro-batches 8 --steps 12 --max-seq ;;
mb2)
  python -m pytest -q -m gpu tests > "$runs/gpu_tests.log" 2>&1; tail -1 "$runs/gpu_tests.log"
  python -m pytest -q tests/test_adapter.py > "$runs/adapter_tests_cuda.log" 2>&1; tail -1 "$runs/adapter_tests_cuda.log"
  bench --micro-batches 2 --steps 16 --configs stock_peft qlr_fixed qlr_learned qlr_learned_liger --max-seq ;;
seq24)
  bench --micro-batches --configs --max-seq stock_peft qlr_learned ;;
seq24fine)  # between the doubling search's last success and first failure, in steps; straight max_seq runs
  build=$(python -c "from qlrlora.assets import build_from_config; from qlrlora.throughput import LLAMA3_8B
print(build_from_config(LLAMA3_8B, 'bfloat16'))")
  mkdir -p "$runs/fine"
  for spec in stock_peft:20480:4096 qlr_learned_liger:40960:8192; do
    IFS=: read -r name start step <<< "$spec"
    timeout "${RUN_LIMIT:-180}" python -m qlrlora.throughput max_seq "$name" --model-path "$build" --seq "$start" \
      --seq-step "$step" --memory-gib 24 --json "$runs/fine/$name.json" --work "$runs/work" > "$runs/fine/$name.log" 2>&1
    echo "$name: exit $?"; cat "$runs/fine/$name.json"; echo
  done ;;
offload)  # a separate RUNS: stock_peft measured again beside the offloaded runs
  bench --micro-batches 8 --steps 12 --configs stock_peft qlr_learned_offload qlr_learned_liger_offload --max-seq
  bench --micro-batches 2 --steps 16 --configs stock_peft qlr_learned_liger_offload \
    --max-seq qlr_learned_liger_offload qlr_learned_liger ;;
ckpt2)  # checkpointing 16 or none of the 32 blocks, beside the stock stack with and without checkpointing
  bench --micro-batches 2 --steps 16 --configs stock_peft stock_peft_ckpt0 stock_peft_liger_ckpt0 qlr_learned_liger \
    qlr_learned_liger_ckpt16 qlr_learned_liger_offload_ckpt16 qlr_learned_liger_ckpt0 --max-seq ;;
ckpt8)
  bench --micro-batches 8 --steps 12 --configs stock_peft stock_peft_ckpt0 qlr_learned_liger qlr_learned_liger_ckpt16 \
    qlr_learned_liger_offload_ckpt16 qlr_learned_liger_ckpt0 --max-seq ;;
cap24)  # ckpt2's micro-batch 2 runs in the other order, now held to a 24 GiB card; micro-batch 4 (the 24 GB recipe's)
  bench --cap-gib 24 --micro-batches 2 --steps 16 --configs qlr_learned_liger_offload_ckpt16 qlr_learned_liger_ckpt16 \
    stock_peft --max-seq
  bench --cap-gib 24 --micro-batches 4 --steps 12 --configs stock_peft qlr_learned_liger_offload_ckpt24 --max-seq ;;
unsloth)  # Unsloth's site goes first on PYTHONPATH for its own runs only; the stock stack keeps the image's
  site=${UNSLOTH_SITE:-/root/qlr-stage/unsloth}
  for spec in 8:12 2:16; do
    IFS=: read -r mb steps <<< "$spec"
    bench --micro-batches "$mb" --steps "$steps" --configs stock_peft --max-seq
    (export PYTHONPATH=$site:${PYTHONPATH:-}; bench --micro-batches "$mb" --steps "$steps" --configs unsloth --max-seq)
  done ;;
phases8|phases2)  # a full-length learned-rank run's phases, each at its own ranks, beside stock and the fixed rank
  bench --micro-batches "${stage#phases}" --steps 12 --configs stock_peft qlr_learning_at64_liger \
    qlr_learning_at28_liger qlr_frozen_at16_liger qlr_fixed_liger --max-seq ;;
phases2r)  # micro-batch 2, where the host bounds the step: two rounds, every configuration once per round
  bench --micro-batches 2 --steps 12 --rounds 2 --configs stock_peft qlr_learning_at64_liger \
    qlr_learning_at28_liger qlr_frozen_at16_liger qlr_fixed_liger --max-seq ;;
cut2|cut8)  # the frozen phase with its factors cut to the rank at the freeze, beside the same phase uncut
  bench --micro-batches "${stage#cut}" --steps 12 --rounds "${ROUNDS:-2}" --configs stock_peft qlr_frozen_at16_liger \
    qlr_frozen_at16_uncut_liger qlr_fixed_liger --max-seq ;;
dropout8|dropout2)  # dropout inside the adapter's node (the mask drawn again in the backward pass), beside stock
  bench --micro-batches "${stage#dropout}" --steps 12 --rounds "${ROUNDS:-2}" --configs stock_peft qlr_fixed_liger \
    qlr_learning_at64_liger qlr_learned_liger_offload --max-seq ;;
dropout24)  # the GPU tests; the 24 GiB limits of the learned ranks in steps of 4096 (1.5x the stock stack: 43,008)
  python -m pytest -q -m gpu tests > "$runs/gpu_tests.log" 2>&1; tail -1 "$runs/gpu_tests.log"
  limits24 qlr_learned_liger qlr_learned_liger_offload ;;
dropout1)  # when one call is all there is: the CUDA dropout test, micro-batch 2 once each, the offloaded limit
  python -m pytest -q tests/test_gpu.py > "$runs/gpu_tests.log" 2>&1; tail -1 "$runs/gpu_tests.log"
  # shellcheck disable=SC2086
  bench --micro-batches 2 --steps 12 --configs ${CONFIGS:-stock_peft qlr_fixed_liger qlr_learning_at64_liger \
    qlr_learned_liger_offload} --max-seq
  limits24 qlr_learned_liger_offload ;;
profile)  # one step of each rank phase traced (torch.profiler), learned ranks beside the rank fixed at 16
  bench --micro-batches 8 2 --steps 12 --configs qlr_learned_liger qlr_fixed_liger --max-seq --profile ;;
unsloth24)  # Unsloth's longest sequence at micro-batch 1 within 24 GiB (its site as for `unsloth`)
  (export PYTHONPATH=${UNSLOTH_SITE:-/root/qlr-stage/unsloth}:${PYTHONPATH:-}; bench --micro-batches --configs --max-seq unsloth) ;;
esac
[ -f "$runs/throughput.json" ] && python -m qlrlora.throughput report "$runs/throughput.json" > "$runs/report.md"
tar czf "$out/throughput-$stage.tgz" --exclude=work -C "$(dirname "$runs")" throughput
