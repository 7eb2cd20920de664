"""torch.compile for training (``--torch_compile``): which regions are compiled and why, the checks that prove them
(graph breaks, compile counts), and the compiled artifacts saved with the run so that a restart does not compile.

Regions. Each down, mid and up block of the UNet is one compiled region (``unet_regions``), compiled with
``fullgraph=True``: a graph break inside a region is an error, not a silent split. Inductor fuses what is
memory-bound inside a region (conv bias adds, GroupNorm, SiLU, residual adds, casts: ~165 ms of the H200's 252 ms
step, BENCHMARKS.md "GPU: SD v1 UNet throughput") and lays the convolutions out channels-last inside it.
Why per block and not the UNet whole: ZeRO-2 starts reducing a gradient bucket from a hook that fires when a
parameter's gradient is accumulated (``register_post_accumulate_grad_hook``). A compiled region's backward is one
autograd node, and its parameters' gradients are accumulated when that node ends; compiled whole, every gradient
of the UNet would arrive at the end of the backward and the reduce-scatter could overlap nothing. Per block, the
last blocks' buckets are reduced while the earlier blocks' backward runs. Finer regions (one per ResNet or
transformer) would not overlap more: ZeRO reduces whole buckets (2e8 elements, ``sd_ds.engine``), and a block holds
at most one or two buckets' worth of parameters (SD v1's largest block: 0.26 B; ``bench/bench_compile.py``), so the
regions already deliver gradients at the bucket's grain, while every extra boundary costs a fusion
(a residual add with the next GroupNorm) and a round of guards. What stays eager between the regions (the time
embedding, SDXL's added embedding of ``added_cond_kwargs``, conv_in, the final GroupNorm + SiLU + conv_out) is
under 1 % of the UNet's memory traffic.
The frozen VAE's encoder (image shards) is one region too: no gradients, so nothing to overlap, and at 85 ms of
the H200 step it has as much glue to fuse as the UNet.

Shapes. A run at one resolution compiles each region once (``dynamic=False``: static kernels, the fastest).
Aspect-ratio buckets would compile once per bucket (41 buckets for SDXL at 1024 px: 41 compiles per region), so
with buckets the activations' height and width are marked dynamic (``torch.compiler.config.dynamic_sources``) and
each region compiles once for all buckets: the bound is one compile per region, plus one for a region that meets a
bucket side of exactly one at its resolution (a bucket side equal to the model's divisor: dynamo specialises
sizes 0 and 1). Every other dimension stays static. A region that would compile more than
``recompile_limit`` times raises (``fail_on_recompile_limit_hit``) instead of falling back to eager in silence.
Periodic evaluation (image logging, validation loss, FID) runs the same modules eager (``eager_regions``): it runs
every few thousand steps with other batch shapes and no gradients, and compiling it would double the compile time
and the saved artifacts.

Restarts. ``CompileCache`` saves torch's compile cache artifacts (``torch.compiler.save_cache_artifacts``: the
AOTAutograd and inductor graph caches, with the GPU's Triton kernels in them) and the compiled C++ kernel
libraries the process loaded (CPU kernels; inductor builds one shared library per kernel with the host compiler,
~1 s each) into ``OUTPUT_DIR/compile_cache/local_rank_K.tar``, written atomically (a temporary name, then
``os.replace``) after the first step that compiled anything new. A restart loads it at launch, before the first
compile: with an empty inductor cache (fresh nodes) the regions are traced by dynamo again (seconds) but not
compiled. One file per local rank index, written by the first node's ranks: the cache keys include the device
index (cuda:K), identical on every node. Files from another torch are ignored (the keys include torch's version
anyway, so a stale file can only miss, never load a wrong kernel).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

    from sd_ds.config import TrainConfig
    from sd_ds.distributed import DistInfo
    from sd_ds.models import Components

logger = logging.getLogger("sd_ds.compile")

# The 4-D activations that enter a region (a block's hidden states and skip connections, a ResNet's input_tensor
# when a block is split, the VAE encoder's sample), dims 2 and 3 (height, width): dynamic with aspect-ratio buckets.
# Dynamo names a region's inputs L['<argument name>'] (L['res_hidden_states_tuple'][0] for the skips);
# encoder_hidden_states and temb are not matched.
SPATIAL_INPUTS = r"L\['(hidden_states|res_hidden_states_tuple|input_tensor|sample)'\]"
SPATIAL_SOURCES = ",".join(f"{SPATIAL_INPUTS}.*:{dim}" for dim in (2, 3))


# A block with more parameters than this is compiled per child (its ResNets, transformers, up/downsamplers): two of
# ZeRO-2's reduce buckets (sd_ds.engine.BUCKET_ELEMENTS = 2e8 elements). SD v1/v2's largest block holds 0.26 B;
# SDXL's up_blocks.0 holds 1.2 B (six buckets), down_blocks.2 0.76 B and its mid block 0.41 B.
MAX_REGION_PARAMETERS = 400_000_000


def unet_regions(unet: "UNet2DConditionModel", max_parameters: Optional[int] = MAX_REGION_PARAMETERS
                 ) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) of each compiled region of the UNet, in forward order: its down blocks, mid block and up
    blocks, each whole unless it holds more than ``max_parameters`` (then each of its children that has
    parameters: ResNets, transformers, up/downsamplers)."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    if unet.mid_block is not None:
        blocks.append(("mid_block", unet.mid_block))
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    regions = []
    for name, block in blocks:
        if max_parameters is None or sum(p.numel() for p in block.parameters()) <= max_parameters:
            regions.append((name, block))
            continue
        for child_name, child in _forward_order(block):
            regions.append((f"{name}.{child_name}", child))
    return regions


def _forward_order(block: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """A diffusers block's parametrised children in the order its forward runs them: ResNet i, then transformer i
    (mid blocks: ResNet 0 first), then the up/downsamplers."""
    resnets = list(getattr(block, "resnets", []))
    attentions = list(getattr(block, "attentions", []) or [])
    mid = len(resnets) == len(attentions) + 1  # UNetMidBlock2DCrossAttn: resnet, (attention, resnet) x n
    order = [("resnets.0", resnets[0])] if mid else []
    for i in range(len(attentions) if mid else len(resnets)):
        r = i + 1 if mid else i
        pair = ([(f"resnets.{r}", resnets[r])] if not mid else []) + (
            [(f"attentions.{i}", attentions[i])] if i < len(attentions) else []) + (
            [(f"resnets.{r}", resnets[r])] if mid else [])
        order += pair
    for kind in ("downsamplers", "upsamplers"):
        order += [(f"{kind}.{i}", m) for i, m in enumerate(getattr(block, kind, None) or [])]
    return [(n, m) for n, m in order if any(True for _ in m.parameters())]


def compile_regions(unet: "UNet2DConditionModel", vae_encoder: Optional[torch.nn.Module] = None, *,
                    dynamic_spatial: bool = False, max_region_parameters: Optional[int] = MAX_REGION_PARAMETERS,
                    **options: Any) -> list[str]:
    """Compile the UNet's regions (``unet_regions``) and the frozen VAE's encoder, if given, in place; returns the
    regions' names.

    ``nn.Module.compile`` compiles in place: unlike ``torch.compile(module)`` it adds no ``_orig_mod.`` to
    parameter names, so ZeRO's partitions, the EMA, checkpoints and export see the same module.
    ``dynamic_spatial``: one compile for every height and width (aspect-ratio buckets). ``options`` go to
    ``torch.compile`` (tests pass ``backend="aot_eager"``: the same graphs and autograd nodes, no code generation).
    """
    import torch._dynamo

    regions = unet_regions(unet, max_region_parameters)
    if vae_encoder is not None:
        regions.append(("vae.encoder", vae_encoder))
    # Entries of one class's forward are shared by its instances: at most one per instance (each its own channel
    # widths), twice that when a bucket side of one specialises. More would be a bug: raise, never run eager.
    limit = 2 * len(regions)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    # A process-wide setting (dynamo reads it when it traces): ours added with buckets, taken out without.
    sources = [s for s in torch.compiler.config.dynamic_sources.split(",") if s and s not in SPATIAL_SOURCES.split(",")]
    torch.compiler.config.dynamic_sources = ",".join(sources + (SPATIAL_SOURCES.split(",") if dynamic_spatial else []))
    for _, module in regions:
        module.compile(**{"dynamic": False, "fullgraph": True, **options})
    return [name for name, _ in regions]


def prepare_compile(cfg: "TrainConfig", components: "Components", dist_info: "DistInfo") -> Optional["CompileCache"]:
    """--torch_compile: the run's saved artifacts loaded (before anything compiles), then the UNet's blocks and the
    VAE's encoder (when images are encoded online) compiled in place; height and width dynamic with aspect-ratio
    buckets. None without --torch_compile. Call ``CompileCache.after_step`` after every optimizer step."""
    if not cfg.model.torch_compile:
        return None
    cache = CompileCache.for_run(cfg.output_dir, rank=dist_info.rank, local_rank=dist_info.local_rank)
    cache.load()
    names = compile_regions(components.unet, components.vae.encoder,
                            dynamic_spatial=cfg.data.aspect_ratio_buckets != "off")
    logger.info("torch.compile regions: %s (%s shapes)", ", ".join(names),
                "height and width dynamic" if cfg.data.aspect_ratio_buckets != "off" else "static")
    return cache


def eager_regions() -> contextlib.AbstractContextManager:
    """A block in which compiled regions run eager (no compile, no recompile): periodic evaluation."""
    return torch.compiler.set_stance("force_eager")


# --- checks ------------------------------------------------------------------------------------------------

def region_inputs(unet: torch.nn.Module, *args: Any, max_region_parameters: Optional[int] = MAX_REGION_PARAMETERS,
                  **kwargs: Any) -> dict[str, tuple[tuple, dict]]:
    """The (args, kwargs) each region of ``unet`` receives when ``unet(*args, **kwargs)`` runs (eager)."""
    captured: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, region in unet_regions(unet, max_region_parameters):
        def capture(module: torch.nn.Module, a: tuple, kw: dict, name: str = name) -> None:
            captured[name] = (a, dict(kw))
        handles.append(region.register_forward_pre_hook(capture, with_kwargs=True))
    try:
        with eager_regions(), torch.no_grad():
            unet(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def explain_regions(unet: torch.nn.Module, *args: Any, max_region_parameters: Optional[int] = MAX_REGION_PARAMETERS,
                    **kwargs: Any) -> dict[str, Any]:
    """``torch._dynamo.explain`` of every region's forward on the inputs it gets from ``unet(*args, **kwargs)``:
    {region name: ExplainOutput} (graph_count, graph_break_count, break_reasons). Resets dynamo's caches: a check
    for tests and benchmarks, not for a training process."""
    import torch._dynamo

    inputs = region_inputs(unet, *args, max_region_parameters=max_region_parameters, **kwargs)
    regions = dict(unet_regions(unet, max_region_parameters))
    return {name: torch._dynamo.explain(regions[name].forward)(*a, **kw) for name, (a, kw) in inputs.items()}


def compile_counters() -> dict[str, int]:
    """What torch.compile did in this process so far: graphs traced by dynamo, and the AOTAutograd / inductor
    cache hits and misses (a miss is a compile; a restart from saved artifacts has hits only)."""
    from torch._dynamo.utils import counters

    return {"graphs": counters["stats"]["unique_graphs"],
            "aot_autograd_hits": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_autograd_misses": counters["aot_autograd"]["autograd_cache_miss"],
            "inductor_hits": counters["inductor"]["fxgraph_cache_hit"],
            "inductor_misses": counters["inductor"]["fxgraph_cache_miss"]}


# --- artifacts saved with the run ----------------------------------------------------------------------------

ARTIFACTS_MEMBER = "torch_artifacts.bin"
MANIFEST_MEMBER = "manifest.json"
KERNELS_PREFIX = "kernels/"
# Inductor's compiled kernel libraries: <cache dir>/<2 characters>/<hash>[.<suffix>].so
KERNEL_PATH = re.compile(r"^[A-Za-z0-9_]{2}/[A-Za-z0-9_.]+\.so$")


def inductor_cache_dir() -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def loaded_kernel_libraries(cache_dir: Path) -> list[str]:
    """Paths (relative to inductor's cache dir) of the compiled kernel libraries this process has loaded: the
    shared objects under the cache dir that /proc/self/maps lists (Linux; elsewhere none, and a restart builds
    them again)."""
    root = str(cache_dir.resolve()) + os.sep
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split(None, 5)[5] for line in maps.splitlines() if len(line.split(None, 5)) == 6}
    relative = {os.path.relpath(p, root) for p in paths if p.startswith(root) and p.endswith(".so")}
    return sorted(r for r in relative if KERNEL_PATH.match(r))


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class CompileCache:
    """The run's compiled artifacts: loaded at launch (``load``), saved after a step that compiled (``save``).

    ``directory``: OUTPUT_DIR/compile_cache. ``local_rank``: which file this rank reads (its local rank index;
    the keys inside name cuda:K). ``writes``: the first node's ranks write (their files serve every node)."""

    def __init__(self, directory: Path, local_rank: int, *, writes: bool) -> None:
        self.path = Path(directory) / f"local_rank_{local_rank}.tar"
        self.writes = writes
        self.loaded: dict[str, int] = {}   # what load() put in place: artifacts by kind, kernel libraries
        self._restored_kernels: set[str] = set()
        self._saved_digest: Optional[str] = None
        self._graphs_at_save = 0

    @classmethod
    def for_run(cls, output_dir: str | Path, *, rank: int, local_rank: int) -> "CompileCache":
        return cls(Path(output_dir) / "compile_cache", local_rank, writes=rank == local_rank)

    def load(self) -> dict[str, int]:
        """Put a saved file's artifacts in place (torch's caches, the kernel libraries into inductor's cache dir);
        {} when there is none or it is from another torch. Call before the first compile."""
        if not self.path.is_file():
            return {}
        start = time.perf_counter()
        try:
            with tarfile.open(self.path) as archive:
                manifest = json.loads(archive.extractfile(MANIFEST_MEMBER).read())  # type: ignore[union-attr]
                if manifest.get("torch") != torch.__version__:
                    logger.info("compile cache %s: written by torch %s, this is %s: compiling anew", self.path,
                                manifest.get("torch"), torch.__version__)
                    return {}
                artifacts = archive.extractfile(ARTIFACTS_MEMBER).read()  # type: ignore[union-attr]
                kernels = self._restore_kernels(archive)
        except (OSError, tarfile.TarError, KeyError, ValueError, AttributeError) as e:
            logger.warning("compile cache %s unreadable (%s): compiling anew", self.path, e)
            return {}
        info = torch.compiler.load_cache_artifacts(artifacts)
        self.loaded = {kind: len(keys) for kind, keys in (info.artifacts.items() if info else ())}
        self.loaded["kernel_libraries"] = kernels
        self._saved_digest = manifest.get("digest")
        logger.info("compile cache: loaded %s from %s in %.1f s", self.loaded, self.path, time.perf_counter() - start)
        return self.loaded

    def _restore_kernels(self, archive: tarfile.TarFile) -> int:
        cache_dir = inductor_cache_dir()
        count = 0
        for member in archive.getmembers():
            relative = member.name[len(KERNELS_PREFIX):] if member.name.startswith(KERNELS_PREFIX) else None
            if relative is None or not member.isfile() or not KERNEL_PATH.match(relative):
                continue  # only plain files at inductor's own <2 chars>/<hash>.so paths: nothing else is written
            target = cache_dir / relative
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                # Ranks of a node share the cache dir: each writes a temporary name and renames it into place.
                _write_atomically(target, archive.extractfile(member).read())  # type: ignore[union-attr]
            self._restored_kernels.add(relative)
            count += 1
        return count

    def after_step(self) -> bool:
        """After an optimizer step: when anything was compiled (or traced) since the last call, log the summary
        line and save. One counter read when nothing was. True when the file was written."""
        graphs = compile_counters()["graphs"]
        if graphs == self._graphs_at_save:
            return False
        self._graphs_at_save = graphs
        logger.info("%s", self.summary())
        return self.save() if self.writes else False

    def save(self) -> bool:
        """Write the file (atomically) unless it already holds this process's artifacts. True when written."""
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return False
        artifacts, info = saved
        cache_dir = inductor_cache_dir()
        kernels = sorted(set(loaded_kernel_libraries(cache_dir)) | self._restored_kernels)
        keys = sorted(f"{kind}:{key}" for kind, ks in info.artifacts.items() for key in ks)
        digest = hashlib.sha256("\n".join(keys + kernels).encode()).hexdigest()
        if digest == self._saved_digest:
            return False  # a restart that compiled nothing new: the file already holds all of it
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as archive:
            manifest = {"torch": torch.__version__, "digest": digest, "artifacts": dict(
                (kind, len(ks)) for kind, ks in info.artifacts.items()), "kernel_libraries": len(kernels)}
            for name, data in [(MANIFEST_MEMBER, json.dumps(manifest).encode()), (ARTIFACTS_MEMBER, artifacts)] + [
                    (KERNELS_PREFIX + k, (cache_dir / k).read_bytes()) for k in kernels if (cache_dir / k).is_file()]:
                member = tarfile.TarInfo(name)
                member.size = len(data)
                archive.addfile(member, io.BytesIO(data))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(self.path, buffer.getvalue())
        self._saved_digest = digest
        logger.info("compile cache: saved %s (%.1f MB: %s, %d kernel libraries)", self.path,
                    len(buffer.getvalue()) / 1e6, manifest["artifacts"], len(kernels))
        return True

    def kernels_built(self) -> int:
        """Kernel libraries this process loaded that the cache did not restore: built here by the host compiler."""
        return len(set(loaded_kernel_libraries(inductor_cache_dir())) - self._restored_kernels)

    def summary(self) -> str:
        """One line for the log: what was loaded, and what compiled (misses, kernels built) or came from the cache
        (hits). A restart from the saved file has no misses and builds no kernel."""
        c = compile_counters()
        return (f"torch.compile: {c['graphs']} graphs traced; AOTAutograd cache {c['aot_autograd_hits']} hits, "
                f"{c['aot_autograd_misses']} misses; inductor cache {c['inductor_hits']} hits, "
                f"{c['inductor_misses']} misses; {self.kernels_built()} kernel libraries built; loaded from "
                f"{self.path.name}: {self.loaded or 'nothing'}")
