"""sd-ds: pretrain Stable Diffusion from scratch with DeepSpeed ZeRO-2."""

__version__ = "0.1.0"
