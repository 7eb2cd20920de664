"""Loading the Stable Diffusion components (no DeepSpeed here).

Every component loads with ``from_pretrained`` from a hub id or a local directory: from the subfolders of
``pretrained_model_name_or_path`` (``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler``; SDXL also
``text_encoder_2``, ``tokenizer_2``), each overridable on its own. The model family (SD v1, SD 2.x, SDXL:
``sd_ds.families``) is read from the UNet's config, and the parts are checked to make one model of it. A UNet location holding only a config is built from it and randomly initialised —
pretraining from scratch — with the output projections zeroed as latent diffusion does.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from sd_ds.config import ModelConfig
from sd_ds.families import SD_V1, Family, check_components, family_of_unet
from sd_ds.memory_format import to_channels_last

if TYPE_CHECKING:  # imported lazily below: diffusers/transformers take seconds to import
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


logger = logging.getLogger("sd_ds.models")

# OpenAI CLIP ViT-L/14's tokenizer (SD v1), built by tools/build_clip_tokenizer.py; see its PROVENANCE.md.
CLIP_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "clip_tokenizer"
# Files whose presence means a UNet folder holds weights (any variant/shard), so it must not be randomly
# initialised: a fp16-variant folder silently trained from scratch would be a costly surprise.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
INIT_COMMAND = ("python -m sd_ds.init --output_dir DIR --preset sd-v1 --source CompVis/stable-diffusion-v1-4"
                " (or --preset tiny, offline)")


@dataclass
class Components:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    noise_scheduler: DDPMScheduler
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None  # SDXL's OpenCLIP-bigG
    tokenizer_2: Optional[CLIPTokenizer] = None
    family: Family = SD_V1

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        """The frozen text encoders, in the order the family's pipeline concatenates them."""
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def tokenizers(self) -> list[Any]:
        return [self.tokenizer] + ([self.tokenizer_2] if self.tokenizer_2 is not None else [])


class ModelNotFoundError(FileNotFoundError):
    """A component is not at the given path/id (or not reachable offline)."""


def model_not_found(what: str, where: str, err: Exception) -> ModelNotFoundError:
    reason = str(err).splitlines()[0] if str(err) else ""
    return ModelNotFoundError(
        f"could not load the {what} from {where!r} ({type(err).__name__}: {reason}). "
        "Pass a local directory or a reachable hub id (HF_HUB_OFFLINE=1 allows only local folders and the "
        f"local hub cache); to create a from-scratch model directory run `{INIT_COMMAND}`.")


def from_pretrained(cls: Any, what: str, path_or_id: str, subfolder: Optional[str] = None, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with a message that says what to pass when the component is not there."""
    try:
        return cls.from_pretrained(path_or_id, **({"subfolder": subfolder} if subfolder else {}), **kwargs)
    except (OSError, ValueError) as e:
        raise model_not_found(what, f"{path_or_id}{'/' + subfolder if subfolder else ''}", e) from e


def _location(override: Optional[str], base: Optional[str], subfolder: str, what: str,
              flag: Optional[str]) -> tuple[str, Optional[str]]:
    """(path or id, subfolder) of one component: its own flag wins over the model folder's subfolder."""
    if override:
        return override, None
    if base:
        return base, subfolder
    own = f" (or {flag})" if flag else ""
    raise ModelNotFoundError(f"no {what} given: pass --pretrained_model_name_or_path{own}; "
                             f"to create a model directory run `{INIT_COMMAND}`")


@contextlib.contextmanager
def seeded_torch_rng(seed: Optional[int]) -> Iterator[None]:
    """Seed the CPU RNG for a block and restore the caller's state afterwards: the trainer has already given
    each rank its own RNG stream (noise, timesteps) and must get it back unchanged after a seeded init."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def clean_caption(text: str) -> str:
    """OpenAI CLIP's caption clean-up (``basic_clean`` + ``whitespace_clean`` of its SimpleTokenizer): ftfy's
    text repair (which also straightens curly quotes), HTML entities unescaped, whitespace collapsed. The
    transformers tokenizer skips these steps; applying them first makes our ids identical to CLIP's own."""
    import html
    import re

    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:  # ftfy is in requirements.txt; without it only mojibake/quote repair is lost
        pass
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


# Clean-up and tokenizing cost microseconds per character (a 5 MB caption took 7 s per sample; ftfy's clean-up
# pays per line as well), so a caption far longer than the token window is cut before either runs. CLIP's longest
# token spans 32 bytes, so max_length tokens come from at most 32 x max_length non-space characters; clean-up may
# shrink text (HTML entities, ftfy's repairs), hence twice that. Every normal caption (at 77 tokens: up to 4,928
# non-space characters) is tokenized whole.
CAPTION_CHARS_PER_TOKEN = 64


def _after_non_space(text: str, count: int) -> Optional[int]:
    """The index just past the ``count``-th non-whitespace character of ``text``; None when it has fewer."""
    import re

    match = re.match(r"(?:\s*\S){%d}" % count, text)
    return match.end() if match else None


def cut_caption(text: str, max_length: int) -> str:
    """The start of a caption that gives the same first ``max_length`` token ids as all of it: the whole words that
    hold its first 64 x max_length non-space characters (whitespace, which clean-up collapses, is not counted, up
    to as many characters again). The ids are the whole caption's whenever those characters make max_length
    tokens: any text whose clean-up does not shrink it to less than half (only a run of HTML entities or mojibake
    without spaces would). A caption within the bound is returned as it is."""
    budget = CAPTION_CHARS_PER_TOKEN * max_length
    if len(text) <= budget:
        return text
    window = text[:2 * budget]
    end = _after_non_space(window, budget) or len(window)
    if end >= len(text):
        return text
    head = text[:end]
    # A word cut in two tokenizes differently: end at the last whitespace, if there is one.
    space = max(head.rfind(c) for c in " \t\n\r\f\v")
    return head[:space] if space > 0 else head


def tokenize(tokenizer: Any, captions: list[str], max_length: int) -> torch.Tensor:
    """Token ids [B, max_length]: cleaned as CLIP does, padded with <|endoftext|> as SD v1, truncated (a caption far
    longer than the window is cut first: ``cut_caption``)."""
    return tokenizer([clean_caption(cut_caption(c, max_length)) for c in captions], padding="max_length",
                     max_length=max_length, truncation=True, return_tensors="pt").input_ids


def zero_output_projections(unet: torch.nn.Module) -> int:
    """Zero what latent diffusion's ``zero_module`` zeroes (CompVis ``openaimodel.py``; ppdiffusers'
    ``train_txt2img_laion400m`` does the same in its ``init_weights``): the final ``conv_out``, each ResNet
    block's ``conv2`` and each transformer block's ``proj_out`` (weights and biases). Every residual branch then
    starts as the identity, so a deep random UNet keeps unit-scale activations, and the first noise prediction is
    exactly 0 (loss = E[target²], no early blow-up). Training is not stuck: ``conv_out`` gets gradients from the
    first step and the rest follow once it is non-zero. Returns how many layers were zeroed."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    zeroed = []
    for module in unet.modules():
        if isinstance(module, ResnetBlock2D):
            zeroed.append(module.conv2)
        elif isinstance(module, Transformer2DModel):
            zeroed.append(module.proj_out)
    zeroed.append(unet.conv_out)
    with torch.no_grad():
        for m in zeroed:
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    return len(zeroed)


def _config_only_path(path: Path) -> Optional[Path]:
    """The config to build from when `path` holds a UNet config but no weights, else None."""
    if path.is_file() and path.suffix == ".json":
        return path
    if path.is_dir() and not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
        for name in ("config.json", "unet_config.json"):
            if (path / name).is_file():
                return path / name
    return None


def build_unet(config: dict[str, Any], seed: Optional[int] = None) -> UNet2DConditionModel:
    """A randomly initialised UNet (from-scratch pretraining), output projections zeroed. With a seed the weights
    are the same on every rank and every run, and the caller's RNG state is left as it was."""
    from diffusers import UNet2DConditionModel

    with seeded_torch_rng(seed):
        unet = UNet2DConditionModel.from_config(config)
    zero_output_projections(unet)
    return unet


def load_unet(path_or_id: str, subfolder: Optional[str] = None, seed: Optional[int] = None) -> UNet2DConditionModel:
    """``from_pretrained``, or a random init when the location holds only a config (``config.json`` without
    weights, a ``unet_config.json``, or a path to a .json file)."""
    from diffusers import UNet2DConditionModel

    local = Path(path_or_id) / (subfolder or "")
    config_path = _config_only_path(local) if local.exists() else None
    if config_path is not None:
        unet = build_unet(json.loads(config_path.read_text()), seed=seed)
        logger.info("UNet randomly initialised from %s (seed %s), output projections zeroed", config_path, seed)
        return unet
    return from_pretrained(UNet2DConditionModel, "UNet", path_or_id, subfolder)


def load_tokenizer(path_or_id: str, subfolder: Optional[str] = None, model_max_length: int = 77) -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    where = f"{path_or_id}{'/' + subfolder if subfolder else ''}"
    tokenizer = from_pretrained(CLIPTokenizer, "tokenizer", path_or_id, subfolder, model_max_length=model_max_length)
    # transformers 5 returns a tokenizer holding only the special tokens when it finds no vocabulary files;
    # a byte-level BPE always has at least its 256 byte symbols.
    if len(tokenizer.get_vocab()) <= 256:
        raise model_not_found("tokenizer", where, FileNotFoundError(
            f"no vocabulary there (vocab.json + merges.txt or tokenizer.json); the CLIP tokenizer SD v1 uses "
            f"ships with sd-ds in {CLIP_TOKENIZER_DIR}"))
    return tokenizer


def save_tokenizer(tokenizer: CLIPTokenizer, directory: str | Path) -> None:
    """``save_pretrained`` plus vocab.json/merges.txt: transformers 5 writes only tokenizer.json, which the slow
    ``CLIPTokenizer`` of transformers 4 (what a v4 diffusers pipeline loads) cannot read."""
    directory = Path(directory)
    tokenizer.save_pretrained(directory)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not (directory / "vocab.json").is_file():
        backend.model.save(str(directory))  # a BPE model writes vocab.json + merges.txt


def load_components(pretrained_model_name_or_path: Optional[str], *, unet_name_or_path: Optional[str] = None,
                    vae_name_or_path: Optional[str] = None, text_encoder_name_or_path: Optional[str] = None,
                    tokenizer_name: Optional[str] = None, text_encoder_2_name_or_path: Optional[str] = None,
                    tokenizer_2_name: Optional[str] = None, prediction_type: Optional[str] = None,
                    model_max_length: int = 77, seed: Optional[int] = None) -> Components:
    """All components of the UNet's family, each from ``pretrained_model_name_or_path/<subfolder>`` unless its own
    path/id is given. ``seed`` seeds a config-only UNet's random init; ``prediction_type`` overrides the
    scheduler's. Parts that do not make one model of the family raise FamilyMismatchError (one line)."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = pretrained_model_name_or_path
    unet = load_unet(*_location(unet_name_or_path, base, "unet", "UNet", "--unet_name_or_path"), seed=seed)
    family = family_of_unet(dict(unet.config))

    def load(cls: Any, what: str, where: tuple[str, Optional[str]], **kw: Any) -> Any:
        return from_pretrained(cls, what, *where, **kw)

    vae = load(AutoencoderKL, "VAE", _location(vae_name_or_path, base, "vae", "VAE", "--vae_name_or_path"))
    text_encoder = load(CLIPTextModel, "text encoder", _location(
        text_encoder_name_or_path, base, "text_encoder", "text encoder", "--text_encoder_name_or_path"))
    tokenizer = load_tokenizer(*_location(tokenizer_name, base, "tokenizer", "tokenizer", "--tokenizer_name"),
                               model_max_length=model_max_length)
    text_encoder_2 = tokenizer_2 = None
    if family.is_sdxl:
        text_encoder_2 = load(CLIPTextModelWithProjection, "second text encoder (SDXL)", _location(
            text_encoder_2_name_or_path, base, "text_encoder_2", "second text encoder",
            "--text_encoder_2_name_or_path"))
        tokenizer_2 = load_tokenizer(*_location(tokenizer_2_name, base, "tokenizer_2", "second tokenizer",
                                                "--tokenizer_2_name"), model_max_length=model_max_length)
    check_components(family, dict(unet.config), [dict(e.config.to_dict()) for e in
                                                 (text_encoder, text_encoder_2) if e is not None],
                     where=base or unet_name_or_path or "the model", model_index=_model_index(base))
    # DDPM for training whatever scheduler the folder names (SD v1 ships a PNDM config): only the noise
    # schedule (betas, timesteps, prediction type) is read from it.
    noise_scheduler = load(DDPMScheduler, "noise scheduler",
                           _location(None, base, "scheduler", "noise scheduler", None),
                           **({"prediction_type": prediction_type} if prediction_type else {}))
    return Components(unet, vae, text_encoder, tokenizer, noise_scheduler, text_encoder_2, tokenizer_2, family)


def load_text_side(pretrained_model_name_or_path: str, *, text_encoder_name_or_path: Optional[str] = None,
                   tokenizer_name: Optional[str] = None, text_encoder_2_name_or_path: Optional[str] = None,
                   tokenizer_2_name: Optional[str] = None, model_max_length: int = 77
                   ) -> tuple[Family, list[Any], list[torch.nn.Module]]:
    """(family, tokenizers, text encoders) of a model folder, without its UNet weights or VAE: what precomputing
    text conditioning needs (``python -m sd_ds.encode_latents --text_embeddings``). The family is read from the
    UNet's config and the encoders checked to fit it, as ``load_components`` does; the encoders frozen, float32."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    base = pretrained_model_name_or_path
    try:
        unet_config = dict(UNet2DConditionModel.load_config(base, subfolder="unet"))
    except (OSError, ValueError) as e:
        raise model_not_found("UNet config", f"{base}/unet", e) from e
    family = family_of_unet(unet_config)
    overrides = {"text_encoder": (text_encoder_name_or_path, tokenizer_name, CLIPTextModel),
                 "text_encoder_2": (text_encoder_2_name_or_path, tokenizer_2_name, CLIPTextModelWithProjection)}
    tokenizers, encoders = [], []
    for encoder_sub, tokenizer_sub in zip(family.text_encoders, family.tokenizers):
        encoder_path, tokenizer_path, cls = overrides[encoder_sub]
        flag = "--" + encoder_sub + "_name_or_path"
        encoders.append(from_pretrained(cls, encoder_sub.replace("_", " "),
                                        *_location(encoder_path, base, encoder_sub, encoder_sub, flag)))
        tokenizers.append(load_tokenizer(*_location(tokenizer_path, base, tokenizer_sub, tokenizer_sub, None),
                                         model_max_length=model_max_length))
    check_components(family, unet_config, [dict(e.config.to_dict()) for e in encoders], where=base,
                     model_index=_model_index(base))
    for encoder in encoders:
        freeze(encoder)
    return family, tokenizers, encoders


def _model_index(base: Optional[str]) -> Optional[dict]:
    """A local model folder's model_index.json (hub ids: None; their components are checked all the same)."""
    path = Path(base) / "model_index.json" if base else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def build_components(model_cfg: "ModelConfig", *, seed: int) -> Components:
    """The five components set up for training: a config-only UNet initialised from ``seed`` (the same on every
    rank), its attention backend and activation checkpointing set, the VAE frozen, the text encoder frozen
    unless it is trained. (--torch_compile is applied by the trainer: ``sd_ds.compile.prepare_compile``.)"""
    components = load_components(
        model_cfg.pretrained_model_name_or_path, unet_name_or_path=model_cfg.unet_name_or_path,
        vae_name_or_path=model_cfg.vae_name_or_path, text_encoder_name_or_path=model_cfg.text_encoder_name_or_path,
        tokenizer_name=model_cfg.tokenizer_name, text_encoder_2_name_or_path=model_cfg.text_encoder_2_name_or_path,
        tokenizer_2_name=model_cfg.tokenizer_2_name, prediction_type=model_cfg.prediction_type,
        model_max_length=model_cfg.model_max_length, seed=seed)
    return prepare_components(components, model_cfg)


def prepare_components(components: Components, model_cfg: "ModelConfig") -> Components:
    """Loaded components set up for training as the model flags say: the UNet's attention backend, activation
    checkpointing and compilation, cuDNN's autotuner, the frozen parts frozen. The trainer's and the GPU
    benchmark's one path (bench/bench_gpu_throughput.py builds its components in memory, then calls this)."""
    configure_unet(components.unet, recompute=model_cfg.recompute,
                   xformers=model_cfg.enable_xformers_memory_efficient_attention)
    if model_cfg.cudnn_benchmark and torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
    freeze(components.vae)
    if model_cfg.channels_last:
        to_channels_last([components.vae])  # frozen: its weights are ours to lay out (the UNet's are ZeRO's)
    if not model_cfg.train_text_encoder:
        for encoder in components.text_encoders:
            freeze(encoder)
    return components


def configure_unet(unet: UNet2DConditionModel, *, recompute: bool, xformers: bool, compile: bool = False) -> None:
    """Attention backend (PyTorch SDPA, or xformers on request), activation checkpointing and torch.compile of the
    UNet's blocks (``sd_ds.compile.compile_regions``, static shapes; the trainer compiles through
    ``sd_ds.compile.prepare_compile``, which also loads the run's saved kernels)."""
    if xformers:
        try:
            import xformers  # noqa: F401
        except ImportError as e:
            raise RuntimeError(
                "--enable_xformers_memory_efficient_attention (or FLAG_XFORMERS=1) needs xformers: "
                "`pip install xformers` matching your torch build, or drop the flag to use PyTorch SDPA") from e
        unet.enable_xformers_memory_efficient_attention()
    else:
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())  # PyTorch scaled_dot_product_attention (flash/mem-efficient)
    if recompute:
        unet.enable_gradient_checkpointing()
    if compile:
        from sd_ds.compile import compile_regions

        compile_regions(unet)


def freeze(module: torch.nn.Module) -> None:
    """Frozen for training: no gradients, eval mode (no dropout)."""
    module.requires_grad_(False)
    module.eval()
