"""Run by tests/train/test_distributed.py under torchrun: trains and records what this rank saw.

Usage: torchrun --nproc_per_node 2 tests/train/ddp_worker.py MODEL TRAIN_DIR META OUT_DIR
Writes OUT_DIR/rank<r>.json: the (epoch, image keys, weight) of every batch and a digest of the final U-Net.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from sdtune.data.dataset import FineTuneData
from sdtune.train.loop import TrainOptions, Trainer


def main() -> None:
    model, train_dir, meta, out = sys.argv[1:5]
    seen: list[dict] = []
    original = FineTuneData.load_batch

    def recording(self, keys, epoch, seed, caption_rules):
        seen.append({"epoch": epoch, "keys": list(keys)})
        return original(self, keys, epoch, seed, caption_rules)

    FineTuneData.load_batch = recording
    trainer = Trainer(TrainOptions(pretrained_model_name_or_path=model, train_data_dir=train_dir, in_json=meta,
                                   output_dir=out, train_batch_size=2, max_train_steps=5, learning_rate=1e-3,
                                   seed=7, max_data_loader_n_workers=0))
    result = trainer.run()
    weights = trainer.accelerator.unwrap_model(trainer.unet).state_dict()
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    plan = {e: trainer.data.epoch_batches(e, trainer.seed, 2, trainer.world, trainer.rank) for e in range(3)}
    Path(out, f"rank{trainer.rank}.json").write_text(json.dumps({
        "rank": trainer.rank, "world": trainer.world, "digest": digest, "seen": seen,
        "weights": {e: [w for _, w in batches] for e, batches in plan.items()}, "steps": result["global_step"],
    }))


if __name__ == "__main__":
    main()
