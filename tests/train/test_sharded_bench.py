"""bench/sharded.py's smoke mode: the backbone replicated (ZeRO-2), partitioned (ZeRO-3) and offloaded (ZeRO-3
offload_param), each in a process of its own with the job's DeepSpeed config, at a tiny width on the CPU: every mode
trains the same indexer from the same weights, so the losses agree, and every row has its ratio to the replicated
row."""
import json

import pytest

from bench import sharded


@pytest.mark.slow
def test_smoke_modes_train_alike(tmp_path):
    out = tmp_path / "sharded.json"
    sharded.main(["--smoke", "--layers", "2", "--reps", "1", "--warmup", "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert set(result["modes"]) == set(sharded.MODES) and not any("error" in m for m in result["modes"].values())
    zero = {mode: info["zero_optimization"] for mode, info in result["modes"].items()}
    assert zero["replicated"]["stage"] == 2 and zero["zero3"]["stage"] == 3
    assert zero["offload"]["offload_param"]["device"] == "cpu"
    layer = zero["zero3"]["stage3_prefetch_bucket_size"]  # 'auto' filled in from the model: one decoder layer
    assert isinstance(layer, int) and layer > 0 and zero["zero3"]["stage3_max_live_parameters"] == 2 * layer
    rows = {(r["mode"], r["stage"]): r for r in result["rows"]}
    assert len(rows) == len(sharded.MODES) * len(sharded.STAGES)
    for (mode, stage), row in rows.items():
        assert row["seconds"] > 0 and row["tokens_per_s"] > 0
        # warm-up and timed step of the same row, from the same weights and data: the same loss in every mode
        assert row["loss"] == pytest.approx(rows[("replicated", stage)]["loss"], rel=1e-4), (mode, stage)
    assert "x replicated" in sharded.table(result)
