"""--torch_compile (sd_ds.compile): regions without graph breaks, no recompile after the first step at a fixed shape,
one compile per region for every aspect-ratio bucket, a recompile limit that raises instead of running eager, and
periodic evaluation that compiles nothing.

These run in process with ``backend="aot_eager"``: dynamo's graphs and AOTAutograd's autograd nodes exactly as
inductor gets them, without its code generation (minutes on a CPU). Inductor itself, the saved kernels and the
losses on 2 ranks are the end-to-end tests in tests/test_compile_training.py."""

from __future__ import annotations

import pytest
import torch

from sd_ds.compile import compile_counters, compile_regions, eager_regions, explain_regions, unet_regions
from sd_ds.presets import TINY_SD2_UNET, TINY_SDXL_UNET, TINY_UNET

PRESETS = {"tiny": TINY_UNET, "tiny-sd2": TINY_SD2_UNET, "tiny-sdxl": TINY_SDXL_UNET}


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test starts from empty dynamo caches and gets the global compile settings back as they were."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    counters.clear()
    saved = (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit,
             torch.compiler.config.dynamic_sources)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    (torch._dynamo.config.recompile_limit, torch._dynamo.config.fail_on_recompile_limit_hit,
     torch.compiler.config.dynamic_sources) = saved


def make_unet(preset: str, recompute: bool = False):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**PRESETS[preset]).train()
    if recompute:
        unet.enable_gradient_checkpointing()
    return unet


def unet_inputs(unet, batch: int = 2, height: int = 8, width: int = 8) -> tuple[tuple, dict]:
    """(args, kwargs) of one training forward: noisy latents, timesteps, text context; SDXL's added_cond_kwargs
    (pooled text embeds and the six micro-conditioning numbers) too."""
    config = unet.config
    g = torch.Generator().manual_seed(height * 100 + width)
    args = (torch.randn(batch, 4, height, width, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, 16, config.cross_attention_dim, generator=g))
    kwargs = {}
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, generator=g),
                                       "time_ids": torch.tensor([[height * 4.0, width * 4.0, 0, 0, height * 4.0,
                                                                  width * 4.0]] * batch)}
    return args, kwargs


def train_step(unet, height: int = 8, width: int = 8) -> None:
    args, kwargs = unet_inputs(unet, height=height, width=width)
    unet(*args, **kwargs).sample.square().mean().backward()


@pytest.mark.parametrize("preset,recompute,split", [("tiny", False, False), ("tiny-sd2", False, False),
                                                    ("tiny-sdxl", False, False), ("tiny", True, False),
                                                    ("tiny-sdxl", False, True)])
def test_every_region_is_one_graph(preset, recompute, split):
    """torch._dynamo.explain on each region with the inputs it really gets (SDXL: its added embedding conditions
    the blocks through temb): one graph, no break. The regions compile with fullgraph=True as well, so a break
    introduced later (a diffusers upgrade) fails the compile instead of splitting a region. ``split``: blocks over
    the size limit compiled per child (SDXL's largest blocks at full size), here every block with a transformer."""
    unet = make_unet(preset, recompute)
    args, kwargs = unet_inputs(unet)
    limit = 100_000 if split else None
    explained = explain_regions(unet, *args, max_region_parameters=limit, **kwargs)
    assert list(explained) == [name for name, _ in unet_regions(unet, limit)]
    assert len(explained) == (20 if split else 7)
    for name, out in explained.items():
        assert (out.graph_count, out.graph_break_count) == (1, 0), (name, out.break_reasons)


@pytest.mark.parametrize("preset", ["tiny", "tiny-sdxl"])
def test_no_recompile_after_the_first_step_at_a_fixed_shape(preset):
    unet = make_unet(preset)
    compile_regions(unet, backend="aot_eager")
    train_step(unet)
    first = compile_counters()["graphs"]
    # One graph per region at most (blocks of one class with the same shapes share theirs).
    assert 0 < first <= len(unet_regions(unet))
    for _ in range(3):
        train_step(unet)
    assert compile_counters()["graphs"] == first


@pytest.mark.slow  # inductor compiles every region with dynamic sizes: ~25-50 s each
@pytest.mark.parametrize("split", [False, True])
def test_buckets_compile_each_region_once(split):
    """With aspect-ratio buckets the regions' height and width are dynamic: the first bucket compiles every
    region, the next buckets compile nothing. Static regions compile once per bucket (the contrast). ``split``:
    blocks compiled per child (a ResNet's input is its input_tensor)."""
    shapes = [(8, 8), (8, 16), (16, 8), (8, 24), (16, 16)]  # latent sides; the deepest level keeps a side >= 2
    unet = make_unet("tiny-sdxl")
    compile_regions(unet, backend="aot_eager", dynamic_spatial=True, max_region_parameters=100_000 if split else None)
    train_step(unet, *shapes[0])
    first = compile_counters()["graphs"]
    for shape in shapes[1:] + shapes[:2]:
        train_step(unet, *shape)
    assert compile_counters()["graphs"] == first
    # A bucket whose deepest level is one wide (a side equal to the model's divisor): dynamo specialises size 1,
    # one more compile for the regions that see it, as compile_regions' bound says; then none again.
    train_step(unet, 4, 16)
    once_more = compile_counters()["graphs"]
    assert first < once_more <= 2 * first
    train_step(unet, 4, 24)
    assert compile_counters()["graphs"] == once_more

    torch._dynamo.reset()
    before = compile_counters()["graphs"]
    static = make_unet("tiny-sdxl")
    compile_regions(static, backend="aot_eager", max_region_parameters=100_000 if split else None)
    for shape in shapes[:3]:
        train_step(static, *shape)
    assert compile_counters()["graphs"] - before == 3 * first  # a compile per region and bucket


def test_a_region_past_its_recompile_limit_raises_instead_of_running_eager():
    from torch._dynamo.exc import FailOnRecompileLimitHit, Unsupported

    unet = make_unet("tiny")
    compile_regions(unet, backend="aot_eager")
    # The tiny UNet has two blocks of one class (different widths): two entries of that class's forward. A limit
    # of two lets the first shape compile; what a bug re-specialising every step would run into comes next.
    torch._dynamo.config.recompile_limit = 2
    train_step(unet, 8, 8)
    with pytest.raises((FailOnRecompileLimitHit, Unsupported), match="recompile_limit|[Rr]ecompile limit"):
        train_step(unet, 16, 16)


def test_periodic_evaluation_compiles_nothing():
    """Image logging, validation and FID run under eager_regions (sd_ds.periodic): no grad, eval mode and other
    shapes would each be a new compile otherwise."""
    unet = make_unet("tiny")
    compile_regions(unet, backend="aot_eager")
    train_step(unet)
    graphs = compile_counters()["graphs"]
    with eager_regions(), torch.no_grad():
        unet.eval()
        args, kwargs = unet_inputs(unet, batch=6, height=16, width=16)
        unet(*args, **kwargs)
        unet.train()
    assert compile_counters()["graphs"] == graphs
    train_step(unet)  # and training goes on with the regions it compiled
    assert compile_counters()["graphs"] == graphs
