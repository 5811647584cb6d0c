import json

import matplotlib.image
from torch import nn

from qlrlora.adapter import LRLoRALinear, Ranks
from qlrlora.config import RankConfig
from qlrlora.regularizer import RankController
from qlrlora.report import write_rank_report


def test_rank_report_json_and_plot(tmp_path):
    specs = [(f"model.layers.{i}.{proj}", r) for i in range(3)
             for proj, r in (("self_attn.q_proj", 2.0 + i), ("mlp.down_proj", 6.0 - i))]
    ranks = Ranks([8] * len(specs), [r for _, r in specs])
    layers = {name: LRLoRALinear(nn.Linear(16, 16), r_max=8, alpha=1.0, ranks=ranks, index=i)
              for i, (name, _) in enumerate(specs)}
    controller = RankController(layers, RankConfig(mode="budget", budget_avg_rank=3), total_steps=10)
    write_rank_report(tmp_path, controller)

    report = json.loads((tmp_path / "ranks.json").read_text())
    rows = {row["module"]: row for row in report["layers"]}
    assert rows["model.layers.1.self_attn.q_proj"] == {
        "module": "model.layers.1.self_attn.q_proj", "kind": "attention", "layer": 1, "r_max": 8, "rank": 3.0, "hard_rank": 3,
        "in_features": 16, "out_features": 16,
    }
    assert rows["model.layers.2.mlp.down_proj"]["kind"] == "mlp" and rows["model.layers.2.mlp.down_proj"]["hard_rank"] == 4
    summary = report["summary"]
    assert summary["mean_rank_attention"] == 3.0 and summary["mean_rank_mlp"] == 5.0
    assert summary["live_adapter_params"] == 32 * (2 + 3 + 4 + 6 + 5 + 4)
    assert summary["budget_adapter_params"] == 3 * 32 * 6

    image = matplotlib.image.imread(tmp_path / "ranks.png")
    assert image.shape[0] > 300 and image.shape[1] > 600
