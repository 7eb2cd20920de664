"""The trainer's one typed configuration.

Each field's ``help`` is its documentation and its ``--help`` text. Flag names are those of the seed
project (ppdiffusers' ``train_txt2img_laion400m_trainer.py``), so its command line ports over unchanged,
HF-style booleans included (``--bf16 True``, ``--disable_tqdm True``, or a bare ``--use_ema``).
Unknown flags are errors. Batch sizes are stated once here and derived everywhere else.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
PREDICTION_TYPES = ("epsilon", "v_prediction")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in ("1", "true", "t", "yes", "y", "on"):
        return True
    if v in ("0", "false", "f", "no", "n", "off", ""):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (True/False), got {value!r}")


def xformers_installed() -> bool:
    # Checked at parse time, without importing it (an import initialises CUDA), so a run stops before any model loads.
    return importlib.util.find_spec("xformers") is not None


def _env_flag(name: str) -> bool:
    return str2bool(os.environ.get(name, "0") or "0")


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: Optional[str] = _f(
        None, "Model directory or hub id holding unet/ vae/ text_encoder/ tokenizer/ scheduler/ subfolders. "
        "Make a from-scratch one with `python -m sd_ds.init`.")
    unet_name_or_path: Optional[str] = _f(
        None, "UNet override (path or hub id). A directory with only a config (config.json or unet_config.json) "
        "is randomly initialised.")
    vae_name_or_path: Optional[str] = _f(None, "VAE override (path or hub id); frozen.")
    text_encoder_name_or_path: Optional[str] = _f(None, "CLIP text encoder override (path or hub id); frozen unless --train_text_encoder.")
    tokenizer_name: Optional[str] = _f(None, "Tokenizer override (path or hub id).")
    text_encoder_2_name_or_path: Optional[str] = _f(
        None, "SDXL's second text encoder (OpenCLIP-bigG, CLIPTextModelWithProjection) override (path or hub id).")
    tokenizer_2_name: Optional[str] = _f(None, "SDXL's second tokenizer override (path or hub id).")
    model_max_length: int = _f(77, "Token length captions are padded/truncated to.")
    prediction_type: Optional[str] = _f(
        None, "epsilon | v_prediction. Default: the noise scheduler config's.", choices=PREDICTION_TYPES)
    train_text_encoder: bool = _f(False, "Also train the text encoder (second parameter group).")
    recompute: bool = _f(False, "Activation checkpointing in the UNet (env FLAG_RECOMPUTE=1 also turns it on).")
    enable_xformers_memory_efficient_attention: bool = _f(
        False, "Use xformers attention (env FLAG_XFORMERS=1 too). Without xformers installed the trainer stops at "
        "argument parsing (exit 2), before loading any model, naming the install command. Default: PyTorch SDPA.")
    torch_compile: bool = _f(
        False, "torch.compile the UNet in regions, in place (parameter names, checkpoints and EMA unchanged): each "
        "down/mid/up block (a block above two ZeRO reduce buckets, SDXL's largest, per ResNet/transformer), so that "
        "inductor fuses the memory-bound glue (bias adds, GroupNorm, SiLU, residual adds, casts) while ZeRO-2 still "
        "reduces each region's gradients as the backward goes on; the frozen VAE's encoder too (image shards). "
        "Static shapes; with --aspect_ratio_buckets height and width are dynamic (one compile per region for all "
        "buckets). Periodic evaluation runs eager. The compiled kernels are saved in OUTPUT_DIR/compile_cache/ "
        "after the first step and loaded at launch, so a restart (fresh nodes too) does not compile again "
        "(sd_ds/compile.py). On CPU ranks a tiny-preset step is 5-7 %% faster compiled, after minutes of "
        "compile (bench/bench_compile.py, bench/bench_memory_format.py); off until a GPU run of bench/bench_compile.py shows the gain there.")
    channels_last: bool = _f(
        False, "Channels-last (NHWC) activations for the UNet, and channels-last weights and activations for the "
        "frozen VAE (the trained weights stay in ZeRO's flat NCHW buffers). Pays only inside --torch_compile's "
        "regions, where inductor lays out the glue around the convolutions: in eager mode CUDA's GroupNorm computes "
        "NCHW (the layout flips back at each block's first GroupNorm) and diffusers makes a transformer's output "
        "and a shortcut's input NCHW-contiguous. Measured on CPU (bench/bench_memory_format.py): "
        "no faster, eager or compiled; off until a GPU run with --torch_compile shows the gain.")
    cudnn_benchmark: bool = _f(
        False, "torch.backends.cudnn.benchmark on CUDA: with fixed training shapes cuDNN picks the fastest "
        "convolution algorithms once; off until a GPU benchmark shows the gain.")

    def __post_init__(self) -> None:
        # The seed reads these switches from the environment as well; either source turns them on.
        self.recompute = self.recompute or _env_flag("FLAG_RECOMPUTE")
        self.enable_xformers_memory_efficient_attention = (
            self.enable_xformers_memory_efficient_attention or _env_flag("FLAG_XFORMERS"))


@dataclass
class DataConfig:
    train_shards: list[str] = _f(
        [], "Webdataset shards: paths or URLs (s3://, gs://, http(s)://, any fsspec URL; credentials and endpoints "
        "the store's standard way, e.g. AWS_* variables and AWS_ENDPOINT_URL) with brace patterns "
        "(dir/{00000..00099}.tar), webdataset's pipe:COMMAND shards (read front to back; the shard a command names "
        "gives its name and sizes.json), directories or URL prefixes (a converter output dir mixes its sources by their "
        "filelist weights; its sizes.json and sources.json are read from the same place), globs, or URL::weight "
        "for mixtures. A directory written by `python -m sd_ds.encode_latents` (latent shards, recognised by its "
        "latents.json) trains on precomputed VAE moments instead of images; latent and image shards cannot be "
        "mixed in one run. Shards no sizes.json lists are counted once per run (each by one rank), or once and "
        "for all by `python -m sd_ds.data.index DIR_OR_URL`.",
        nargs="+")
    file_list: Optional[str] = _f(
        None, "The seed's train.filelist.list of raw LAION parts. Not read directly: convert it first with "
        "tools/convert_laion_to_wds.py (the trainer says how).")
    resolution: int = _f(256, "Training image size (square crops; with --aspect_ratio_buckets, the buckets' area is "
                         "about resolution²).")
    aspect_ratio_buckets: str = _f(
        "off", "off (square crops), auto, or FILE (one WxH per line): train on aspect-ratio buckets, one bucket per "
        "micro batch. auto: sides a multiple of the model's divisor (VAE x UNet downsampling: 64 px for SD v1/v2/"
        "SDXL, 16 for the tiny preset), aspect 1:4 to 4:1, area within (0.9, 1] x resolution² (SDXL's list at "
        "1024). A sample goes to the bucket nearest its aspect ratio (by the width/height in its JSON or its image "
        "header; beyond the list: the extreme bucket, counted as data/aspect_clamped), is resized to cover it and "
        "cropped (--center_crop, --random_flip as for squares). Sizes come from each shard's .sizes index "
        "(python -m sd_ds.data.index) or are read once per run. Latent shards must have been encoded with the "
        "same list (python -m sd_ds.encode_latents --aspect_ratio_buckets).", metavar="auto|FILE|off")
    center_crop: bool = _f(False, "Center crop instead of random crop (latent shards hold the centre crop they "
                           "were encoded with).")
    random_flip: bool = _f(False, "Random horizontal flip (latent shards: needs shards encoded with --flip_variants).")
    min_size: Optional[int] = _f(
        None, "Skip (and count) images whose shorter side is below this many pixels. Default: no minimum; smaller "
        "images are upscaled to --resolution as the seed's transform does.")
    caption_dropout_prob: float = _f(
        0.1, "Probability a caption is replaced by \"\" (for classifier-free guidance). 0.1 is the seed's rate: "
        "ppdiffusers' examples/text_to_image_laion400m text_image_pair_dataset.py parse_line empties the caption "
        "when random.random() < 0.1.")
    shuffle_block: int = _f(
        1000, "The epoch's order is shuffled within consecutive blocks of this many samples (of all sources, mixed "
        "by weight), the same on any number of ranks and workers; a reader holds one block at most. "
        "--shuffle_buffer, the seed's spelling, is accepted for it.", aliases=("--shuffle_buffer",))
    resample_shards: bool = _f(
        False, "Draw each pass's shards with replacement instead of a shuffle. (Not needed for few shards: every "
        "reader gets an exact share of the samples whatever the shard count.)")
    samples_per_epoch: Optional[int] = _f(
        None, "Samples per epoch over all ranks (default: all samples in the shards; a skipped corrupt sample "
        "counts, its place in a batch is taken by a repeat).")
    dataloader_num_workers: Optional[int] = _f(
        None, "Data loader worker processes per rank. Default: on GPUs min(8, CPU cores per rank - 1): a worker "
        "decodes and crops ~150 256-px JPEGs/s, an H100 trains ~400-700 images/s at 256 px (latent shards need "
        "far fewer); on CPU ranks 2. A warning says when the model waited for data more than 10%% of the time.")
    storage_retry_timeout: float = _f(
        120.0, "Seconds a read from object storage keeps being retried, with growing waits, while the store fails "
        "transiently (HTTP 5xx, 429, timeouts, dropped connections, S3 SlowDown) before the run stops with one "
        "line naming the shard. A retried shard read starts again at the sample it was reading, so the run serves "
        "exactly the samples of a run without failures; retries are counted (the data/storage_retries metric). "
        "0: stop at the first failure.")


@dataclass
class DiffusionConfig:
    noise_offset: float = _f(0.0, "Noise offset (https://www.crosslabs.org/blog/diffusion-with-offset-noise); 0 = off.")
    input_perturbation: float = _f(0.0, "Input perturbation of the noised latents only (arXiv:2301.11706); 0 = off.")
    snr_gamma: Optional[float] = _f(None, "Min-SNR-gamma loss weighting (arXiv:2303.09556), e.g. 5.0; unset = off.")


@dataclass
class OptimConfig:
    per_device_train_batch_size: int = _f(8, "Micro batch size per rank (device).")
    gradient_accumulation_steps: int = _f(1, "Micro batches accumulated (in fp32) per optimizer step.")
    learning_rate: float = _f(1e-4, "Peak learning rate (default for every parameter group).")
    unet_learning_rate: Optional[float] = _f(None, "UNet learning rate (default: --learning_rate).")
    text_encoder_learning_rate: Optional[float] = _f(None, "Text encoder learning rate (default: --learning_rate).")
    text_encoder_2_learning_rate: Optional[float] = _f(
        None, "SDXL's second text encoder's learning rate with --train_text_encoder (default: "
        "--text_encoder_learning_rate, else --learning_rate).")
    weight_decay: float = _f(0.01, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.999, "AdamW beta2.")
    adam_epsilon: float = _f(1e-8, "AdamW epsilon.")
    lr_scheduler_type: str = _f("constant", "Learning-rate schedule (diffusers.optimization.get_scheduler).", choices=LR_SCHEDULES)
    warmup_steps: int = _f(0, "Linear warm-up steps.")
    max_grad_norm: float = _f(1.0, "Gradient clipping norm; -1 (or 0) turns clipping off.")
    max_consecutive_skipped_steps: int = _f(
        100, "Stop with an error (the newest checkpoint keeps the last good weights) after this many optimizer "
        "steps in a row were skipped for non-finite gradients; 0 = never stop. 100 is well above the streak "
        "fp16's dynamic loss scale may skip while it settles (one halving per skip, from 2^16 down: at most "
        "~16-32), and a handful of bad batches; a real divergence skips every step from then on.")
    bf16: Optional[bool] = _f(
        None, "bfloat16 mixed precision. Default: on GPUs unless --fp16; on CPU ranks only where the CPU runs bf16 "
        "natively (oneDNN with AVX-512-BF16/AMX), else fp32, said in one line: bf16 without those instructions "
        "trains ~20x slower (bench/bench_precision.py). --bf16 True forces it anywhere (with a warning on such "
        "CPUs); --bf16 False trains in fp32.")
    fp16: bool = _f(
        False, "float16 mixed precision, MLPerf's recipe: fp16 weights and gradients, fp32 master weights, dynamic "
        "loss scaling from 2^16 (ds_configs/zero2_fp16.json); a VAE whose config says fp16 overflows it "
        "(force_upcast: SDXL's) stays fp32. Not the default: bf16 has fp32's exponent range, so nothing overflows, "
        "no step is skipped while a loss scale settles and no attention or VAE needs upcasting, at the same "
        "tensor-core rate on A100/H100/H200 (bench/bench_fp16.py). CPU ranks need native fp16 (AVX-512-FP16 "
        "or AMX-FP16): elsewhere DeepSpeed refuses it (one line, exit 2).")
    fp16_opt_level: str = _f(
        "O2", "Apex-style level kept for the seed's command line: O2 = DeepSpeed fp16 (fp16 weights, fp32 master). "
        "O1 (autocast over fp32 weights) is not offered by this trainer and is rejected.", choices=("O1", "O2"))
    deepspeed: Optional[str] = _f(
        None, "DeepSpeed JSON with engine settings only (ZeRO stage, offload, ...). Default: env DS_CONFIG, else "
        "ds_configs/zero2_bf16.json (zero2_fp16.json with --fp16, zero2_fp32.json with --bf16 False). "
        "ds_configs/zero2_bf16_offload.json keeps the fp32 master weights and Adam state in host memory (12 bytes "
        "per parameter off the GPU) at a cost: DeepSpeed's CPU Adam runs the update on the host, sd-ds's streamlined "
        "step is off, and DeepSpeed reads the device from the host about twice per parameter tensor per step "
        "(~1,400 syncs at SD v1). Use it only when the model does not fit otherwise; SD v1 at micro batch 64 fits "
        "an 80 GB GPU without it.")


@dataclass
class EMAConfig:
    use_ema: bool = _f(False, "Keep an EMA of the weights, sharded over ranks (env FLAG_USE_EMA=1 too).")
    ema_decay: float = _f(0.9999, "EMA decay.")
    ema_warmup: bool = _f(
        True, "Warm the decay up, as the seed's EMA (LDM's LitEma) does: the n-th averaging update (n = 0, 1, ...) "
        "uses min(--ema_decay, (1+n)/(10+n)), i.e. 0.1 at the first update, 0.9 after 80, 0.99 after 890, 0.999 "
        "after ~9,000 and 0.9999 after ~90,000. Without it a from-scratch EMA at 0.9999 keeps mostly the random "
        "init for tens of thousands of steps (0.9999^20000 = 0.14 of it is still there).")
    ema_start_step: int = _f(0, "Optimizer step at which EMA averaging starts (before it the EMA copies the weights).")

    def __post_init__(self) -> None:
        self.use_ema = self.use_ema or _env_flag("FLAG_USE_EMA")


@dataclass
class LoggingConfig:
    logging_steps: int = _f(10, "Log scalars every N optimizer steps (TensorBoard under output_dir/runs and the console).")
    image_logging_steps: int = _f(1000, "Log sample images every N steps (a multiple of --logging_steps); 0 = off.")
    num_inference_steps: int = _f(50, "DDIM steps for logged samples.")
    validation_prompts: list[str] = _f([], "Fixed prompts sampled at every image logging step.", nargs="*")
    disable_tqdm: bool = _f(False, "No progress bar (console lines every --logging_steps remain).")


@dataclass
class EvaluationConfig:
    """Quality figures during training: the validation loss on held-out shards, and FID / CLIP score of images
    generated for fixed prompts (the protocol of python -m sd_ds.evaluate)."""

    validation_shards: list[str] = _f(
        [], "Held-out shards for the validation loss (any shards --train_shards accepts; latent shards when training "
        "on latent shards). The diffusion loss of the first --validation_samples samples at 8 fixed, evenly spaced "
        "timesteps with fixed noise: it depends only on the weights, the same on any number of ranks. Logged as "
        "validation/loss (and validation/loss/tNNNN per timestep, validation/loss_ema with --use_ema).", nargs="+")
    validation_steps: int = _f(1000, "Validation loss every N optimizer steps (and at step 0 of a fresh run), with "
                               "--validation_shards.")
    validation_samples: int = _f(256, "Held-out samples in the validation loss (each at 8 timesteps).")
    validation_batch_size: int = _f(
        8, "Samples per UNet forward in the validation loss; batches are dealt to ranks round robin, so this (not "
        "the number of ranks) fixes what each forward sees.")
    validation_seed: int = _f(0, "Seed of the held-out sample order, their latent draws and their noise.")
    eval_steps: int = _f(
        0, "FID and CLIP score every N optimizer steps (0 = off): --eval_num_images images for --eval_prompts, "
        "generated and scored on all ranks as python -m sd_ds.evaluate does; logged as eval/fid, eval/clip_score. "
        "Needs the eval extra (requirements-eval.txt).")
    eval_prompts: Optional[str] = _f(None, "Prompt file (one per line) or shards whose captions are the prompts.")
    eval_num_images: int = _f(64, "Images per training-time evaluation (MLPerf scores 30,000 at the end; a few dozen "
                              "show the trend cheaply, with a biased, higher FID).")
    eval_reference: Optional[str] = _f(None, "FID reference: a pytorch-fid .npz, an image folder or image shards "
                                       "(statistics computed once at start-up). Without it, no FID.")
    eval_metrics: str = _f("fid,clip", "Comma-separated: fid, clip.")
    eval_guidance_scale: float = _f(8.0, "Classifier-free guidance of the evaluation images (MLPerf: 8.0).")
    eval_num_inference_steps: int = _f(50, "DDIM steps of the evaluation images (MLPerf: 50).")
    eval_batch_size: int = _f(8, "Images per generation batch; batches are dealt to ranks round robin.")
    fid_weights: Optional[str] = _f(None, "pytorch-fid Inception weights file (default: torch hub's cache).")
    clip_model: str = _f("ViT-H-14", "open_clip model for the CLIP score (or a model config .json).")
    clip_pretrained: str = _f("laion2b_s32b_b79k", "open_clip pretrained tag or weights file.")


@dataclass
class CheckpointConfig:
    save_steps: int = _f(10000, "Save a checkpoint every N optimizer steps (and at --max_steps).")
    save_total_limit: Optional[int] = _f(None, "Keep at most N checkpoints (the newest complete one is never deleted).")
    resume_from_checkpoint: str = _f(
        "latest", "latest (newest complete checkpoint in --output_dir, if any), none, or a checkpoint path.")
    only_save_updated_model: bool = _f(
        True, "Also write the trained models in diffusers format inside each checkpoint, as the seed does: "
        "checkpoint-N/unet/ (UNet2DConditionModel.from_pretrained loads it), unet_ema/ with --use_ema, and "
        "text_encoder/ with --train_text_encoder. Costs one fp32 UNet of disk per checkpoint (two with EMA); False keeps only "
        "the DeepSpeed state (python -m sd_ds.export makes a full pipeline from either).")


@dataclass
class TrainConfig:
    output_dir: str = _f("./sd_ds_output", "Where checkpoints, TensorBoard logs and samples go.")
    max_steps: int = _f(1000, "Optimizer steps to train (skipped overflow steps count, as in HF Trainer).")
    seed: int = _f(42, "Base seed; each rank derives its own (seed + rank) for noise and data.")
    do_train: bool = _f(True, "Accepted for the seed's command line; training is what this program does.")
    local_rank: int = _f(-1, "Set by the deepspeed launcher.")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        self._check_finite()
        o = self.optim
        if o.fp16 and o.bf16:
            raise ValueError("--fp16 and --bf16 are mutually exclusive")
        if o.fp16 and o.fp16_opt_level != "O2":
            raise ValueError(
                "--fp16_opt_level O1 (autocast over fp32 weights) is not supported by the DeepSpeed engine; "
                "use --fp16_opt_level O2 (DeepSpeed fp16: fp16 weights, fp32 master, dynamic loss scale) "
                "or, better on A100/H100, --bf16 True")
        if o.per_device_train_batch_size < 1 or o.gradient_accumulation_steps < 1:
            raise ValueError("--per_device_train_batch_size and --gradient_accumulation_steps must be >= 1")
        if self.max_steps < 1:
            raise ValueError("--max_steps must be >= 1")
        self._check_ranges()
        if self.data.aspect_ratio_buckets not in ("off", "auto"):
            from sd_ds.data.buckets import read_bucket_file

            read_bucket_file(self.data.aspect_ratio_buckets)  # its lines now; the model's divisor when it is loaded
        lg = self.logging
        if lg.logging_steps < 1:
            raise ValueError("--logging_steps must be >= 1")
        if lg.image_logging_steps and lg.image_logging_steps % lg.logging_steps:
            raise ValueError(
                f"--image_logging_steps ({lg.image_logging_steps}) must be a multiple of --logging_steps ({lg.logging_steps})")
        if self.checkpoint.save_total_limit is not None and self.checkpoint.save_total_limit < 1:
            raise ValueError("--save_total_limit must be >= 1")
        if not 0.0 <= self.data.caption_dropout_prob <= 1.0:
            raise ValueError("--caption_dropout_prob must be in [0, 1]")
        if self.data.file_list and self.data.train_shards:
            raise ValueError(
                "--file_list and --train_shards were both given: the trainer reads only --train_shards. --file_list "
                "(the seed's raw parts) is for the converter: tools/convert_laion_to_wds.py --file_list LIST "
                "--output_dir SHARDS, then --train_shards SHARDS alone")
        if self.model.enable_xformers_memory_efficient_attention and not xformers_installed():
            raise ValueError(
                "--enable_xformers_memory_efficient_attention (or FLAG_XFORMERS=1) needs xformers, which is not "
                "installed: `pip install xformers` (a build matching your torch and CUDA), or drop the flag and "
                "FLAG_XFORMERS to use PyTorch SDPA attention")

    def _check_finite(self) -> None:
        """One rule for every float flag, of every section: NaN and +-inf are refused (``float`` parses "inf", "nan"
        and "1e999"). No range rule below needs to think of them: an infinite --learning_rate, say, passes "> 0" and
        makes every weight NaN at the first update."""
        for section in (self, *(getattr(self, name) for name in _section_classes())):
            for f in dataclasses.fields(section):
                value = getattr(section, f.name)
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(f"--{f.name} must be a finite number (got {value})")

    def _check_ranges(self) -> None:
        """Reject values that would fail later (a ZeroDivisionError after the first step, a traceback deep in
        the data pipeline) or train something else than asked, with the rule; the parser exits 2."""
        d, o, e, lg, c = self.data, self.optim, self.ema, self.logging, self.checkpoint
        rules = [
            (c.save_steps >= 1, f"--save_steps must be >= 1 (got {c.save_steps})"),
            (d.resolution > 0 and d.resolution % 8 == 0,
             f"--resolution must be a positive multiple of 8, the VAE's downsampling factor (got {d.resolution})"),
            (d.min_size is None or d.min_size >= 1, f"--min_size must be >= 1 (got {d.min_size})"),
            (d.aspect_ratio_buckets in ("off", "auto") or os.path.isfile(d.aspect_ratio_buckets),
             f"--aspect_ratio_buckets must be auto, off or a file of WxH lines (no file {d.aspect_ratio_buckets!r})"),
            (d.aspect_ratio_buckets == "off" or not d.resample_shards,
             "--aspect_ratio_buckets does not support --resample_shards"),
            (d.dataloader_num_workers is None or d.dataloader_num_workers >= 0,
             f"--dataloader_num_workers must be >= 0 (got {d.dataloader_num_workers})"),
            (d.samples_per_epoch is None or d.samples_per_epoch >= 1,
             f"--samples_per_epoch must be >= 1 (got {d.samples_per_epoch})"),
            (0 <= d.storage_retry_timeout < float("inf"),
             f"--storage_retry_timeout must be a number of seconds >= 0 (got {d.storage_retry_timeout})"),
            (self.model.model_max_length >= 1, f"--model_max_length must be >= 1 (got {self.model.model_max_length})"),
            (lg.image_logging_steps >= 0, f"--image_logging_steps must be >= 0; 0 = off (got {lg.image_logging_steps})"),
            (self.evaluation.validation_steps >= 1,
             f"--validation_steps must be >= 1 (got {self.evaluation.validation_steps})"),
            (self.evaluation.validation_samples >= 1 and self.evaluation.validation_batch_size >= 1,
             "--validation_samples and --validation_batch_size must be >= 1"),
            (self.evaluation.eval_steps >= 0, f"--eval_steps must be >= 0; 0 = off (got {self.evaluation.eval_steps})"),
            (not self.evaluation.eval_steps or bool(self.evaluation.eval_prompts),
             "--eval_steps needs --eval_prompts (a prompt file, or shards with captions)"),
            (self.evaluation.eval_num_images >= 1 and self.evaluation.eval_batch_size >= 1,
             "--eval_num_images and --eval_batch_size must be >= 1"),
            (lg.num_inference_steps >= 1, f"--num_inference_steps must be >= 1 (got {lg.num_inference_steps})"),
            (o.learning_rate > 0, f"--learning_rate must be > 0 (got {o.learning_rate})"),
            (o.unet_learning_rate is None or o.unet_learning_rate > 0,
             f"--unet_learning_rate must be > 0 (got {o.unet_learning_rate})"),
            (o.text_encoder_learning_rate is None or o.text_encoder_learning_rate > 0,
             f"--text_encoder_learning_rate must be > 0 (got {o.text_encoder_learning_rate})"),
            (o.text_encoder_2_learning_rate is None or o.text_encoder_2_learning_rate > 0,
             f"--text_encoder_2_learning_rate must be > 0 (got {o.text_encoder_2_learning_rate})"),
            (o.warmup_steps >= 0, f"--warmup_steps must be >= 0 (got {o.warmup_steps})"),
            (o.weight_decay >= 0, f"--weight_decay must be >= 0 (got {o.weight_decay})"),
            (0 <= o.adam_beta1 < 1 and 0 <= o.adam_beta2 < 1,
             f"--adam_beta1 and --adam_beta2 must be in [0, 1) (got {o.adam_beta1}, {o.adam_beta2})"),
            (o.adam_epsilon > 0, f"--adam_epsilon must be > 0 (got {o.adam_epsilon})"),
            (o.max_consecutive_skipped_steps >= 0,
             f"--max_consecutive_skipped_steps must be >= 0; 0 = off (got {o.max_consecutive_skipped_steps})"),
            (0.0 <= e.ema_decay <= 1.0, f"--ema_decay must be in [0, 1] (got {e.ema_decay})"),
            (e.ema_start_step >= 0, f"--ema_start_step must be >= 0 (got {e.ema_start_step})"),
            (self.diffusion.noise_offset >= 0 and self.diffusion.input_perturbation >= 0,
             "--noise_offset and --input_perturbation must be >= 0"),
            (self.diffusion.snr_gamma is None or self.diffusion.snr_gamma > 0,
             f"--snr_gamma must be > 0 (got {self.diffusion.snr_gamma}); leave it unset to turn it off"),
        ]
        for ok, rule in rules:
            if not ok:
                raise ValueError(rule)

    # Derived quantities: stated once, computed here.
    @property
    def micro_batch_size(self) -> int:
        return self.optim.per_device_train_batch_size

    def global_batch_size(self, world_size: int) -> int:
        return self.micro_batch_size * self.optim.gradient_accumulation_steps * world_size

    @property
    def precision(self) -> str:
        # bf16 None (not given) is bf16 until sd_ds.precision.resolve_precision settles it for the run's device.
        return "fp16" if self.optim.fp16 else ("fp32" if self.optim.bf16 is False else "bf16")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in hints if dataclasses.is_dataclass(hints[name])}


def _add_field(group: argparse._ArgumentGroup, f: dataclasses.Field, hint: Any) -> None:
    meta = dict(f.metadata)
    help_text = meta.pop("help", "")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
    origin = typing.get_origin(hint)
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if origin is typing.Union and args else hint
    kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
    if base is bool:
        # `--flag`, `--flag True`, `--flag False` all work (HF TrainingArguments style).
        kw.update(type=str2bool, nargs="?", const=True, metavar="BOOL")
    elif typing.get_origin(base) is list:
        kw.update(type=typing.get_args(base)[0], nargs=meta.pop("nargs", "+"))
    else:
        kw.update(type=base)
    aliases = meta.pop("aliases", ())  # other spellings users type (the seed's), for the same field
    kw.update(meta)
    group.add_argument(f"--{f.name}", *aliases, help=f"{help_text} (default: {default})", **kw)


def _section_description(cls: type) -> Optional[str]:
    # A dataclass without a docstring gets its signature as __doc__: that is no description for --help.
    doc = (cls.__doc__ or "").strip()
    return None if not doc or doc.startswith(cls.__name__ + "(") else doc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sd_ds.train",
        description="Pretrain a Stable Diffusion UNet from scratch with DeepSpeed ZeRO-2. This process is one rank: "
        "alone (sd-ds train, python -m sd_ds.train) it trains on one GPU or on the CPU. Several GPUs or nodes: "
        "./run.sh [flags] in a checkout (ranks per node, hostfile, CPU threads per rank, SIGTERM -> checkpoint; "
        "README 'run.sh environment'), or with an installed package the deepspeed launcher itself: "
        "deepspeed [--num_gpus N | --hostfile FILE] --module sd_ds.train [flags]. Every flag below passes through "
        "either. @FILE reads flags from FILE, one per line (run.sh passes flags holding a credential that way, never "
        "on a command line).",
        allow_abbrev=False,
        fromfile_prefix_chars="@",
    )
    hints = typing.get_type_hints(TrainConfig)
    top = parser.add_argument_group("run")
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(hints[f.name]):
            continue
        _add_field(top, f, hints[f.name])
    for name, cls in _section_classes().items():
        group = parser.add_argument_group(name, _section_description(cls))
        sub_hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            _add_field(group, f, sub_hints[f.name])
    return parser


def parse_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """Parse the command line into a validated TrainConfig (unknown flags are errors)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    return config_from_dict(ns, parser=parser)


# Fields renamed since a config was saved (trainer_state.json holds the resolved config): old name -> new.
RENAMED_FIELDS = {"shuffle_buffer": "shuffle_block"}


def config_from_dict(values: dict[str, Any], parser: Optional[argparse.ArgumentParser] = None) -> TrainConfig:
    """Build a TrainConfig from flat {flag: value} (CLI) or nested {section: {...}} (a saved config)."""
    flat: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            flat.update(v)
        else:
            flat[k] = v
    flat = {RENAMED_FIELDS.get(k, k): v for k, v in flat.items()}
    sections = _section_classes()
    kwargs: dict[str, Any] = {}
    used: set[str] = set()
    for name, cls in sections.items():
        names = {f.name for f in dataclasses.fields(cls)}
        sub = {k: flat[k] for k in names if k in flat}
        used |= set(sub)
        kwargs[name] = cls(**sub)
    top = {f.name for f in dataclasses.fields(TrainConfig)} - set(sections)
    kwargs.update({k: flat[k] for k in top if k in flat})
    used |= top & set(flat)
    unknown = set(flat) - used
    if unknown:
        raise ValueError(f"unknown config keys: {sorted(unknown)}")
    try:
        return TrainConfig(**kwargs)
    except ValueError as e:
        if parser is not None:
            # A value the flags' syntax allowed but a rule refuses: the rule alone (exit 2), not the 60-line usage.
            parser.exit(2, f"{parser.prog}: error: {e}\n")
        raise
