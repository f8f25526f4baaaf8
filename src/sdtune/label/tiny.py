"""Tiny labeling models in the real on-disk layouts, built in code (no download): for tests, benchmarks and the demo.

* ``build_tiny_blip(folder)``: a random BLIP captioning model saved like ``Salesforce/blip-image-captioning-large``
  (config.json, model.safetensors, generation_config.json, preprocessor_config.json, tokenizer.json,
  tokenizer_config.json, vocab.txt) with a 23-token BERT vocabulary and 32x32 input images.
* ``build_tiny_tagger(folder)``: a WD14-style tagger (``model.onnx`` + ``selected_tags.csv``) whose scores are
  known in closed form: ``sigmoid(W . mean_bgr / 255 + b)`` over the preprocessed image, so that a test can predict
  which tags pass a threshold. Needs the ``onnx`` package (a test dependency), imported when called.

To try ``sdtune caption`` / ``sdtune tag`` without downloading a model::

    python -m sdtune.label.tiny tiny-labelers/      # writes tiny-labelers/blip and tiny-labelers/tagger
    sdtune caption images/ --model tiny-labelers/blip
    sdtune tag images/ --model_dir tiny-labelers/tagger

The captions are random words and the tags follow colour, as a random tiny model gives: they show the files and
the flow, not quality.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: The tiny BLIP's vocabulary: BERT's five special tokens first (ids 0-4, as in bert-base-uncased's order),
#: then words, then BLIP's decoder/encoder markers.
BLIP_WORDS = ("a the red green blue cat dog sitting on table picture of with and small large").split()
BLIP_VOCAB = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BLIP_WORDS, "[DEC]", "[ENC]")


def build_tiny_blip(folder: str | Path, image_size: int = 32, seed: int = 0, patch_size: int = 8) -> Path:
    """Save a random tiny BLIP captioning model (same seed, same weights) into ``folder``; returns ``folder``.

    ``image_size`` is the processor's and the vision model's input side; ``image_size / patch_size`` squared is
    the number of image tokens the text decoder attends to (576 in BLIP-large).
    """
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration

    from sdtune.label.blip import _image_processor_class

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(BLIP_VOCAB) + "\n", encoding="utf-8")
    # BLIP's tokenizer is bert-base-uncased plus a [DEC] bos token and an [ENC] token (transformers'
    # convert_blip_original_pytorch_to_hf.py); a tokenizer_config.json next to vocab.txt makes from_pretrained
    # build the same thing in transformers 4 and 5.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "bos_token": "[DEC]",
        "additional_special_tokens": ["[ENC]"],
    }), encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config = BlipConfig(
        text_config={
            "vocab_size": len(BLIP_VOCAB), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 128,
            "bos_token_id": BLIP_VOCAB.index("[DEC]"), "sep_token_id": BLIP_VOCAB.index("[SEP]"),
            "eos_token_id": BLIP_VOCAB.index("[SEP]"), "pad_token_id": BLIP_VOCAB.index("[PAD]"),
        },
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": patch_size},
        projection_dim=32,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    _image_processor_class()(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


@dataclass(frozen=True)
class TinyTag:
    name: str
    category: int
    weights_bgr: tuple[float, float, float]
    bias: float


#: The tiny tagger's tags in output order, as in the real selected_tags.csv: ratings, general tags, characters.
#: "*_theme" tags follow the image's colour, the others have fixed scores (sigmoid of the bias) around the usual
#: thresholds: solo 0.82, long_hair 0.57, ^_^ 0.50, kirisame_marisa 0.45, rare_tag 0.05.
TINY_TAGS: tuple[TinyTag, ...] = (
    TinyTag("general", 9, (0.0, 0.0, 0.0), 1.0),
    TinyTag("sensitive", 9, (0.0, 0.0, 0.0), 0.0),
    TinyTag("questionable", 9, (0.0, 0.0, 0.0), -1.0),
    TinyTag("explicit", 9, (0.0, 0.0, 0.0), -2.0),
    TinyTag("solo", 0, (0.0, 0.0, 0.0), 1.5),
    TinyTag("red_theme", 0, (-5.0, -5.0, 6.0), -0.5),
    TinyTag("green_theme", 0, (-5.0, 6.0, -5.0), -0.5),
    TinyTag("blue_theme", 0, (6.0, -5.0, -5.0), -0.5),
    TinyTag("bright", 0, (2.0, 2.0, 2.0), -3.0),
    TinyTag("^_^", 0, (0.0, 0.0, 0.0), 0.0),
    TinyTag("long_hair", 0, (0.0, 0.0, 0.0), 0.3),
    TinyTag("rare_tag", 0, (0.0, 0.0, 0.0), -3.0),
    TinyTag("hatsune_miku", 4, (-5.0, 6.0, -5.0), -0.5),
    TinyTag("kirisame_marisa", 4, (0.0, 0.0, 0.0), -0.2),
)


def tiny_tagger_scores(mean_bgr: np.ndarray, tags: tuple[TinyTag, ...] = TINY_TAGS) -> np.ndarray:
    """The tiny tagger's scores in closed form, for (..., 3) channel means of preprocessed (BGR, 0..255) images."""
    weights = np.array([t.weights_bgr for t in tags], dtype=np.float64)  # (tags, 3)
    bias = np.array([t.bias for t in tags], dtype=np.float64)
    logits = np.asarray(mean_bgr, dtype=np.float64) / 255.0 @ weights.T + bias
    return 1.0 / (1.0 + np.exp(-logits))


def build_tiny_tagger(
    folder: str | Path, size: int = 32, fixed_batch: int | None = None, tags: tuple[TinyTag, ...] = TINY_TAGS,
    input_name: str = "input_1:0",
) -> Path:
    """Write ``model.onnx`` and ``selected_tags.csv`` of a tiny tagger into ``folder``; returns ``folder``.

    The input is NHWC ``[batch, size, size, 3]`` like the real taggers; ``fixed_batch=1`` exports a fixed batch
    dimension, as some converted taggers have. ``input_name`` defaults to the v2 taggers' name (v3 uses "input").
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    batch: int | str = fixed_batch if fixed_batch is not None else "batch"
    weights = (np.array([t.weights_bgr for t in tags], dtype=np.float32).T / 255.0).astype(np.float32)  # (3, tags)
    bias = np.array([t.bias for t in tags], dtype=np.float32)
    nodes = [
        helper.make_node("ReduceMean", [input_name], ["mean"], axes=[1, 2], keepdims=0),
        helper.make_node("MatMul", ["mean", "weights"], ["product"]),
        helper.make_node("Add", ["product", "bias"], ["logits"]),
        helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_wd14_tagger",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, [batch, size, size, 3])],
        [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [batch, len(tags)])],
        initializer=[numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")],
    )
    # Opset 13 / IR 8: old enough for every onnxruntime sdtune supports (ReduceMean still takes axes as attribute).
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(folder / "model.onnx"))
    with (folder / "selected_tags.csv").open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, tag in enumerate(tags):
            writer.writerow([100000 + index, tag.name, tag.category, 1000 - index])
    return folder


def main(argv: list[str] | None = None) -> int:
    import argparse
    import importlib.util

    parser = argparse.ArgumentParser(prog="python -m sdtune.label.tiny",
                                     description="Build a tiny BLIP captioner and WD14-style tagger to try "
                                                 "sdtune caption / sdtune tag offline.")
    parser.add_argument("out", type=Path, help="folder for blip/ and tagger/")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("onnx") is None:
        parser.error("building the tagger needs the onnx package: pip install onnx")
    blip, tagger = build_tiny_blip(args.out / "blip"), build_tiny_tagger(args.out / "tagger")
    print(f"wrote {blip} and {tagger}; try:\n  sdtune caption IMAGES --model {blip}\n"
          f"  sdtune tag IMAGES --model_dir {tagger}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
