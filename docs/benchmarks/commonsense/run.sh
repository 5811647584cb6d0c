#!/usr/bin/env bash
# The commonsense method comparison as run on the H200 (docs/benchmarks/commonsense.md), one stage per call:
#   bash docs/benchmarks/commonsense/run.sh sweep|final DEADLINE_SECONDS
#   bash docs/benchmarks/commonsense/run.sh jobs DEADLINE_SECONDS METHOD:SEED:LR ...
#   bash docs/benchmarks/commonsense/run.sh crosscheck - METHOD:SEED:LR ...  # trained jobs scored through PEFT
# BENCH is the directory `tools/bench_commonsense.py prepare` wrote (staged to the GPU machine); the results,
# the per-job logs and the ranks come back as $OUT/results.tgz, and a later call unpacks them again first.
# At the deadline a training job saves a checkpoint and stops; the same command in a later call on the
# same machine (the checkpoints stay in $BENCH, outside the repo, while it is warm) resumes it.
set -uo pipefail
stage=$1 deadline=$2; shift 2
BENCH=${BENCH:-/root/qlr-stage/bench}
export QLRLORA_CACHE=${QLRLORA_CACHE:-/root/qlr-cache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -f results.tgz ] && [ ! -d "$BENCH/jobs" ]; then tar xzf results.tgz -C "$BENCH"; fi
if [ -f "$BENCH/data/train.jsonl.gz" ]; then gunzip -f "$BENCH/data/train.jsonl.gz"; fi  # staged compressed
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$stage" = crosscheck ]; then
  python tools/bench_commonsense.py crosscheck "$BENCH" "$@" 2>&1 | tee "$OUT/$stage.log"
else
  if [ "$stage" = jobs ]; then which=(--jobs "$@"); else which=(--stage "$stage"); fi
  python tools/bench_commonsense.py run "$BENCH" "${which[@]}" --parallel "${PARALLEL:-9}" --deadline "$deadline" \
    2>&1 | tee "$OUT/$stage.log"
fi
(cd "$BENCH" && tar czf "$OUT/results.tgz" protocol.json $(ls permuted_ranks.json 2>/dev/null) \
  jobs/*/result.json jobs/*/ranks.json jobs/*/ranks.png jobs/*/log.txt $(ls jobs/*/peft_crosscheck.json 2>/dev/null) \
  2>/dev/null)
nvidia-smi --query-gpu=memory.used --format=csv,noheader
