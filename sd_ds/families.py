"""Model families: what differs between SD v1, SD 2.x and SDXL, in one table, and which family a model is.

|                    | SD v1                      | SD 2.x                          | SDXL                                   |
|--------------------|----------------------------|---------------------------------|----------------------------------------|
| UNet               | 4 levels, 860 M            | 4 levels, linear projections,   | 3 levels, transformer depth [1, 2, 10],|
|                    | cross-attention 768        | 64-ch heads, cross-attn 1024    | cross-attn 2048, "text_time" embedding |
| text encoder(s)    | CLIP-L, last layer (normed)| OpenCLIP-H (23 layers in        | CLIP-L + OpenCLIP-bigG: penultimate    |
|                    |                            | diffusers' layout), last normed | hidden states concatenated, bigG pooled|
| tokenizer pad      | <|endoftext|>              | "!"                             | <|endoftext|>, "!"                     |
| micro-conditioning | -                          | -                               | time_ids (orig h,w, crop top,left,     |
|                    |                            |                                 | target h,w), pooled text_embeds        |
| empty prompt (CFG) | encodes ""                 | encodes ""                      | zeros (force_zeros_for_empty_prompt)   |
| pipeline           | StableDiffusionPipeline    | StableDiffusionPipeline         | StableDiffusionXLPipeline              |

A family is read from a model folder's configs, never from a flag: the UNet's ``addition_embed_type`` "text_time"
(and a second text encoder) make SDXL; otherwise the StableDiffusionPipeline kind, SD 2.x when its
transformers use linear projections (or its cross-attention width is OpenCLIP-H's 1024). ``check_components`` refuses a folder whose parts do not fit each
other (a mixed folder) with one line saying which part and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


class FamilyMismatchError(ValueError):
    """A model folder whose components do not belong to one family (or do not fit each other)."""


@dataclass(frozen=True)
class Family:
    name: str                   # "sd-v1" | "sd-v2" | "sdxl"
    pipeline_class: str         # the diffusers pipeline that draws with it
    text_encoders: tuple[str, ...]  # subfolders, in the order the pipeline concatenates them
    tokenizers: tuple[str, ...]
    penultimate_hidden_states: bool  # SDXL conditions on hidden_states[-2]; SD v1/2 on last_hidden_state
    micro_conditioning: bool    # SDXL: pooled text embeds + time_ids through added_cond_kwargs
    force_zeros_for_empty_prompt: bool  # the unconditional embedding is zeros, not the encoded ""

    @property
    def is_sdxl(self) -> bool:
        return self.micro_conditioning


SD_V1 = Family("sd-v1", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), False, False, False)
SD_V2 = Family("sd-v2", "StableDiffusionPipeline", ("text_encoder",), ("tokenizer",), False, False, False)
SDXL = Family("sdxl", "StableDiffusionXLPipeline", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"),
              True, True, True)
FAMILIES = {f.name: f for f in (SD_V1, SD_V2, SDXL)}

# The SDXL UNet's added embedding: 6 micro-conditioning numbers, each through a sinusoidal embedding of
# addition_time_embed_dim, concatenated with the second text encoder's pooled projection.
TIME_IDS = 6


def family_of_unet(unet_config: dict[str, Any]) -> Family:
    """The family a UNet config belongs to."""
    if unet_config.get("addition_embed_type") == "text_time":
        return SDXL
    if unet_config.get("addition_embed_type") not in (None, ""):
        raise FamilyMismatchError(f"UNet addition_embed_type {unet_config['addition_embed_type']!r}: sd-ds trains "
                                  "SD v1, SD 2.x and SDXL UNets (none or 'text_time')")
    # SD 2.x's transformers use linear projections (SD v1's 1x1 convolutions); 1024-wide cross-attention too.
    return SD_V2 if unet_config.get("use_linear_projection") or unet_config.get("cross_attention_dim") == 1024 else SD_V1


def family_of_pipeline(model_index: Optional[dict[str, Any]]) -> Optional[str]:
    """'sdxl', 'sd' or None (no model_index.json, or another pipeline) from a folder's model_index.json."""
    name = (model_index or {}).get("_class_name", "")
    if name.startswith("StableDiffusionXL"):
        return "sdxl"
    if name.startswith("StableDiffusion"):
        return "sd"
    return None


def text_widths(text_encoder_configs: list[dict[str, Any]]) -> tuple[int, Optional[int]]:
    """(cross-attention width the encoders give: their hidden sizes summed, the last one's projection_dim)."""
    hidden = sum(int(c["hidden_size"]) for c in text_encoder_configs)
    projection = text_encoder_configs[-1].get("projection_dim") if text_encoder_configs else None
    return hidden, projection


def check_components(family: Family, unet_config: dict[str, Any], text_encoder_configs: list[dict[str, Any]],
                     *, where: str, model_index: Optional[dict[str, Any]] = None) -> None:
    """Refuse components that do not make one model of ``family``: a text encoder count or width that does not fit
    the UNet's cross-attention, an SDXL added-embedding width that does not fit the pooled projection, a pipeline
    index of another family. One line (FamilyMismatchError) naming ``where`` and the disagreement."""
    check_pipeline_index(family, model_index, where=where)
    if len(text_encoder_configs) != len(family.text_encoders):
        raise FamilyMismatchError(f"{where}: {family.name} takes {len(family.text_encoders)} text encoder(s) "
                                  f"({', '.join(family.text_encoders)}), found {len(text_encoder_configs)}: the folder "
                                  "mixes model families")
    hidden, projection = text_widths(text_encoder_configs)
    width = unet_config.get("cross_attention_dim")
    if hidden != width:
        parts = " + ".join(str(c["hidden_size"]) for c in text_encoder_configs)
        raise FamilyMismatchError(f"{where}: the text encoder(s) give {parts} = {hidden}-wide embeddings, the UNet's "
                                  f"cross_attention_dim is {width}: they do not fit ({family.name})")
    if family.is_sdxl:
        expected = int(unet_config.get("addition_time_embed_dim") or 0) * TIME_IDS + int(projection or 0)
        got = unet_config.get("projection_class_embeddings_input_dim")
        if got != expected:
            raise FamilyMismatchError(
                f"{where}: the UNet's projection_class_embeddings_input_dim is {got}, but {TIME_IDS} time ids x "
                f"addition_time_embed_dim {unet_config.get('addition_time_embed_dim')} + text_encoder_2's "
                f"projection_dim {projection} = {expected}")


def check_pipeline_index(family: Family, model_index: Optional[dict[str, Any]], *, where: str) -> None:
    """Refuse a folder whose model_index.json names another family's pipeline than ``family``'s."""
    indexed = family_of_pipeline(model_index)
    if indexed is not None and (indexed == "sdxl") != family.is_sdxl:
        raise FamilyMismatchError(f"{where}: model_index.json names {model_index['_class_name']} but the UNet is "
                                  f"{family.name}'s: the folder mixes model families")
