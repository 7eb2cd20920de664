"""Captions → what the UNet is conditioned on, exactly as the family's diffusers pipeline computes it.

The reference is the pipelines' own ``encode_prompt`` (not the training scripts), so that a model conditions at
inference on what it was trained on:

- SD v1 / SD 2.x (``StableDiffusionPipeline.encode_prompt``): each caption tokenised by the folder's tokenizer
  (padded to ``model_max_length`` with its own pad token: ``<|endoftext|>`` for CLIP-L, ``!`` for OpenCLIP-H),
  the text encoder's ``last_hidden_state`` (final layer norm applied; SD 2.x's 23-layer encoder is OpenCLIP-H's
  penultimate layer in diffusers' layout). The unconditional embedding (caption dropout, guidance) is that of "".
- SDXL (``StableDiffusionXLPipeline.encode_prompt``): both tokenizers, each encoder's ``hidden_states[-2]``
  (penultimate layer, no final norm), concatenated on the channel axis (768 + 1280 = 2048 at full size), and the
  second encoder's pooled projection (``text_embeds``) for the added embedding, beside ``time_ids`` = (original
  height, width, crop top, left, target height, width) per sample. With ``force_zeros_for_empty_prompt`` (SDXL's
  default, and its training: SGM zeroed dropped conditionings) the unconditional embedding and pooled vector are
  zeros: a caption dropped in training ("" from the data loader) is conditioned on zeros too.

Model code: no DeepSpeed here. The data loader's workers call ``tokenize``; the training step calls ``encode``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sd_ds.data.manifest import POOLED_PROMPT_EMBEDS, PROMPT_EMBEDS
from sd_ds.families import Family
from sd_ds.models import Components, tokenize

CONDITIONING_DUMP_ENV = "SD_DS_CONDITIONING_DUMP"
"""Test hook: a directory; each rank saves there (``rank{r}.{n}.pt``) the captions, keys and micro-conditioning of
each micro batch and the conditioning its UNet is fed, so a test can hold them against the pipeline's
encode_prompt."""
# Batch keys of the token ids, one per tokenizer in the family's order.
TOKEN_KEYS = ("input_ids", "input_ids_2")
EMPTY_CAPTION_KEY = "empty_caption"  # [B] bool: the caption was "" (dropped): unconditional for SDXL
GEOMETRY_KEYS = ("original_size", "crop_top_left", "target_size")  # [B, 2] int64 each, (h, w) / (top, left)
# Latent shards encoded with --text_embeddings: the stored conditioning, [B, L, D] and SDXL's [B, P].
STORED_KEYS = (PROMPT_EMBEDS, POOLED_PROMPT_EMBEDS)


@dataclass
class Conditioning:
    """The UNet's conditioning for one micro batch: ``unet(x, t, encoder_hidden_states, added_cond_kwargs=...)``."""

    encoder_hidden_states: torch.Tensor                       # [B, L, D]
    added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None  # SDXL: text_embeds [B, P], time_ids [B, 6]

    def to(self, dtype: torch.dtype) -> "Conditioning":
        # time_ids stay float32: the UNet embeds them sinusoidally in float32 anyway, and bf16 would round sizes
        # above 256 (1023 -> 1024).
        extra = None if self.added_cond_kwargs is None else {
            k: v if k == "time_ids" else v.to(dtype) for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states.to(dtype), extra)

    def rows(self, index: Any) -> "Conditioning":
        extra = None if self.added_cond_kwargs is None else {k: v[index] for k, v in self.added_cond_kwargs.items()}
        return Conditioning(self.encoder_hidden_states[index], extra)

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.encoder_hidden_states}
        if self.added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = self.added_cond_kwargs
        return kwargs


def time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, target_size: torch.Tensor) -> torch.Tensor:
    """SDXL's micro-conditioning [B, 6]: (original h, w, crop top, left, target h, w) in that order, as the
    pipeline's ``_get_add_time_ids`` and diffusers' SDXL training script build it (diffusers #5614)."""
    return torch.cat([original_size, crop_top_left, target_size], dim=1).float()


@dataclass(frozen=True)
class CaptionTokenizer:
    """Captions → {input_ids[, input_ids_2]: [B, max_length]} plus [B] bool ``empty_caption``: the family's
    tokenizers, each padding with its own pad token. Holds no model weights: it runs in the data loader's workers."""

    tokenizers: tuple[Any, ...]
    max_length: int

    def __call__(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = {key: tokenize(tok, captions, self.max_length) for key, tok in zip(TOKEN_KEYS, self.tokenizers)}
        out[EMPTY_CAPTION_KEY] = torch.tensor([c == "" for c in captions], dtype=torch.bool)
        return out


class PromptEncoder:
    """The family's prompt encoding: ``tokenize`` (a CaptionTokenizer: captions → token ids per tokenizer) and
    ``encode`` (token ids → Conditioning). ``text_encoders`` are the frozen ones; ``encode`` takes the trained ones
    when they train."""

    def __init__(self, family: Family, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], *,
                 max_length: int) -> None:
        if len(tokenizers) != len(family.tokenizers) or len(text_encoders) != len(family.text_encoders):
            raise ValueError(f"{family.name} needs {len(family.tokenizers)} tokenizer(s) and text encoder(s)")
        self.family, self.text_encoders = family, list(text_encoders)
        self.tokenize = CaptionTokenizer(tuple(tokenizers), max_length)  # what the data loader's workers call

    @classmethod
    def for_components(cls, components: Components, max_length: int) -> "PromptEncoder":
        return cls(components.family, components.tokenizers, components.text_encoders, max_length=max_length)

    def encode(self, tokens: dict[str, torch.Tensor], geometry: Optional[dict[str, torch.Tensor]] = None,
               text_encoders: Optional[Sequence[torch.nn.Module]] = None) -> Conditioning:
        """Conditioning on the text encoders' device. ``geometry`` (SDXL): the batch's original_size, crop_top_left
        and target_size [B, 2]. Runs under the caller's grad mode (trained encoders need gradients)."""
        encoders = list(text_encoders) if text_encoders is not None else self.text_encoders
        ids = [tokens[key] for key in TOKEN_KEYS[:len(encoders)]]
        if not self.family.penultimate_hidden_states:
            return Conditioning(encoders[0](ids[0])[0])  # last_hidden_state, final layer norm applied
        hidden, pooled = [], None
        for encoder, token_ids in zip(encoders, ids):
            out = encoder(token_ids, output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection's text_embeds: the pooled projection
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)  # [B, L, 768 + 1280]
        if pooled is None:
            raise ValueError("SDXL's last text encoder must give a pooled projection (CLIPTextModelWithProjection)")
        if self.family.force_zeros_for_empty_prompt and EMPTY_CAPTION_KEY in tokens:
            keep = (~tokens[EMPTY_CAPTION_KEY].to(embeds.device)).to(embeds.dtype)
            embeds = embeds * keep[:, None, None]
            pooled = pooled * keep.to(pooled.dtype)[:, None]
        if geometry is None or any(k not in geometry for k in GEOMETRY_KEYS):
            raise ValueError("SDXL conditions on each image's original size, crop and target size; this batch has "
                             "none (latent shards encoded without them? encode them again)")
        ids6 = time_ids(*(geometry[k].to(embeds.device) for k in GEOMETRY_KEYS))
        return Conditioning(embeds, {"text_embeds": pooled, "time_ids": ids6})

    def stored(self, embeds: dict[str, torch.Tensor], geometry: Optional[dict[str, torch.Tensor]] = None
               ) -> Conditioning:
        """The conditioning that latent shards encoded with --text_embeddings store for a batch (``encode`` of its
        captions, made once by ``python -m sd_ds.encode_latents``): ``prompt_embeds`` [B, L, D] and, SDXL,
        ``pooled_prompt_embeds`` [B, P], with SDXL's time_ids from the batch's ``geometry`` as ``encode`` builds
        them. On the embeddings' device, in their stored dtype (``Conditioning.to`` casts)."""
        hidden = embeds[PROMPT_EMBEDS]
        if not self.family.micro_conditioning:
            return Conditioning(hidden)
        if geometry is None or any(k not in geometry for k in GEOMETRY_KEYS):
            raise ValueError("SDXL conditions on each image's original size, crop and target size; this batch has "
                             "none (latent shards encoded without them? encode them again)")
        ids6 = time_ids(*(geometry[k].to(hidden.device) for k in GEOMETRY_KEYS))
        return Conditioning(hidden, {"text_embeds": embeds[POOLED_PROMPT_EMBEDS], "time_ids": ids6})

def dump_conditioning(batch: dict, conditioning: Conditioning, latents: torch.Tensor) -> None:
    """With ``CONDITIONING_DUMP_ENV`` set: write this micro batch's captions, keys and conditioning
    (``rank{r}.{n}.pt``, n counting the rank's micro batches)."""
    directory = os.environ.get(CONDITIONING_DUMP_ENV)
    if not directory:
        return
    rank = os.environ.get("RANK", "0")
    Path(directory).mkdir(parents=True, exist_ok=True)
    n = len(list(Path(directory).glob(f"rank{rank}.*.pt")))
    extra = conditioning.added_cond_kwargs or {}
    torch.save({"captions": list(batch["captions"]), "keys": list(batch["keys"]),
                "latent_hw": tuple(latents.shape[-2:]),
                "encoder_hidden_states": conditioning.encoder_hidden_states.float().cpu(),
                **{k: v.float().cpu() for k, v in extra.items()}}, Path(directory) / f"rank{rank}.{n}.pt")
