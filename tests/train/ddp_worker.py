"""Run by tests/train/test_distributed.py under torchrun: trains and records what this rank saw.

Usage: torchrun --nproc_per_node 2 tests/train/ddp_worker.py MODEL TRAIN_DIR META OUT_DIR [OPTIONS_JSON]
Writes OUT_DIR/rank<r>.json: the (epoch, image keys, weight) of every batch and a digest of the final trained
weights, and OUT_DIR/rank<r>.safetensors: the final U-Net and text encoder weights (``unet.*``, ``te.*``; for a LoRA
run, with ``network_module``, the LoRA's own state dict, the file's keys), and OUT_DIR/rank<r>-step1.safetensors: the
same after the first optimizer step; with a validation set, rank<r>.json also has the (step, loss) of each
validation. OPTIONS_JSON overrides TrainOptions fields.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from sdtune.data.dataset import FineTuneData
from sdtune.train.loop import Trainer, TrainOptions


def trained_weights(trainer: Trainer) -> dict:
    """What the run trains: the LoRA's state dict, or the U-Net and text encoder (``unet.*``, ``te.*``)."""
    network = getattr(trainer.target, "network", None)
    if network is not None:
        return {k: v.detach().contiguous() for k, v in network.state_dict().items()}
    unet = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    text = trainer.accelerator.unwrap_model(trainer.text_encoder).state_dict()
    return {**{f"unet.{k}": v.contiguous() for k, v in unet.items()},
            **{f"te.{k}": v.contiguous() for k, v in text.items()}}


def save_weights(trainer: Trainer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trained_weights(trainer), str(path))


def main() -> None:
    model, train_dir, meta, out = sys.argv[1:5]
    overrides = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
    seen: list[dict] = []
    original = FineTuneData.load_batch

    def recording(self, keys, epoch, seed, *rules):
        seen.append({"epoch": epoch, "keys": list(keys), "data": id(self)})
        return original(self, keys, epoch, seed, *rules)

    FineTuneData.load_batch = recording
    settings = {"train_batch_size": 2, "max_train_steps": 5, "learning_rate": 1e-3, "seed": 7,
                "max_data_loader_n_workers": 0, **overrides}
    trainer = Trainer(TrainOptions(pretrained_model_name_or_path=model, train_data_dir=train_dir, in_json=meta,
                                   output_dir=out, **settings))
    after_step = trainer.after_step

    def snapshot() -> None:
        if trainer.progress.global_step == 1:
            save_weights(trainer, Path(out, f"rank{trainer.rank}-step1.safetensors"))
        after_step()

    trainer.after_step = snapshot
    result = trainer.run()
    seen = [s for s in seen if s.pop("data") == id(trainer.data)]  # the training batches, not the validation's
    save_weights(trainer, Path(out, f"rank{trainer.rank}.safetensors"))
    weights = trained_weights(trainer) if trainer.opts.network_module else \
        trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    plan = {e: trainer.data.epoch_batches(e, trainer.seed, 2, trainer.world, trainer.rank) for e in range(3)}
    Path(out, f"rank{trainer.rank}.json").write_text(json.dumps({
        "rank": trainer.rank, "world": trainer.world, "digest": digest, "seen": seen,
        "weights": {e: [w for _, w in batches] for e, batches in plan.items()}, "steps": result["global_step"],
        "validation": result["validation"],
    }))


if __name__ == "__main__":
    main()
