"""``sdtune caption``: a tiny random BLIP saved like Salesforce/blip-image-captioning-large."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from PIL import Image

from sdtune.cli import main
from sdtune.label.blip import CaptionOptions, _generate_kwargs, run_captioning
from tests.fixtures.labelers import BLIP_WORDS
from tests.label.conftest import IMAGES

pytestmark = pytest.mark.component


def captions(folder: Path, extension: str = ".caption") -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.glob(f"*{extension}"))}


def test_beam_search_writes_what_the_model_generates(images: Path, tiny_blip_dir: Path) -> None:
    code = main(["caption", str(images), "--model", str(tiny_blip_dir), "--beam_search", "--num_beams", "3",
                 "--batch_size", "4", "--max_length", "20", "--min_length", "5"])
    assert code == 0
    written = captions(images)
    assert sorted(written) == sorted(Path(n).stem + ".caption" for n in IMAGES)

    # The same captions straight from transformers, with the image processor the model folder declares.
    from transformers import AutoTokenizer, BlipForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    model = BlipForConditionalGeneration.from_pretrained(tiny_blip_dir).eval()
    processor = BlipImageProcessorPil.from_pretrained(tiny_blip_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_blip_dir)
    paths = sorted(p for p in images.iterdir() if p.suffix != ".caption")
    pixels = processor(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")["pixel_values"]
    # BLIP's own generate (salesforce/BLIP models/blip.py BLIP_Decoder.generate), written out on the text decoder:
    # prompt 'a picture of ', first token -> bos, last ([SEP]) dropped, beam search with repetition_penalty 1.0,
    # eos = [SEP], and the prompt cut from the decoded caption.
    prompt = "a picture of "
    with torch.no_grad():
        image_embeds = model.vision_model(pixel_values=pixels)[0]
        image_atts = torch.ones(image_embeds.size()[:-1], dtype=torch.long)
        input_ids = tokenizer([prompt] * len(paths), return_tensors="pt").input_ids
        input_ids[:, 0] = tokenizer.bos_token_id
        input_ids = input_ids[:, :-1]
        outputs = model.text_decoder.generate(input_ids=input_ids, max_length=20, min_length=5, num_beams=3,
                                              eos_token_id=tokenizer.sep_token_id,
                                              pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0,
                                              encoder_hidden_states=image_embeds, encoder_attention_mask=image_atts)
    expected = [tokenizer.decode(output, skip_special_tokens=True)[len(prompt):] for output in outputs]
    assert [written[p.stem + ".caption"] for p in paths] == [t.strip() + "\n" for t in expected]
    assert not any(text.startswith("a picture of") for text in written.values())
    for text in written.values():
        words = text.split()
        assert words and set(words) <= set(BLIP_WORDS)

    # Beam search is deterministic.
    assert main(["caption", str(images), "--model", str(tiny_blip_dir), "--beam_search", "--num_beams", "3",
                 "--batch_size", "4", "--max_length", "20", "--overwrite"]) == 0
    assert captions(images) == written


def test_sampling_repeats_with_the_same_seed(images: Path, tiny_blip_dir: Path) -> None:
    args = ["caption", str(images), "--model", str(tiny_blip_dir), "--batch_size", "2", "--max_length", "30",
            "--overwrite"]
    before = torch.get_rng_state()
    assert main([*args, "--seed", "7"]) == 0
    first = captions(images)
    assert torch.equal(torch.get_rng_state(), before)  # seeding for sampling leaves the caller's RNG alone
    assert main([*args, "--seed", "7", "--max_data_loader_n_workers", "0"]) == 0
    assert captions(images) == first
    assert main([*args, "--seed", "8"]) == 0
    assert captions(images) != first  # 4 captions of up to 29 tokens from 17 words: a different seed differs


def test_skips_existing_captions_and_reports_corrupt_images(
        images: Path, tiny_blip_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (images / "red.caption").write_text("my own caption\n", encoding="utf-8")
    (images / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    with caplog.at_level(logging.INFO):
        code = main(["caption", str(images), "--model", str(tiny_blip_dir), "--caption_extention", "caption",
                     "--max_length", "12", "--batch_size", "2"])
    assert code == 1
    assert (images / "red.caption").read_text() == "my own caption\n"
    assert sorted(captions(images)) == ["blue.caption", "gray.caption", "green.caption", "red.caption"]
    summary = next(r.getMessage() for r in caplog.records if "captioned" in r.getMessage())
    assert "3 captioned, 1 skipped" in summary and "1 failed" in summary and "truncated.jpg" in summary

    caplog.clear()
    (images / "truncated.jpg").unlink()
    with caplog.at_level(logging.INFO):
        assert main(["caption", str(images), "--model", str(tiny_blip_dir), "--max_length", "12"]) == 0
    assert "4 skipped" in caplog.text
    assert main(["caption", str(images), "--model", str(tiny_blip_dir), "--max_length", "12",
                 "--overwrite"]) == 0
    assert (images / "red.caption").read_text() != "my own caption\n"


def test_report_counts_model_time(images: Path, tiny_blip_dir: Path) -> None:
    report = run_captioning(CaptionOptions(train_data_dir=images, model=str(tiny_blip_dir), max_length=10,
                                           batch_size=2, beam_search=True))
    assert len(report.done) == 4 and not report.failed and not report.skipped
    assert 0 < report.model_seconds <= report.wall_seconds


def test_offline_unknown_model_says_how_to_provide_it(images: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caption", str(images), "--model", "sdtune-tests/no-such-blip"]) == 2
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE=1" in err and "https://huggingface.co/sdtune-tests/no-such-blip" in err
    assert "--model FOLDER" in err and "Traceback" not in err
    assert not captions(images)


def test_bad_model_folder_and_options(images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["caption", str(images), "--model", str(tmp_path / "nope" / "blip")]) == 2
    assert "no such folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["caption", str(images), "--model", str(tmp_path / "empty")]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["caption", str(images), "--min_length", "30", "--max_length", "20"]) == 2
    assert "--min_length" in capsys.readouterr().err
    assert main(["caption", str(images), "--top_p", "0"]) == 2


def test_decoding_settings() -> None:
    sampling = _generate_kwargs(CaptionOptions(train_data_dir=Path("."), top_p=0.8))
    assert sampling["do_sample"] and sampling["top_p"] == 0.8
    assert sampling["top_k"] == 50 and sampling["repetition_penalty"] == 1.1  # BLIP: no top_k, i.e. HF's 50
    beams = _generate_kwargs(CaptionOptions(train_data_dir=Path("."), beam_search=True, num_beams=4))
    assert not beams["do_sample"] and beams["num_beams"] == 4
    assert beams["max_length"] == 75 and beams["min_length"] == 5


def test_damaged_or_foreign_model_folder(images: Path, tmp_path: Path, tiny_blip_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_blip_dir, damaged)
    weights = (damaged / "model.safetensors").read_bytes()
    (damaged / "model.safetensors").write_bytes(weights[:1000])
    assert main(["caption", str(images), "--model", str(damaged)]) == 2
    err = capsys.readouterr().err
    assert str(damaged) in err and "Traceback" not in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    assert main(["caption", str(images), "--model", str(foreign)]) == 2
    assert "'bert' model, not BLIP" in capsys.readouterr().err
    assert not captions(images)
