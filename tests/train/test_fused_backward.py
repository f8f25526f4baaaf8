"""--fused_backward_pass: each parameter stepped (and its gradient freed) during backward; the same training as
the plain step, resumed exactly, and refused where a per-parameter step cannot be the run's step."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from sdtune.errors import SdtuneError
from sdtune.train import base_model
from sdtune.train.loop import Trainer
from tests.train.test_train import options

pytestmark = pytest.mark.component


def _weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(result["model"]))


@pytest.mark.parametrize("optimizer", ["AdamW", "Adafactor"])
def test_fused_backward_trains_as_the_plain_step(prepared, tmp_path, optimizer):
    common = dict(max_train_steps=3, optimizer_type=optimizer, max_grad_norm=0.0, learning_rate=1e-3)
    plain = Trainer(options(prepared, tmp_path, output_dir=str(tmp_path / "plain"), **common)).run()
    fused = Trainer(options(prepared, tmp_path, output_dir=str(tmp_path / "fused"), fused_backward_pass=True,
                            **common)).run()
    torch.testing.assert_close(torch.tensor(fused["losses"]), torch.tensor(plain["losses"]), rtol=1e-6, atol=1e-7)
    ours, theirs = _weights(fused), _weights(plain)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-6, atol=1e-7, msg=lambda m, k=key: f"{k}: {m}")


def test_gradients_are_freed_as_backward_goes(prepared, tmp_path):
    trainer = Trainer(options(prepared, tmp_path, max_train_steps=1, fused_backward_pass=True))
    alive: list[int] = []
    hook = trainer.fused_backward._step

    def counting(parameter):
        alive.append(sum(p.grad is not None for p in trainer.trainable))
        hook(parameter)

    trainer.fused_backward._step = counting
    for handle in trainer.fused_backward.handles:
        handle.remove()
    trainer.fused_backward.handles = [p.register_post_accumulate_grad_hook(counting) for p in trainer.trainable]
    before = {k: v.clone() for k, v in trainer.model.unet.state_dict().items()}
    group = next(iter(trainer.step_groups()))
    trainer.backward(group)
    stepped = trainer.fused_backward.take_count()
    assert stepped == len(alive) > 0.9 * len(trainer.trainable)  # (the rest get no gradient from this batch)
    assert all(p.grad is None for p in trainer.trainable)  # nothing left to hold after backward
    assert max(alive) <= 2  # never more than the gradient being stepped (and one being written)
    moved = sum(not torch.equal(v, before[k]) for k, v in trainer.model.unet.state_dict().items())
    assert moved >= stepped * 0.9  # the parameters moved during backward, before any optimizer.step() call


def test_resume_is_bit_exact_with_fused_backward(prepared, tmp_path):
    common = dict(fused_backward_pass=True, save_state=True, lr_scheduler="cosine", max_train_steps=5)
    straight = Trainer(options(prepared, tmp_path / "a", save_every_n_steps=2, **common)).run()
    state = tmp_path / "a" / "out" / "step-00000002-state"
    resumed = Trainer(options(prepared, tmp_path / "b", resume=str(state), **common)).run()
    assert resumed["losses"] == straight["losses"][2:]
    a = load_file(str(tmp_path / "a" / "out" / "last-state" / "unet.safetensors"))
    b = load_file(str(tmp_path / "b" / "out" / "last-state" / "unet.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("overrides, message", [
    (dict(optimizer_type="Lion"), "AdamW or Adafactor, not Lion"),
    (dict(gradient_accumulation_steps=2), "--gradient_accumulation_steps"),
    (dict(mixed_precision="fp16"), "--mixed_precision fp16"),
])
def test_fused_backward_is_refused_where_it_cannot_apply(prepared, tmp_path, monkeypatch, overrides, message):
    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    with pytest.raises(SdtuneError, match=message):
        Trainer(options(prepared, tmp_path, fused_backward_pass=True, **overrides))


def test_fused_backward_is_refused_under_ddp(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(base_model, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SdtuneError, match="several processes"):
        Trainer(options(prepared, tmp_path, fused_backward_pass=True))


def test_max_grad_norm_clips_each_parameter_by_its_own_norm():
    """sd-scripts' rule under a fused backward: each gradient is clipped alone (the global norm is only known
    after backward). Checked against the hand computation on a layer stepped with SGD (lr 1)."""
    from sdtune.train.fused_backward import FusedBackward

    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4) * 10
    reference = torch.nn.Linear(4, 3)
    reference.load_state_dict(layer.state_dict())
    (reference(x) ** 2).sum().backward()
    expected = {}
    for name, p in reference.named_parameters():
        norm = p.grad.norm()
        assert norm > 1  # so the clip does something
        expected[name] = p.detach() - p.grad / norm  # clipped to norm 1, stepped with lr 1
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    FusedBackward(optimizer, list(layer.parameters()), max_grad_norm=1.0)
    (layer(x) ** 2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is None
        torch.testing.assert_close(p.detach(), expected[name], msg=lambda m, n=name: f"{n}: {m}")
