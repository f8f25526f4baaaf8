"""Update fidelity of half-precision weights: --full_fp16 / --full_bf16 against fp32 AdamW, printed as figures.

The synthetic case of issue 10, sized like SD fine-tuning: weights ~ N(0, 0.03), gradients ~ N(0, 3e-5) (fresh each
step), lr 2e-6, no weight decay. The reference is ``torch.optim.AdamW`` on fp32 weights, given the same
(half-precision) gradients. For each way of keeping
fp16/bf16 weights it prints, after N steps, the share of weights that moved at all and the cosine similarity of the
weight change with fp32's change (1.0 = the same update).

    .venv/bin/python bench/bench_precision.py [--steps 20 200] [--size 1000000]

"plain AdamW" is ``torch.optim.AdamW`` run on the half-precision weights (its moments are then half precision too):
what --full_fp16 did before sdtune kept fp32 moments. Not a test: nothing here asserts a figure.
"""

from __future__ import annotations

import argparse

import torch

from sdtune.train.optim import HalfWeightAdamW

LR = 2e-6


def fidelity(dtype: torch.dtype, method: str, steps: int, size: int, seed: int = 0) -> tuple[float, float]:
    """(share of weights moved, cosine of the change with fp32's change) after ``steps`` AdamW steps."""
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(size, generator=gen) * 0.03
    grads = [torch.randn(size, generator=gen) * 3e-5 for _ in range(steps)]
    reference = start.clone().requires_grad_()
    ref_opt = torch.optim.AdamW([reference], lr=LR, weight_decay=0.0)
    half = start.to(dtype).requires_grad_()
    if method == "plain AdamW":
        opt = torch.optim.AdamW([half], lr=LR, weight_decay=0.0, eps=1e-4 if dtype == torch.float16 else 1e-8)
    else:
        opt = HalfWeightAdamW([half], lr=LR, weight_decay=0.0, rounding=method)
    for g in grads:
        half.grad = g.to(dtype)
        reference.grad = half.grad.float()  # the same gradient: what is compared is the optimizer
        ref_opt.step()
        opt.step()
    ref_change = reference.detach() - start
    change = half.detach().float() - start.to(dtype).float()
    moved = float((change != 0).float().mean())
    cosine = float(torch.nn.functional.cosine_similarity(change, ref_change, dim=0))
    return moved, cosine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--size", type=int, default=1_000_000)
    args = parser.parse_args()
    print(f"{'weights':8} {'method':12} {'steps':>5} {'moved':>7} {'cosine':>7}")
    for dtype, name in ((torch.float16, "fp16"), (torch.bfloat16, "bf16")):
        for method in ("plain AdamW", "kahan", "stochastic"):
            for steps in args.steps:
                moved, cosine = fidelity(dtype, method, steps, args.size)
                print(f"{name:8} {method:12} {steps:5d} {moved:7.1%} {cosine:7.3f}")
    print("fp32 AdamW moves 100 % of the weights (cosine 1.000 by definition)")


if __name__ == "__main__":
    main()
