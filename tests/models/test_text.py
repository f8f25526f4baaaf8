"""Text conditioning against hand computation: clip skip, 75-token chunking, re-joining, SD2 padding."""

from __future__ import annotations

import pytest
import torch

from sdtune.models.text import encode, encode_prompts, tokenize
from sdtune.models.tiny import build_tiny

pytestmark = pytest.mark.component

LONG = ", ".join(f"word{i}" for i in range(50))  # 189 tokens: three chunks, the last one partly filled


@pytest.fixture(scope="module")
def sd1():
    return build_tiny("sd1")


@pytest.fixture(scope="module")
def sd2():
    return build_tiny("sd2-v")


def test_clip_skip_1_is_last_layer_and_2_is_normed_penultimate(sd1):
    ids = tokenize(sd1.tokenizer, ["a red square"], 75)
    te = sd1.text_encoder
    out = te(ids[:, 0], output_hidden_states=True)
    torch.testing.assert_close(encode(te, ids, clip_skip=1), out.last_hidden_state, rtol=1e-5, atol=1e-8)
    expected = te.final_layer_norm(out.hidden_states[-2])
    got = encode(te, ids, clip_skip=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-8)
    with pytest.raises(AssertionError, match="not close"):  # clip skip 2 differs from the last layer
        torch.testing.assert_close(got, out.last_hidden_state, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_225_tokens_are_three_framed_chunks(family, sd1, sd2):
    model = sd1 if family == "sd1" else sd2
    tok = model.tokenizer
    body = tok(LONG, add_special_tokens=False).input_ids
    assert len(body) > 150
    ids = tokenize(tok, [LONG, "short"], 225)
    assert ids.shape == (2, 3, 77)
    for c in range(3):
        part = body[c * 75:(c + 1) * 75]
        row = ids[0, c].tolist()
        assert row[0] == tok.bos_token_id
        assert row[1:1 + len(part)] == part
        assert row[1 + len(part)] == tok.eos_token_id
        assert all(t == tok.pad_token_id for t in row[2 + len(part):])
    # the short caption: its second and third chunks are empty, <BOS> <EOS> <PAD>...
    assert ids[1, 1].tolist()[:3] == [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]
    assert tok.pad_token_id == (49407 if family == "sd1" else 0)


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_rejoined_states_by_hand(family, sd1, sd2):
    model = sd1 if family == "sd1" else sd2
    tok, te = model.tokenizer, model.text_encoder
    ids = tokenize(tok, [LONG, "short"], 225)
    states = encode(te, ids, 1, tok.eos_token_id, tok.pad_token_id)
    assert states.shape == (2, 227, te.config.hidden_size)
    per_chunk = [te(ids[:, c]).last_hidden_state for c in range(3)]
    torch.testing.assert_close(states[:, 0], per_chunk[0][:, 0], rtol=1e-5, atol=1e-8)  # <BOS> of the first chunk
    for c in range(3):
        expected = per_chunk[c][:, 1:76].clone()
        if family == "sd2" and c > 0:  # the empty chunk's <EOS> state is replaced by the padding state after it
            expected[1, 0] = per_chunk[c][1, 2]
        torch.testing.assert_close(states[:, 1 + 75 * c:76 + 75 * c], expected, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(states[:, -1], per_chunk[2][:, -1], rtol=1e-5, atol=1e-8)


def test_75_tokens_is_plain_clip_and_cuts_long_prompts(sd1):
    tok, te = sd1.tokenizer, sd1.text_encoder
    plain = tok([LONG], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    torch.testing.assert_close(encode_prompts(tok, te, [LONG], 75), te(plain).last_hidden_state, rtol=1e-5, atol=1e-8)
    # with 75 tokens, words past token 75 change nothing; with 150 they do
    longer = LONG + ", extra words at the end"
    assert torch.equal(encode_prompts(tok, te, [LONG], 75), encode_prompts(tok, te, [longer], 75))
    assert not torch.equal(encode_prompts(tok, te, [LONG], 225), encode_prompts(tok, te, [longer], 225))
