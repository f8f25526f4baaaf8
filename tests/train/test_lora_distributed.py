"""A LoRA (issue 14) trained by two processes (torchrun, gloo on the CPU): the LoRA runs inside the frozen model's
forward, never wrapped by DDP, so its gradients are averaged by the target itself (``average_gradients``). Both
ranks must end with the same LoRA, bit for bit, and their step must be one process's step with 2 x 2 gradient
accumulation.

The run has a LoCon (``conv_dim=2``) and a text-encoder LoRA with clip skip 2: the last text-encoder layer is never
read, so its LoRA modules get no gradient at all; the all-reduce must neither wait for them nor misplace the
others' gradients. With module dropout each rank leaves out other modules in each batch (their gradients exist on
one rank and not on the other): the all-reduce crashed (ranks sent tensors of different sizes) before it counted a
missing gradient as zero.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.test_distributed import ROOT, torchrun

pytestmark = pytest.mark.e2e

LORA = {"network_module": "lora", "network_dim": 4, "network_alpha": 4.0,
        "network_args": ["conv_dim=2", "module_dropout=0.1"], "clip_skip": 2, "learning_rate": 1e-2,
        "optimizer_type": "SGDNesterov"}


@pytest.mark.slow
def test_two_processes_train_the_same_lora_as_one_process_with_accumulation(prepared, tmp_path):
    """After the first step (SGD, for the reason in tests/train/test_distributed.py's accumulation test) the LoRA
    of either rank equals one process's with batch 2 x 2 accumulation (module dropout draws per batch of the step,
    as the noise: the same modules are left out); after the third the ranks still agree bit for bit."""
    from safetensors.torch import load_file

    from sdtune.models.lora import read_lora
    from sdtune.train.loop import Trainer, TrainOptions

    model, train_dir, meta = prepared("sd1", False, count=8)
    out = tmp_path / "ddp"
    run = torchrun(str(ROOT / "tests" / "train" / "ddp_worker.py"), str(model), str(train_dir), str(meta), str(out),
                   json.dumps({**LORA, "max_train_steps": 3}), cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["steps"] for r in ranks] == [3, 3]
    assert ranks[0]["digest"] == ranks[1]["digest"]
    for name in ("rank{}-step1", "rank{}"):
        first, second = (load_file(str(out / f"{name.format(r)}.safetensors")) for r in range(2))
        assert first.keys() == second.keys()
        for key in first:
            assert torch.equal(first[key], second[key]), key  # the same LoRA on both ranks, bit for bit

    # rank 0 wrote the LoRA file: the same LoRA, with text-encoder and 3x3 (LoCon) modules
    saved, _ = read_lora(out / "last.safetensors")
    final = load_file(str(out / "rank0.safetensors"))
    assert saved.keys() == final.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], final[key], rtol=0, atol=0)
    assert any(k.startswith("lora_te_") for k in saved)
    assert any(k.endswith("lora_down.weight") and v.dim() == 4 and v.shape[-1] == 3 for k, v in saved.items())
    # clip skip 2: the last text-encoder layer (of 3) is never read, and its LoRA never learns
    skipped = [k for k in saved if k.startswith("lora_te_text_model_encoder_layers_2_") and "lora_up" in k]
    assert skipped and all(not saved[k].any() for k in skipped)
    learnt = [k for k in saved if k.startswith("lora_te_text_model_encoder_layers_0_") and "lora_up" in k]
    assert learnt and all(saved[k].any() for k in learnt)

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun rank (OMP_NUM_THREADS=1): the same float order
    try:
        single = Trainer(TrainOptions(pretrained_model_name_or_path=str(model), train_data_dir=str(train_dir),
                                      in_json=str(meta), output_dir=str(tmp_path / "one"), train_batch_size=2,
                                      gradient_accumulation_steps=2, seed=7, max_data_loader_n_workers=0,
                                      max_train_steps=1, **LORA))
        single.run()
    finally:
        torch.set_num_threads(previous)
    expected = {k: v.detach() for k, v in single.target.network.state_dict().items()}
    ddp = load_file(str(out / "rank0-step1.safetensors"))
    assert ddp.keys() == expected.keys()
    change = max(float(v.abs().max()) for k, v in ddp.items() if "lora_up" in k)  # the up weights start at zero
    assert change > 1e-4  # the comparison is of a trained LoRA, not of the untouched initial one
    for key, value in ddp.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0.01 * change,
                                   msg=lambda m, key=key: f"{key}: {m}")
