import pytest

from sdtune.models.tokenizer import packaged_tokenizer, packaged_vocabulary

pytestmark = pytest.mark.unit


def test_packaged_vocabulary_is_clips():
    vocab, merges = packaged_vocabulary()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407


def test_packaged_tokenizer_gives_openai_clip_ids():
    sd1 = packaged_tokenizer("<|endoftext|>")
    # ids of OpenAI CLIP's tokenizer for this sentence
    assert sd1("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    padded = sd1("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 49407, 49407, 49407, 49407]
    sd2 = packaged_tokenizer("!")
    assert sd2("a cat", padding="max_length", max_length=8).input_ids == [49406, 320, 2368, 49407, 0, 0, 0, 0]
