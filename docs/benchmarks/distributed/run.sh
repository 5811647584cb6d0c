#!/usr/bin/env bash
# The distributed runs of docs/benchmarks/distributed.md, on a machine with two GPUs, one stage per call:
#   bash docs/benchmarks/distributed/run.sh llama8b   # Llama-3-8B-shaped, NF4: 1 GPU, FSDP2 on 2, longer sequences
#   bash docs/benchmarks/distributed/run.sh smollm2   # the SmolLM2 recipe: 1 GPU, FSDP2 on 1, DDP and FSDP2 on 2
#   bash docs/benchmarks/distributed/run.sh llama8b-more  # the same 8B shape under DDP, 64k and 128k tokens, GPU tests
# Every run is tools/benchmark_sft.py (one JSON per run: tokens/s, step time, peak memory of every
# process, losses, hard ranks) under `accelerate launch`; the JSONs and logs go to $OUT/<stage>/.
# SMOLLM2_DIR holds SmolLM2-135M-Instruct.Q4_1.gguf and ROWS the commonsense training rows (JSONL).
set -uo pipefail
stage=$1
here=docs/benchmarks/distributed
export QLRLORA_CACHE=${QLRLORA_CACHE:-/root/qlr-cache} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
out=${OUT:-/tmp/out}/$stage; mkdir -p "$out" runs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpus.txt"
launch() {  # NAME PROCESSES ACCELERATE_CONFIG(ddp|fsdp2|none) RECIPE OVERRIDES...
  local name=$1 processes=$2 config=$3 recipe=$4; shift 4
  local how=(--num_processes "$processes" --num_machines 1 --mixed_precision bf16 --dynamo_backend no)
  local devices=0,1; [ "$processes" = 1 ] && devices=0  # one process sees one GPU (Trainer would use DataParallel)
  [ "$config" != none ] && how=(--config_file "recipes/accelerate/$config.yaml" --num_processes "$processes")
  echo "== $name: accelerate launch ${how[*]} tools/benchmark_sft.py $recipe $*" | tee -a "$out/commands.txt"
  local start=$SECONDS
  CUDA_VISIBLE_DEVICES=$devices timeout "${RUN_LIMIT:-200}" python -m accelerate.commands.launch "${how[@]}" tools/benchmark_sft.py "$recipe" \
    --output.dir="runs/$name" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s" | tee -a "$out/commands.txt"
  [ -f "runs/$name/benchmark.json" ] && cp "runs/$name/benchmark.json" "$out/$name.json"
  [ -f "runs/$name/ranks.json" ] && cp "runs/$name/ranks.json" "$out/$name.ranks.json"
  grep -E "Error|error:|Traceback" "$out/$name.log" | tail -3
}
build() {  # the synthetic rows, and the random model once (cached), outside the timed runs
  python $here/rows.py runs/rows2k.jsonl 400 2040
  for k in 16 32 64 128; do python $here/rows.py runs/rows${k}k.jsonl 8 $((k * 1024 - 8)); done
  local start=$SECONDS
  python -c "from qlrlora.assets import build_from_config; from qlrlora.config import load_recipe
r = load_recipe('$here/llama3_8b_random.yaml'); print(build_from_config(r.model.init_config, r.model.dtype))" \
    > "$out/build.log" 2>&1; echo "build: exit $? after $((SECONDS - start)) s" | tee -a "$out/commands.txt"
}
case $stage in
llama8b)
  build
  launch tiny_fsdp2 2 fsdp2 recipes/tiny_cpu.yaml --train.use_cpu=false --train.bf16=true --model.quant_storage=bfloat16 --train.max_steps=8
  launch l8b_1gpu 1 none $here/llama3_8b_random.yaml --data.dataset=runs/rows2k.jsonl
  launch l8b_fsdp2 2 fsdp2 $here/llama3_8b_random.yaml --data.dataset=runs/rows2k.jsonl
  for length in 16384 32768; do
    launch l8b_fsdp2_mb1_$length 2 fsdp2 $here/llama3_8b_random.yaml --data.dataset=runs/rows$((length / 1024))k.jsonl \
      --train.per_device_train_batch_size=1 --train.max_length=$length --train.max_steps=3
  done ;;
smollm2)
  [ -f "$ROWS.gz" ] && gunzip -kf "$ROWS.gz"
  common=(--model.name_or_path="$SMOLLM2_DIR" --model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf --model.quant_storage=bfloat16
          --data.dataset="$ROWS" --data.max_samples=25600 --eval.before=false --eval.after=false --train.save_steps=100000
          --train.report_to=[] --train.logging_steps=5)
  recipe=recipes/smollm2_135m_commonsense.yaml
  launch smol_1gpu 1 none $recipe "${common[@]}"
  launch smol_fsdp2_1proc 1 fsdp2 $recipe "${common[@]}"
  launch smol_ddp 2 ddp $recipe "${common[@]}" --train.per_device_train_batch_size=128
  launch smol_fsdp2 2 fsdp2 $recipe "${common[@]}" --train.per_device_train_batch_size=128
  for name in smol_1gpu smol_fsdp2_1proc smol_ddp smol_fsdp2; do cp -r runs/$name/peft_adapter "$out/$name.peft" 2>/dev/null; done
  CUDA_VISIBLE_DEVICES=0 python -m pytest -q -m gpu tests > "$out/gpu_tests.log" 2>&1; tail -1 "$out/gpu_tests.log" ;;
llama8b-more)
  build
  CUDA_VISIBLE_DEVICES=0 python -m pytest -q -m gpu tests > "$out/gpu_tests.log" 2>&1; tail -1 "$out/gpu_tests.log"
  launch l8b_ddp 2 ddp $here/llama3_8b_random.yaml --data.dataset=runs/rows2k.jsonl
  for length in 65536 131072; do
    launch l8b_fsdp2_mb1_$length 2 fsdp2 $here/llama3_8b_random.yaml --data.dataset=runs/rows$((length / 1024))k.jsonl \
      --train.per_device_train_batch_size=1 --train.max_length=$length --train.max_steps=2
  done ;;
esac
tar czf "$out.tgz" -C "$(dirname "$out")" "$stage" && rm -rf "$out"  # one file: the machine returns a few files per call
