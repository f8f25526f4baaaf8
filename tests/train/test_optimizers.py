"""The optimizers from optional packages (Prodigy, D-Adaptation, schedule-free) train the tiny model and resume
bit-exactly; a missing package is refused before the model loads; torch's AdamW takes its fused (or a chosen) kernel."""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.models.io import load_model
from sdtune.train import loop
from sdtune.train.loop import Trainer, train
from sdtune.train.optim import build_optimizer, evaluation_weights
from sdtune.train.options import OPTIMIZER_PACKAGES, OPTIMIZERS
from tests.train.test_train import options

pytestmark = pytest.mark.component

# the learning rates each is meant to run at (Prodigy and D-Adaptation estimate the step size; lr scales it)
NEW = {"Prodigy": 1.0, "DAdaptAdam": 1.0, "AdamWScheduleFree": 1e-3}


def last_state_unet(tmp_path) -> dict[str, torch.Tensor]:
    return load_file(str(tmp_path / "out" / "last-state" / "unet.safetensors"))


@pytest.mark.parametrize("name", list(NEW))
def test_trains_and_resumes_bit_exactly(prepared, tmp_path, name):
    """4 steps straight (saving the state after step 2) equal 2 steps + --resume + 2 steps: losses and weights; the
    loss is finite and the weights moved away from the base model's."""
    pytest.importorskip(OPTIMIZER_PACKAGES[name])
    common = dict(optimizer_type=name, learning_rate=NEW[name], max_train_steps=4, save_state=True)
    straight = train(options(prepared, tmp_path / "a", save_every_n_steps=2, **common))
    assert all(torch.isfinite(torch.tensor(straight["losses"])))
    state = tmp_path / "a" / "out" / "step-00000002-state"
    resumed = train(options(prepared, tmp_path / "b", resume=str(state), **common))
    assert resumed["losses"] == straight["losses"][2:]
    a, b = last_state_unet(tmp_path / "a"), last_state_unet(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    base = load_model(prepared("sd1")[0]).unet.state_dict()
    assert not torch.equal(a["conv_in.weight"], base["conv_in.weight"])


def test_schedule_free_saves_its_evaluation_weights_and_trains_as_if_it_never_saved(prepared, tmp_path, monkeypatch):
    """Checkpoints are written in eval mode (the averaged weights, as sd-scripts), the state in train mode; the
    switch back is exact, so a run that saved (and sampled) midway ends with the weights of one that did not."""
    pytest.importorskip("schedulefree")
    common = dict(optimizer_type="AdamWScheduleFree", max_train_steps=4, save_state=True)
    trainer = Trainer(options(prepared, tmp_path / "a", save_every_n_steps=2, **common))
    modes, weights = [], []
    original = trainer.target.save_checkpoint

    def recording(path, progress):
        modes.append(trainer.optimizer.param_groups[0]["train_mode"])
        weights.append(trainer.model.unet.conv_in.weight.detach().clone())
        return original(path, progress)

    monkeypatch.setattr(trainer.target, "save_checkpoint", recording)
    trainer.run()
    assert modes == [False, False]  # step 2 and the final save
    assert trainer.optimizer.param_groups[0]["train_mode"]
    trained = last_state_unet(tmp_path / "a")["conv_in.weight"]
    assert not torch.equal(weights[-1], trained)  # the checkpoint holds x, the state y
    train(options(prepared, tmp_path / "b", **common))
    b = last_state_unet(tmp_path / "b")
    assert all(torch.equal(v, b[k]) for k, v in last_state_unet(tmp_path / "a").items())


def test_evaluation_weights_are_the_optimizers_eval_weights_and_training_ones_come_back_exactly():
    schedulefree = pytest.importorskip("schedulefree")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    optimizer = build_optimizer("AdamWScheduleFree", [{"params": list(model.parameters()), "lr": 1e-2}], 1e-2, {})
    assert isinstance(optimizer, schedulefree.AdamWScheduleFree) and optimizer.param_groups[0]["train_mode"]
    for _ in range(3):
        model(torch.randn(4, 6)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    training = [p.detach().clone() for p in model.parameters()]
    reference = copy.deepcopy(optimizer.state_dict()), [p.detach().clone() for p in model.parameters()]
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    with torch.no_grad():
        for p, value in zip(twin.parameters(), reference[1]):
            p.copy_(value)
    twin_optimizer = schedulefree.AdamWScheduleFree(twin.parameters(), lr=1e-2)
    twin_optimizer.load_state_dict(reference[0])
    twin_optimizer.eval()
    with evaluation_weights(optimizer):
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p, q)
        assert not torch.equal(next(model.parameters()), training[0])
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))
    model(torch.randn(4, 6)).square().mean().backward()
    optimizer.step()  # still in train mode


@pytest.mark.parametrize("name", [n for n in OPTIMIZERS if n != "AdamW8bit"])
def test_every_optimizer_name_builds_steps_and_round_trips_its_state(tmp_path, name):
    """Each --optimizer_type (sd-scripts' names) builds, takes steps and reloads its state with the safe loader."""
    if name in OPTIMIZER_PACKAGES:
        pytest.importorskip(OPTIMIZER_PACKAGES[name])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    lr = 1.0 if name in ("Prodigy",) or name.startswith("DAdapt") else 1e-2
    optimizer = build_optimizer(name, [{"params": list(model.parameters()), "lr": lr}], lr, {}, warn=False)
    before = model.weight.detach().clone()
    for _ in range(8):  # RAdam's first steps do not move the weights
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.isfinite(model.weight).all() and not torch.equal(model.weight, before)
    path = tmp_path / "optimizer.pt"
    torch.save(optimizer.state_dict(), path)
    optimizer.load_state_dict(torch.load(path, weights_only=True))


@pytest.mark.parametrize("name", list(NEW))
def test_a_missing_package_is_refused_before_the_model_loads(prepared, tmp_path, monkeypatch, name):
    package = OPTIMIZER_PACKAGES[name]
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda mod, *a: None if mod == package else find_spec(mod, *a))
    monkeypatch.setattr(loop, "load_base_model", lambda *a: pytest.fail("the model loaded"))
    with pytest.raises(SdtuneError, match=f"--optimizer_type {name} needs the {package} package, which is not "
                                          f"installed: pip install {package}"):
        Trainer(options(prepared, tmp_path, optimizer_type=name))
    # and where it goes missing after the check, building says the same
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(SdtuneError, match=f"pip install {package}"):
        build_optimizer(name, [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1.0, {})


def test_schedule_free_refuses_a_schedule(prepared, tmp_path):
    pytest.importorskip("schedulefree")
    with pytest.raises(SdtuneError, match="--lr_scheduler cosine would scale its steps again.*warmup_steps=N"):
        Trainer(options(prepared, tmp_path, optimizer_type="AdamWScheduleFree", lr_scheduler="cosine"))


def test_adaptive_optimizers_warn_about_a_fine_tuning_learning_rate(caplog):
    pytest.importorskip("prodigyopt")
    caplog.set_level(logging.WARNING, logger="sdtune")
    build_optimizer("Prodigy", [{"params": [torch.nn.Parameter(torch.ones(2))], "lr": 1e-4}], 1e-4, {})
    assert "use --learning_rate 1.0 (got 0.0001)" in caplog.text


@pytest.mark.parametrize("extra, kernel", [({}, "fused"), ({"foreach": True}, "foreach")])
def test_adamw_kernels_give_the_per_tensor_loops_result(extra, kernel):
    """On a CPU the built AdamW is torch's fused kernel (the fastest there: see optim._fast_adamw); --optimizer_args
    foreach=True gives the multi-tensor step. A few steps of a small conv net with either match torch's
    single-tensor loop (the reference: torch's CPU default, what diffusers' scripts run) within float tolerance.
    --optimizer_args foreach=False is kept, and a chosen kernel is not fused over."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.SiLU(), torch.nn.Flatten(), torch.nn.Linear(144, 2))
    twin, start = copy.deepcopy(model), copy.deepcopy(model)
    fast = build_optimizer("AdamW", [{"params": list(model.parameters()), "lr": 1e-2}], 1e-2,
                           {"weight_decay": 0.1, **extra})
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    assert bool(fast.defaults.get("fused")) is (kernel == "fused")
    assert bool(fast.defaults.get("foreach")) is (kernel == "foreach")
    for _ in range(4):
        x = torch.randn(2, 3, 8, 8)
        for m, optimizer in ((model, fast), (twin, plain)):
            m(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q, before in zip(model.parameters(), twin.parameters(), start.parameters()):
        assert (p - before).abs().max() > 1e-3  # the steps moved every tensor
        torch.testing.assert_close(p, q)
    kept = build_optimizer("AdamW", [{"params": [torch.nn.Parameter(torch.ones(2))]}], 1e-3, {"foreach": False})
    assert kept.defaults["foreach"] is False and not kept.defaults.get("fused")


def test_the_trainers_adamw_is_fused_and_updates_as_the_per_tensor_loop(prepared, tmp_path):
    """``sdtune train`` on a CPU steps with the fused kernel, and its update of the tiny model is the one AdamW's
    per-tensor loop (--optimizer_args foreach=False, torch's own CPU default) makes from the same gradients,
    within float rounding. One step: after it the weights differ in their last bits, and Adam's next steps
    (about lr * sign(g)) turn that into full-size differences in near-zero gradients of a random model (see
    tests/train/test_compile.py), which says nothing about the kernel."""
    runs = {}
    for name, extra in (("fused", []), ("loop", ["foreach=False"])):
        trainer = Trainer(options(prepared, tmp_path, output_dir=str(tmp_path / name), max_train_steps=1,
                                  optimizer_args=extra))
        runs[name] = (dict(trainer.optimizer.defaults), trainer.run())
    assert runs["fused"][0]["fused"] is True
    assert not runs["loop"][0]["fused"] and runs["loop"][0]["foreach"] is False
    assert runs["fused"][1]["losses"] == runs["loop"][1]["losses"]  # the same forward before the update
    ours, theirs = load_file(str(runs["fused"][1]["model"])), load_file(str(runs["loop"][1]["model"]))
    base = load_model(prepared("sd1")[0]).unet.conv_in.weight
    conv_in = ours["model.diffusion_model.input_blocks.0.0.weight"]
    assert conv_in.shape == base.shape and not torch.equal(conv_in, base)  # it trained
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_adamw_is_fused_on_cuda():
    model = torch.nn.Linear(8, 8).cuda()
    twin = copy.deepcopy(model)
    fused = build_optimizer("AdamW", [{"params": list(model.parameters()), "lr": 1e-2}], 1e-2, {})
    plain = torch.optim.AdamW(twin.parameters(), lr=1e-2, foreach=False)
    assert fused.defaults["fused"] is True
    for _ in range(4):
        x = torch.randn(4, 8, device="cuda")
        for m, optimizer in ((model, fused), (twin, plain)):
            m(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)
