"""Two CPU workers (gloo) through Ray Train's TorchTrainer run the same loop as one process."""

from __future__ import annotations

import json

import pytest

from training.checkpoint import read_state
from training.config import load_config
from training.launch import train_distributed

pytest_plugins = ["conftest_train"]


@pytest.mark.slow
def test_two_ddp_workers_stay_in_sync_on_disjoint_samples(kit, train_store, tmp_path, ray_local):
    stage = kit.tiny_stage("ddp", steps=3, save_every=3)
    run = kit.tiny_run(train_store, tmp_path / "runs", record_keys=True)
    cfg = load_config(str(kit.write_config(tmp_path / "s.toml", run, [stage])))
    finals = train_distributed(cfg, workers=2, cpus_per_worker=1, progress=False)

    state = read_state(finals["ddp"])
    assert state["world_size"] == 2 and state["step"] == 3
    # Every rank checksummed its parameters at the checkpoint: identical after 3 steps.
    sums = state["param_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert [d["rank"] for d in state["data"]] == [0, 1] and len(state["rng"]) == 2
    # The ranks read disjoint samples (3 steps × 2 < the 8 samples each rank owns per epoch).
    keys = {}
    for rank in (0, 1):
        lines = (
            (tmp_path / "runs" / "t" / "ddp" / "keys" / f"rank-{rank}.jsonl")
            .read_text()
            .splitlines()
        )
        keys[rank] = [k for line in lines for k in json.loads(line)["keys"]]
        assert len(keys[rank]) == 6 and len(set(keys[rank])) == 6
    assert not set(keys[0]) & set(keys[1])
    # global batch = 2 per worker × 2 workers
    metrics = [
        json.loads(x)
        for x in (tmp_path / "runs" / "t" / "ddp" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [m["step"] for m in metrics] == [1, 2, 3]
