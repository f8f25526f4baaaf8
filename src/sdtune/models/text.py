"""Text conditioning: tokenising into 75-token chunks (prompts of 75, 150 or 225 tokens), CLIP skip, re-joining.

CLIP reads 77 positions: <BOS>, 75 tokens, <EOS>/padding. For longer prompts each 75-token chunk is encoded on its
own, framed by its own <BOS> and <EOS>, and the hidden states are re-joined as
``<BOS of chunk 1> + the 75 middle states of every chunk + <last state of the last chunk>`` -- 75 * n + 2 states,
the scheme of sd-scripts and AUTOMATIC1111, so that ``max_token_length`` 75 is exactly the plain 77-token encoding.

SD 1.x pads with <EOS>, SD 2.x (OpenCLIP) with "!" (id 0). An empty chunk of an SD2 prompt therefore reads
<BOS> <EOS> <PAD> ...; its <EOS> state would sit in the middle of the joined sequence, where a 75-token prompt has
padding, so it is replaced by the state of the padding after it: what sd-scripts' ``get_hidden_states`` sets out to
do (its check compares the token ids with ``tokenizer.eos_token``, the token's *string*, so there it never fires;
sdtune compares ids). SD1 needs no such fix: its padding *is* <EOS>.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Sequence

import torch

from sdtune.models.choices import ALLOWED_TOKEN_LENGTHS

if TYPE_CHECKING:
    from transformers import CLIPTextModel, CLIPTokenizer

logger = logging.getLogger(__name__)

CHUNK = 75  # tokens per chunk, without <BOS>/<EOS>


def check_max_token_length(max_token_length: int) -> int:
    """Return ``max_token_length`` when it is 75, 150 or 225; otherwise raise ValueError."""
    if max_token_length not in ALLOWED_TOKEN_LENGTHS:
        raise ValueError(f"--max_token_length must be one of 75, 150, 225 (got {max_token_length})")
    return max_token_length


def tokenize(tokenizer: CLIPTokenizer, captions: Sequence[str], max_token_length: int = 75) -> torch.Tensor:
    """Token ids of shape [batch, chunks, 77]: each chunk <BOS> + up to 75 tokens + <EOS> + padding.

    Tokens past ``max_token_length`` are cut off (as CLIP itself cuts a plain prompt at 75).
    """
    check_max_token_length(max_token_length)
    chunks = max_token_length // CHUNK
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    body = tokenizer(list(captions), add_special_tokens=False, truncation=False, verbose=False).input_ids
    out = torch.full((len(captions), chunks, CHUNK + 2), pad, dtype=torch.long)
    for b, ids in enumerate(body):
        ids = ids[:max_token_length]
        for c in range(chunks):
            part = ids[c * CHUNK:(c + 1) * CHUNK]
            row = [bos, *part, eos]
            out[b, c, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def encode(
    text_encoder: CLIPTextModel,
    input_ids: torch.Tensor,
    clip_skip: int = 1,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Hidden states [batch, 75 * chunks + 2, width] for ids from :func:`tokenize`.

    ``clip_skip`` N takes the hidden state N layers from the end (1 = the last layer), then applies the final
    layer norm, as the NovelAI / A1111 "CLIP skip" does. ``pad_token_id`` != ``eos_token_id`` (SD 2.x) enables the
    empty-chunk fix described in the module docstring.
    """
    if clip_skip < 1:
        raise ValueError(f"clip_skip must be >= 1 (got {clip_skip})")
    module = unwrap(text_encoder)
    batch, chunks, length = input_ids.shape
    flat = input_ids.reshape(batch * chunks, length).to(module.device)
    if clip_skip == 1:
        states = text_encoder(flat, return_dict=True).last_hidden_state
    else:
        hidden = text_encoder(flat, output_hidden_states=True, return_dict=True).hidden_states
        if clip_skip >= len(hidden):
            raise ValueError(f"clip_skip {clip_skip} is more than the text encoder's {len(hidden) - 1} layers")
        final_norm = getattr(module, "text_model", module).final_layer_norm
        states = final_norm(hidden[-clip_skip])
    states = states.reshape(batch, chunks, length, -1)
    if chunks == 1:
        return states[:, 0]
    middles = []
    for c in range(chunks):
        middle = states[:, c, 1:-1]
        if c > 0 and pad_token_id is not None and pad_token_id != eos_token_id:
            # <BOS> <EOS> <PAD>...: nothing in this chunk; chosen per row on the device (no wait for the host)
            empty = (flat.reshape(batch, chunks, length)[:, c, 1] == eos_token_id)[:, None]
            first = torch.where(empty, states[:, c, 2], middle[:, 0])
            middle = torch.cat([first[:, None], middle[:, 1:]], dim=1)
        middles.append(middle)
    return torch.cat([states[:, 0, :1], *middles, states[:, -1, -1:]], dim=1)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (which hides attributes such as final_layer_norm)."""
    return module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module


def unused_layers(text_encoder: CLIPTextModel, clip_skip: int) -> list[torch.nn.Module]:
    """The last ``clip_skip - 1`` encoder layers: with CLIP skip their output is never used, so they get no gradient
    (and must be frozen, or DDP's reducer waits for their gradients forever)."""
    layers = getattr(text_encoder, "text_model", text_encoder).encoder.layers
    return list(layers[len(layers) - (clip_skip - 1):]) if clip_skip > 1 else []


def encode_prompts(
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModel,
    captions: Sequence[str],
    max_token_length: int = 75,
    clip_skip: int = 1,
) -> torch.Tensor:
    """Hidden states of ``captions``: :func:`tokenize`, then :func:`encode`."""
    ids = tokenize(tokenizer, captions, max_token_length)
    return encode(text_encoder, ids, clip_skip, tokenizer.eos_token_id, tokenizer.pad_token_id)
