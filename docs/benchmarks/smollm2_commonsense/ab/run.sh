# A/B on the H200: main's adapter (.baseline) against the fused branch, then micro-batch sizes.
export QLRLORA_CACHE=/root/qlr-cache PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
mkdir -p $QLRLORA_CACHE/data && tar xJf /root/qlr-stage/csdata/cs.tar.xz -C $QLRLORA_CACHE/data
nvidia-smi --query-gpu=name,memory.total --format=csv
common="--model.name_or_path=/root/qlr-stage --model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf --data.max_samples=12800 --eval.before=false --eval.after=false --train.save_strategy=no --train.report_to=none --train.logging_steps=1000"
ab() { name=$1; shift; echo "== $name"; "$@" > /root/$name.log 2>&1; tail -3 /root/$name.log; cp /root/runs/$name/benchmark.json $OUT/$name.json; python -c "import json;d=json.load(open('$OUT/$name.json'));print('$name',d['train_seconds'],d['train_steps'],d['tokens_per_second'],d['peak_gpu_memory_allocated_gib'])"; }
ab base64 env PYTHONPATH=$PWD/.baseline:$PYTHONPATH python tools/benchmark_sft.py recipes/smollm2_135m_commonsense.yaml $common --output.dir=/root/runs/base64
ab fused64 python tools/benchmark_sft.py recipes/smollm2_135m_commonsense.yaml $common --output.dir=/root/runs/fused64
ab fused256 python tools/benchmark_sft.py recipes/smollm2_135m_commonsense.yaml $common --output.dir=/root/runs/fused256 --train.per_device_train_batch_size=256
ab base256 env PYTHONPATH=$PWD/.baseline:$PYTHONPATH python tools/benchmark_sft.py recipes/smollm2_135m_commonsense.yaml $common --output.dir=/root/runs/base256 --train.per_device_train_batch_size=256
python -m pytest -q -p no:cacheprovider tests/test_adapter.py tests/test_gpu.py 2>&1 | tail -15
