"""FID and CLIP score on the MLPerf Training Stable Diffusion protocol: the library under ``python -m
sd_ds.evaluate`` and the trainer's training-time evaluation.

FID from pytorch-fid's InceptionV3 (``pt_inception-2015-12-05``, 2048-d pool features; pytorch-fid's own code
computes the statistics and the distance), CLIP score = mean raw cosine similarity of image and caption embeddings
of an OpenCLIP model (open_clip's model and preprocessing; MLPerf: ViT-H-14 ``laion2b_s32b_b79k``). This module is
glue only.

Reproducible on any number of ranks: image i is drawn from seed ``seed + i``; the image list is cut into batches
before the batches are dealt to ranks round robin (``my_batches``), so each batch (and each image's features) is
the same whatever the number of ranks. Features and scores are gathered on rank 0 in image order (CPU objects on
the gloo control group).

Needs the ``eval`` extra (requirements-eval.txt: pytorch-fid, open-clip-torch and torchvision), imported when a
scorer is loaded: the trainer imports this module without it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from sd_ds.distributed import DistInfo
from sd_ds.image_modes import to_rgb
from sd_ds.pipeline import generate

logger = logging.getLogger("sd_ds.fid_clip")

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_DIMS = 2048
CLIP_MODEL = "ViT-H-14"
CLIP_PRETRAINED = "laion2b_s32b_b79k"
METRICS = ("fid", "clip")
IMAGE_EXTENSIONS = ("bmp", "jpg", "jpeg", "pgm", "png", "ppm", "tif", "tiff", "webp")  # pytorch-fid's


class MissingWeightsError(RuntimeError):
    """Weights that are neither on disk nor downloadable: the message says which file to fetch and where."""


def _need_eval_extra(err: ImportError) -> SystemExit:
    return SystemExit(f"FID / CLIP scoring needs the eval extra ({err.name} is missing): "
                      f"pip install -r requirements-eval.txt (pytorch-fid, open-clip-torch, torchvision)")


# --- FID: pytorch-fid's InceptionV3 and statistics ----------------------------------------------------

def fid_weights_path() -> Path:
    """Where pytorch-fid (torch.hub) looks for the Inception weights before downloading them."""
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def load_fid_inception(weights: Optional[str | Path], device: torch.device) -> torch.nn.Module:
    """pytorch-fid's InceptionV3 (FID variant, pool3 block) with ``weights`` (a .pth file), else with its default
    weights from the torch hub cache (downloaded there when the network allows)."""
    try:
        from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
    except ImportError as e:
        raise _need_eval_extra(e) from None

    block = [InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIMS]]
    if weights is None:
        offline = any(os.environ.get(v, "0") not in ("", "0") for v in ("HF_HUB_OFFLINE", "SD_DS_OFFLINE"))
        if offline and not fid_weights_path().is_file():
            raise MissingWeightsError(f"FID Inception weights not found at {fid_weights_path()} (offline): fetch "
                                      f"{FID_WEIGHTS_URL} to {fid_weights_path()}, or pass --fid_weights PATH")
        try:
            return InceptionV3(block).to(device).eval()
        except Exception as e:  # noqa: BLE001 - URLError, HTTPError, socket errors: all mean "not here"
            raise MissingWeightsError(
                f"FID Inception weights not found at {fid_weights_path()} and not downloadable "
                f"({type(e).__name__}): fetch {FID_WEIGHTS_URL} to {fid_weights_path()}, or pass --fid_weights PATH"
            ) from None
    weights = Path(weights)
    if not weights.is_file():
        raise MissingWeightsError(f"--fid_weights {weights}: no such file (fetch {FID_WEIGHTS_URL} to it)")
    # pytorch-fid loads its weights through torch.hub's cache only; a hub dir holding just this file (a link)
    # makes it read ours, through its own loading code.
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as hub:
        (Path(hub) / "checkpoints").mkdir()
        (Path(hub) / "checkpoints" / FID_WEIGHTS_FILE).symlink_to(weights.resolve())
        torch.hub.set_dir(hub)
        try:
            return InceptionV3(block).to(device).eval()
        finally:
            torch.hub.set_dir(previous)


def pil_to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """[B,3,H,W] float in [0,1], as torchvision's ToTensor makes each (pytorch-fid's transform)."""
    arrays = [np.asarray(img.convert("RGB"), dtype=np.uint8) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div(255)


@torch.no_grad()
def inception_features(model: torch.nn.Module, images: Sequence[Image.Image], device: torch.device) -> np.ndarray:
    """[B, 2048] float64 pool3 features of one batch (pytorch-fid's get_activations on the same batch)."""
    if not images:
        return np.empty((0, FID_DIMS))
    pred = model(pil_to_tensor(images).to(device))[0]
    return pred.squeeze(3).squeeze(2).cpu().numpy().astype(np.float64)


def fid_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) exactly as pytorch-fid's calculate_activation_statistics."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    from pytorch_fid.fid_score import calculate_frechet_distance

    return float(calculate_frechet_distance(a[0], a[1], b[0], b[1]))


def read_statistics(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a pytorch-fid .npz, checked: ``mu`` [2048] and ``sigma`` [2048, 2048], finite numbers. Anything
    else (another file, other keys or shapes, a pickle) is a ValueError of one line naming the file, what it holds
    and what is expected; arrays are read without unpickling."""
    import zipfile

    expected = (f"expected mu [{FID_DIMS}] and sigma [{FID_DIMS}, {FID_DIMS}] (pytorch-fid's statistics, as "
                "--save_reference_stats writes them)")
    if not Path(path).is_file():
        raise ValueError(f"--reference {path}: no such file")
    if not zipfile.is_zipfile(path):  # an .npz is a zip archive of .npy arrays
        raise ValueError(f"--reference {path}: not an .npz archive; {expected}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"--reference {path}: cannot read it ({e}); {expected}") from None
    found = ", ".join(f"{key} {list(a.shape)} {a.dtype}" for key, a in arrays.items()) or "no arrays"
    mu, sigma = arrays.get("mu"), arrays.get("sigma")
    if (mu is None or sigma is None or mu.shape != (FID_DIMS,) or sigma.shape != (FID_DIMS, FID_DIMS)
            or not np.issubdtype(mu.dtype, np.number) or not np.issubdtype(sigma.dtype, np.number)):
        raise ValueError(f"--reference {path}: holds {found}; {expected}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"--reference {path}: mu or sigma holds NaN/inf; {expected}, finite")
    return mu, sigma


def save_statistics(path: str | Path, stats: tuple[np.ndarray, np.ndarray]) -> Path:
    """The .npz pytorch-fid reads (keys mu, sigma), as its --save-stats writes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, mu=stats[0], sigma=stats[1])
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


# --- CLIP score: open_clip -------------------------------------------------------------------------

@dataclass
class ClipModel:
    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    device: torch.device


def load_clip(name: str, pretrained: Optional[str], device: torch.device) -> ClipModel:
    """An open_clip model by name (a config JSON file registers its own name, its file stem), ``pretrained`` a
    tag of open_clip's table or a checkpoint file. open_clip's validation preprocessing and tokenizer."""
    try:
        import open_clip
    except ImportError as e:
        raise _need_eval_extra(e) from None

    if name.endswith(".json") and Path(name).is_file():
        open_clip.add_model_config(name)
        name = Path(name).stem
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
    except Exception as e:  # noqa: BLE001 - offline hub errors come in several types
        if pretrained and not Path(pretrained).is_file():
            cfg = open_clip.get_pretrained_cfg(name, pretrained) or {}
            hub = (cfg.get("hf_hub") or "").rstrip("/")
            source = (f"https://huggingface.co/{hub}/resolve/main/open_clip_pytorch_model.bin" if hub
                      else cfg.get("url") or f"open_clip's {name} {pretrained}")
            raise MissingWeightsError(
                f"CLIP weights {name} {pretrained} not available offline ({type(e).__name__}): fetch {source} and "
                f"pass --clip_pretrained /path/to/{source.rsplit('/', 1)[-1]} (or into the Hugging Face cache "
                f"{os.environ.get('HF_HOME', '~/.cache/huggingface')})") from None
        raise
    model.eval()
    return ClipModel(model, preprocess, open_clip.get_tokenizer(name), device)


@torch.no_grad()
def clip_scores(clip: ClipModel, images: Sequence[Image.Image], captions: Sequence[str]) -> np.ndarray:
    """[B] float64: cosine similarity of each image's and its caption's embeddings (raw, not x100, not clipped)."""
    if not images:
        return np.empty((0,))
    pixels = torch.stack([clip.preprocess(img.convert("RGB")) for img in images]).to(clip.device)
    image = clip.model.encode_image(pixels).float()
    text = clip.model.encode_text(clip.tokenizer(list(captions)).to(clip.device)).float()
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    return (image * text).sum(dim=-1).cpu().numpy().astype(np.float64)


# --- images and prompts ------------------------------------------------------------------------------

def read_prompts(source: str, limit: Optional[int] = None) -> list[str]:
    """One prompt per line of a text file (empty lines dropped), or the captions (.txt members) of webdataset
    shards (a directory of .tar files, a .tar, or a brace pattern), in shard order."""
    path = Path(source)
    if path.is_file() and not source.endswith(".tar"):
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        prompts = [caption for _, _, caption in _shard_samples(source, want_image=False, limit=limit)]
    if not prompts:
        raise ValueError(f"no prompts in {source}")
    return prompts[:limit] if limit else prompts


def _shard_urls(source: str) -> list[str]:
    import braceexpand

    path = Path(source)
    if path.is_dir():
        return [str(p) for p in sorted(path.glob("*.tar"))]
    return list(braceexpand.braceexpand(source))


def _shard_samples(source: str, *, want_image: bool, limit: Optional[int] = None,
                   keep: Callable[[int], bool] = lambda i: True) -> Iterator[tuple[int, Optional[Image.Image], str]]:
    """(index, image or None, caption) of the samples of shards, in shard order; only samples ``keep(index)``
    accepts are decoded (a rank decodes its own share)."""
    import io

    import webdataset as wds

    index = 0
    for sample in wds.tarfile_samples([{"url": u} for u in _shard_urls(source)]):
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
        if want_image and ext is None:
            continue
        if keep(index):
            caption = sample.get("txt", b"")
            caption = caption.decode("utf-8", "replace") if isinstance(caption, bytes) else str(caption)
            image = to_rgb(Image.open(io.BytesIO(sample[ext]))) if want_image else None  # as the trainer sees it
            yield index, image, caption
        index += 1
        if limit and index >= limit:
            return


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), centre crop: how reference photos of any shape become size x size."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    left, top = (img.width - size) // 2, (img.height - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_files(folder: str | Path) -> list[Path]:
    """pytorch-fid's listing of an image folder: its extensions, sorted."""
    folder = Path(folder)
    return sorted(f for ext in IMAGE_EXTENSIONS for f in folder.glob(f"*.{ext}"))


# --- distribution ----------------------------------------------------------------------------------

def my_batches(count: int, batch_size: int, rank: int, world_size: int) -> list[range]:
    """This rank's batches of image indices: batch b (indices b*batch_size ...) runs on rank b % world_size."""
    starts = range(rank * batch_size, count, world_size * batch_size)
    return [range(s, min(s + batch_size, count)) for s in starts]


def gather_on_rank0(dist_info: Optional["DistInfo"], part: dict[int, Any]) -> Optional[dict[int, Any]]:
    """{index: value} from every rank merged on rank 0 (None elsewhere): CPU objects on the gloo control group,
    every rank taking part even with nothing to send, so that none waits for another."""
    if dist_info is None or dist_info.world_size == 1 or dist_info.control_group is None:
        return part
    import torch.distributed as dist

    parts: Optional[list] = [None] * dist_info.world_size if dist_info.is_main_process else None
    dist.gather_object(part, parts, dst=0, group=dist_info.control_group)
    if not dist_info.is_main_process:
        return None
    merged: dict[int, Any] = {}
    for p in parts or []:
        merged.update(p)
    return merged


@dataclass
class Scorers:
    """What scores images: the FID Inception and reference statistics, the CLIP model; None = metric off."""

    inception: Optional[torch.nn.Module]
    reference: Optional[tuple[np.ndarray, np.ndarray]]
    clip: Optional[ClipModel]
    device: torch.device


def score_batches(scorers: Scorers, batches: Iterator[tuple[range, list[Image.Image], list[str]]]
                  ) -> dict[int, tuple[Optional[np.ndarray], Optional[float]]]:
    """{image index: (Inception features or None, CLIP score or None)} for this rank's batches."""
    out: dict[int, tuple[Optional[np.ndarray], Optional[float]]] = {}
    for indices, images, captions in batches:
        feats = (inception_features(scorers.inception, images, scorers.device) if scorers.inception is not None
                 else [None] * len(images))
        clips = clip_scores(scorers.clip, images, captions) if scorers.clip is not None else [None] * len(images)
        for i, f, c in zip(indices, feats, clips):
            out[i] = (f, None if c is None else float(c))
    return out


def metrics_from(merged: dict[int, tuple[Optional[np.ndarray], Optional[float]]], scorers: Scorers, *,
                 strict: bool = True) -> dict[str, Any]:
    """FID and CLIP score of all images (rank 0's merged results, in image order). ``strict=False`` (training):
    a FID pytorch-fid refuses (a covariance too singular for its square root: few images) is NaN and a
    warning instead of an error, since rank 0 alone computes it and the run must go on."""
    order = sorted(merged)
    result: dict[str, Any] = {"num_images": len(order)}
    if scorers.inception is not None and scorers.reference is not None:
        features = np.stack([merged[i][0] for i in order])
        try:
            result["fid"] = frechet_distance(fid_statistics(features), scorers.reference)
        except ValueError as e:
            if strict:
                raise
            logger.warning("FID of %d images not computed: %s", len(order), e)
            result["fid"] = float("nan")
    if scorers.clip is not None:
        result["clip_score"] = float(np.mean([merged[i][1] for i in order]))
    return result


def evaluate_generated(pipe: Any, prompts: Sequence[str], scorers: Scorers, dist_info: Optional["DistInfo"], *,
                       seed: int, steps: int, guidance_scale: float, batch_size: int, resolution: Optional[int],
                       save_dir: Optional[Path] = None, strict: bool = True, width: Optional[int] = None,
                       height: Optional[int] = None) -> Optional[dict[str, Any]]:
    """Collective. Generate image i for prompts[i] from seed + i on the rank that owns its batch, score it there,
    gather on rank 0: the metrics on rank 0, None elsewhere. Used by the CLI and by training-time evaluation.
    Images are ``width`` x ``height`` (each default: ``resolution``)."""
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)

    def batches() -> Iterator[tuple[range, list[Image.Image], list[str]]]:
        for indices in my_batches(len(prompts), batch_size, rank, world):
            captions = [prompts[i] for i in indices]
            images = generate(pipe, captions, seeds=[seed + i for i in indices], steps=steps,
                              guidance_scale=guidance_scale, batch_size=len(captions), width=width or resolution,
                              height=height or resolution)
            if save_dir is not None:
                save_dir.mkdir(parents=True, exist_ok=True)
                for i, img in zip(indices, images):
                    img.save(save_dir / f"{i:06d}.png")
            yield indices, images, captions

    merged = gather_on_rank0(dist_info, score_batches(scorers, batches()))
    return None if merged is None else metrics_from(merged, scorers, strict=strict)


def _load_images(paths: Sequence[Path], size: Optional[int] = None) -> list[Image.Image]:
    images = [to_rgb(Image.open(p)) for p in paths]  # 16-bit, transparency: as the trainer decodes shards
    return [center_crop_resize(im, size) for im in images] if size else images


def evaluate_folder(folder: str | Path, prompts: Optional[Sequence[str]], scorers: Scorers,
                    dist_info: Optional["DistInfo"], *, batch_size: int) -> Optional[dict[str, Any]]:
    """Collective: FID / CLIP score of existing images (pytorch-fid's sorted listing; prompts[i] for file i)."""
    files = image_files(folder)
    if not files:
        raise ValueError(f"--images {folder}: no image files")
    if scorers.clip is not None and (prompts is None or len(prompts) < len(files)):
        raise ValueError(f"CLIP score of --images needs --prompts with a caption per image ({len(files)} images)")
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    work = ((idx, _load_images([files[i] for i in idx]), [prompts[i] if prompts else "" for i in idx])
            for idx in my_batches(len(files), batch_size, rank, world))
    merged = gather_on_rank0(dist_info, score_batches(scorers, work))
    return None if merged is None else metrics_from(merged, scorers)


def _shard_batches(source: str, resolution: int, batch_size: int, rank: int, world: int, limit: Optional[int]
                   ) -> Iterator[tuple[range, list[Image.Image], list[str]]]:
    """This rank's batches (as my_batches deals them) of shard images centre-cropped to ``resolution``; every
    rank reads the tar stream, each decodes only its own images."""
    mine = lambda i: (i // batch_size) % world == rank  # noqa: E731
    indices: list[int] = []
    images: list[Image.Image] = []
    for i, img, _ in _shard_samples(source, want_image=True, limit=limit, keep=mine):
        if indices and i // batch_size != indices[0] // batch_size:
            yield range(indices[0], indices[-1] + 1), images, [""] * len(images)
            indices, images = [], []
        indices.append(i)
        images.append(center_crop_resize(img, resolution))
    if indices:
        yield range(indices[0], indices[-1] + 1), images, [""] * len(images)


def reference_statistics(reference: str, inception: torch.nn.Module, dist_info: Optional["DistInfo"], *,
                         batch_size: int, resolution: Optional[int], device: torch.device,
                         limit: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the reference, on every rank: a pytorch-fid .npz as it is; an image folder as pytorch-fid
    reads it (files as they are, sorted); image shards with each image centre-cropped to ``resolution``."""
    if reference.endswith(".npz"):
        return read_statistics(reference)
    rank, world = (dist_info.rank, dist_info.world_size) if dist_info is not None else (0, 1)
    scorers = Scorers(inception, None, None, device)
    path = Path(reference)
    if path.is_dir() and image_files(path):
        files = image_files(path)[:limit] if limit else image_files(path)
        work: Iterator = ((idx, _load_images([files[i] for i in idx]), [""] * len(idx))
                          for idx in my_batches(len(files), batch_size, rank, world))
    else:
        if not resolution:
            raise ValueError("a shard reference needs --resolution (the size its images are cropped to)")
        work = _shard_batches(reference, resolution, batch_size, rank, world, limit)
    merged = gather_on_rank0(dist_info, score_batches(scorers, work))
    if merged is not None and not merged:
        raise ValueError(f"--reference {reference}: no images (an .npz, an image folder, or image shards)")
    stats = None if merged is None else fid_statistics(np.stack([merged[i][0] for i in sorted(merged)]))
    return dist_info.broadcast_object(stats) if dist_info is not None else stats


def parse_metrics(text: str) -> set[str]:
    """The metrics named in a comma-separated list (``--metrics``, ``--eval_metrics``); ValueError for others."""
    chosen = {m.strip() for m in text.split(",") if m.strip()}
    unknown = chosen - set(METRICS)
    if unknown or not chosen:
        raise ValueError(f"--metrics {text!r}: choose from {', '.join(METRICS)}")
    return chosen
