"""Two processes (torchrun, gloo on the CPU): identical weights on both ranks, disjoint images per epoch.

On a CPU-only machine ``accelerate launch --cpu --num_processes 2`` starts a single process (its multi-CPU mode
needs mpirun); ``torchrun --nproc_per_node 2`` starts two and accelerate picks them up.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_two_processes_train_in_step_on_disjoint_images(prepared, tmp_path):
    model, train_dir, meta = prepared("sd1", False)
    out = tmp_path / "out"
    run = torchrun(str(ROOT / "tests" / "train" / "ddp_worker.py"), str(model), str(train_dir), str(meta), str(out),
                   cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # gradients were averaged: the same weights everywhere
    assert ranks[0]["steps"] == ranks[1]["steps"] == 5
    for epoch in {s["epoch"] for s in ranks[0]["seen"]}:
        mine = [k for s in ranks[0]["seen"] if s["epoch"] == epoch for k in s["keys"]]
        theirs = [k for s in ranks[1]["seen"] if s["epoch"] == epoch for k in s["keys"]]
        assert not set(mine) & set(theirs)  # never the same image on both ranks in one epoch
    # a full epoch covers every image: 6 images in 2 buckets of 3, batch 2 -> 4 batches, 2 steps per rank
    epoch0 = [k for r in ranks for s in r["seen"] if s["epoch"] == 0 for k in s["keys"]]
    assert sorted(epoch0) == sorted(f"img{i:02d}\x000" for i in range(6))
    assert (out / "last.safetensors").is_file()  # rank 0 wrote the model


@pytest.mark.slow
def test_torchrun_module_cli(prepared, tmp_path):
    model, train_dir, meta = prepared("sd1", False)
    run = torchrun("-m", "sdtune", "train", "--pretrained_model_name_or_path", str(model), "--in_json", str(meta),
                   "--train_data_dir", str(train_dir), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2",
                   "--train_batch_size", "2", "--max_data_loader_n_workers", "0", "--seed", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stderr
    assert (tmp_path / "out" / "last.safetensors").is_file()


@pytest.mark.slow
def test_accelerate_launch_module_cli(prepared, tmp_path):
    model, train_dir, meta = prepared("sd1", False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "sdtune", "train",
           "--pretrained_model_name_or_path", str(model), "--in_json", str(meta), "--train_data_dir", str(train_dir),
           "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--train_batch_size", "2",
           "--max_data_loader_n_workers", "0", "--seed", "1"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (tmp_path / "out" / "last.safetensors").is_file()


@pytest.mark.parametrize("mode", ["FSDP", "DEEPSPEED"])
def test_sharded_accelerate_modes_are_refused_before_any_work(prepared, tmp_path, monkeypatch, mode):
    # accelerate selects FSDP/DeepSpeed only on GPUs, so the mode is faked here: the check reads what accelerate
    # says, as under a real `accelerate launch --config_file fsdp.yaml`.
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from sdtune.errors import SdtuneError
    from sdtune.train.loop import Trainer
    from tests.train.test_train import options

    monkeypatch.setattr(Accelerator, "distributed_type", property(lambda self: DistributedType[mode]))
    with pytest.raises(SdtuneError, match="does not support accelerate's (FSDP|DeepSpeed) mode.*torchrun"):
        Trainer(options(prepared, tmp_path))
    assert not (tmp_path / "out").exists()
