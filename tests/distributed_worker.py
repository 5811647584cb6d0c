"""One process of tests/test_distributed.py: the same tiny LR-LoRA training alone, under DDP, or under FSDP2.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py ddp|fsdp2 OUT_DIR
    python tests/distributed_worker.py single OUT_DIR

A plain PyTorch loop (accelerate's FSDP does not run on a CPU; torch's FSDP2 does, over gloo): every
step the global batch of 8 rows is split evenly between the processes, the controller averages the
ranks' gradient over them, and each process writes its loss and ranks at every step. At the end the
adapter is saved (gathered from the shards), the factors are zeroed, and the saved adapter is loaded
back into the (sharded) model: `reloaded` says whether every process got its factors back exactly.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from qlrlora.checkpoint import adapter_tensors, load_adapter, save_adapter
from qlrlora.config import AdapterConfig, RankConfig
from qlrlora.distributed import reduce_mean, shard_decoder_blocks
from qlrlora.model import inject_adapters
from qlrlora.regularizer import RankController

STEPS, BATCH, LENGTH = 12, 8, 16
CONFIG = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 128, "max_position_embeddings": 64}


def main(mode: str, out: Path) -> None:
    if mode != "single":
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if mode != "single" else (0, 1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG))
    adapter_config = AdapterConfig(r_max=8, alpha=4.0, dropout=0.0, dtype="float32")
    layers = inject_adapters(model, adapter_config)
    torch.manual_seed(1)
    with torch.no_grad():  # a trained-looking start, so that the ranks get a task gradient from the first step
        for layer in layers.values():
            layer.lora_B.normal_(std=0.02)
    controller = RankController(layers, RankConfig(mode="budget", budget_avg_rank=5, warmup_fraction=0.2,
                                                   freeze_fraction=0.8), STEPS)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        shard_decoder_blocks(model, init_device_mesh("cpu", (world,)))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = torch.Generator().manual_seed(2)
    history = []
    for step in range(STEPS):
        ids = torch.randint(0, CONFIG["vocab_size"], (BATCH, LENGTH), generator=data)
        local = ids.chunk(world)[rank]
        loss = model(input_ids=local, labels=local).loss
        loss.backward()
        controller.step(reduce=reduce_mean)
        optimizer.step()
        optimizer.zero_grad()
        history.append({"step": step + 1, "loss": float(reduce_mean(loss.detach())),
                        "ranks": controller.ranks.values.detach().tolist(), "phase": controller.phase})
    saved = adapter_tensors(layers)  # a collective under FSDP2
    if rank == 0:
        save_adapter(out / f"adapter-{mode}", layers, adapter_config, tensors=saved)
    if mode != "single":
        dist.barrier()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_A.zero_()
            layer.lora_B.zero_()
    load_adapter(out / f"adapter-{mode}", getattr(model, "module", model))
    reloaded = all(torch.equal(saved[k], v) for k, v in adapter_tensors(layers).items())
    history.append({"reloaded": reloaded})
    (out / f"{mode}-{rank}.json").write_text(json.dumps(history))
    if mode != "single":
        dist.barrier()  # gloo's teardown can hang when one process leaves while the other still tears down
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
