#!/usr/bin/env bash
# The commonsense method comparison as run on the H200 (docs/benchmarks/commonsense.md), one stage per call:
#   bash docs/benchmarks/commonsense/run.sh sweep|final DEADLINE_SECONDS
#   bash docs/benchmarks/commonsense/run.sh jobs DEADLINE_SECONDS METHOD:SEED:LR[:KEY=VALUE,...] ...  # KEY=VALUE: rank settings of a variant
#   bash docs/benchmarks/commonsense/run.sh crosscheck - METHOD:SEED:LR ...  # trained jobs scored through PEFT
#   bash docs/benchmarks/commonsense/run.sh start DEADLINE_SECONDS METHOD:SEED:LR ...  # `jobs`, outliving the call
#   bash docs/benchmarks/commonsense/run.sh wait SECONDS  # in the next calls: wait for `start`'s jobs, return what they wrote so far
# BENCH is the directory `tools/bench_commonsense.py prepare` wrote (staged to the GPU machine); the results,
# the per-job logs and the ranks come back as $OUT/results.tgz; a results.tgz in the repo root is unpacked
# into a $BENCH that has no jobs yet (by every stage, `start` included), so a new machine goes on from them;
# a job that trained but was stopped while it evaluated comes back with its adapter, so there it only evaluates.
# At the deadline a training job saves a checkpoint and stops; the same command in a later call on the
# same machine (the checkpoints stay in $BENCH, outside the repo, while it is warm) resumes it.
# `start` runs `jobs` from a copy of the code (not of the venvs or staged data beside it) in a process session of its own, which runs on after the call
# returns while the machine stays warm (30 s after a call): a job longer than one call (AdaLoRA's cannot
# resume) then needs no resume, as long as a `wait` call follows each call at once. A `wait` call that came later
# lost four batches with the machine: where the jobs fit, prefer `jobs` ending within one call (two three-pass
# jobs side by side do). `wait` on a new machine stops at once (exit 3) rather than wait for jobs that are gone.
set -uo pipefail
stage=$1 deadline=$2; shift 2
BENCH=${BENCH:-/root/qlr-stage/bench}
DETACHED=${DETACHED:-/root/qlr-detached}
trained_only() {  # the saved adapter of each job that trained but was not evaluated (stopped while it evaluated)
  for t in jobs/*/trained.json; do
    [ -f "$t" ] && [ ! -f "${t%trained.json}result.json" ] && ls "$t" "${t%trained.json}"*.safetensors "${t%trained.json}"lrlora_adapter.json 2>/dev/null
  done
}
pack() {  # what the jobs in $BENCH wrote so far, finished or not, as $OUT/results.tgz
  (cd "$BENCH" && tar czf "$OUT/results.tgz" protocol.json \
    $(ls jobs/*/result.json jobs/*/permuted_ranks.json jobs/*/ranks.json jobs/*/ranks.png jobs/*/log.txt jobs/*/peft_crosscheck.json 2>/dev/null) \
    $(trained_only) 2>/dev/null)
}
if [ -f results.tgz ] && [ ! -d "$BENCH/jobs" ]; then tar xzf results.tgz -C "$BENCH"; fi
if [ "$stage" = start ]; then
  rm -rf "$DETACHED" && mkdir -p "$DETACHED/out" "$DETACHED/repo/docs/benchmarks/commonsense"
  cp -r qlrlora tools recipes "$DETACHED/repo/" && cp docs/benchmarks/commonsense/run.sh "$DETACHED/repo/docs/benchmarks/commonsense/"
  (cd "$DETACHED/repo" || exit 1
   OUT="$DETACHED/out" BENCH="$BENCH" PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$DETACHED/repo" \
     setsid nohup bash -c 'bash docs/benchmarks/commonsense/run.sh jobs "$@"; echo $? > "$OUT/finished"' _ "$deadline" "$@" \
     > "$DETACHED/out/console.log" 2>&1 < /dev/null &)
  echo "started: $DETACHED/out/console.log"; exit 0
fi
if [ "$stage" = wait ]; then
  if [ ! -d "$DETACHED/out" ]; then  # a new machine: waiting would spend the call's device time on nothing
    echo "run.sh wait: no jobs were started on this machine ($DETACHED/out is missing): it is a new one, and the jobs of the earlier start went back with the old one; stage again and start them again" >&2
    exit 3
  fi
  end=$((SECONDS + deadline)) packed=0
  until [ -f "$DETACHED/out/finished" ] || [ $SECONDS -ge $end ]; do  # every 30 s: a call cut short keeps it
    if [ $SECONDS -ge $((packed + 30)) ]; then cp "$DETACHED"/out/*.log "$OUT"/ 2>/dev/null; pack; packed=$SECONDS; fi
    sleep 5
  done
  cp "$DETACHED"/out/*.log "$OUT"/ 2>/dev/null; pack
  for f in "$BENCH"/jobs/*/log.txt; do echo "== $f"; tail -c 250 "$f" | tr '\r' '\n' | tail -2; done
  tail -n 12 "$DETACHED/out/console.log"
  if [ -f "$DETACHED/out/finished" ]; then echo "finished, exit $(cat "$DETACHED/out/finished")"; else echo "still running"; fi
  exit 0
fi
export QLRLORA_CACHE=${QLRLORA_CACHE:-/root/qlr-cache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [ -f "$BENCH/data/train.jsonl.gz" ]; then gunzip -f "$BENCH/data/train.jsonl.gz"; fi  # staged compressed
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if [ "$stage" = crosscheck ]; then
  python tools/bench_commonsense.py crosscheck "$BENCH" "$@" 2>&1 | tee "$OUT/$stage.log"
else
  if [ "$stage" = jobs ]; then which=(--jobs "$@"); else which=(--stage "$stage"); fi
  python tools/bench_commonsense.py run "$BENCH" "${which[@]}" --parallel "${PARALLEL:-9}" --deadline "$deadline" \
    2>&1 | tee "$OUT/$stage.log"
fi
pack
nvidia-smi --query-gpu=memory.used --format=csv,noheader
