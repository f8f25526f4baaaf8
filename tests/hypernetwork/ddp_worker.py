"""Run by tests/hypernetwork/test_distributed.py under torchrun: trains a hypernetwork, records a digest of it.

Usage: torchrun --nproc_per_node 2 tests/hypernetwork/ddp_worker.py MODEL TRAIN_DIR META OUT_DIR
Writes OUT_DIR/rank<r>.json: the world size, the steps and a digest of this rank's hypernetwork weights.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from sdtune.train.loop import Trainer, TrainOptions


def main() -> None:
    model, train_dir, meta, out = sys.argv[1:5]
    trainer = Trainer(TrainOptions(pretrained_model_name_or_path=model, train_data_dir=train_dir, in_json=meta,
                                   output_dir=out, train_batch_size=2, max_train_steps=3, learning_rate=1e-2,
                                   seed=7, max_data_loader_n_workers=0, hypernetwork_module="default",
                                   hypernetwork_dropout="0.3"))
    result = trainer.run()
    weights = trainer.target.hypernetwork.state_dict()
    digest = hashlib.sha256(b"".join(weights[k].numpy().tobytes() for k in sorted(weights))).hexdigest()
    Path(out, f"rank{trainer.rank}.json").write_text(json.dumps(
        {"rank": trainer.rank, "world": trainer.world, "digest": digest, "steps": result["global_step"]}))


if __name__ == "__main__":
    main()
