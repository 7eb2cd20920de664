"""sd-ds's ZeRO-1/2 optimizer step: six methods of DeepSpeed 0.19.8's ``DeepSpeedZeroOptimizer`` replaced on the
instance, one named function here per replaced method (``streamline_zero_optimizer`` installs them).

- ``has_overflow_partitioned_grads_serial``, ``get_grad_norm_direct``, ``unscale_and_clip_grads``: DeepSpeed checks
  each gradient tensor for inf/nan (6 ops each), takes each one's norm (7 ops each) and then tests the clip norm's
  validity with a host read: ~15,000 kernel launches per step for the SD v1 UNet's 686 tensors, 50-100 ms of
  launch overhead on a GPU (measured by bench/bench_step_ops.py, in BENCHMARKS.md). Here each becomes one
  ``torch._foreach_norm`` over the partition's gradients: a tensor's norm is non-finite exactly when it holds an
  inf or nan, so the same norms answer both questions.
- ``_update_model_bit16_weights`` (``update_model_bit16_weights``) and ``step``: step() ends by re-pointing every
  parameter at its view of the flat bf16 buffer, 3 ops a tensor, which inside step() is skipped.
- ``allreduce_and_copy_with_multiple_ranks`` (``reduce_to_owners``): each gradient bucket's slices reduced to the
  rank that owns them instead of all-reduced to every rank.

Behaviour is unchanged: a step with non-finite gradients is still detected, skipped and counted, clipping uses the
same global L2 norm (per-tensor norms in fp32 instead of fp64, summed in fp64), the clip factor is computed on the
device without a host read, and every rank ends with the same weights (tests/test_engine.py).
"""

from __future__ import annotations

import types
from typing import Any, Optional

import torch

# What streamline_zero_optimizer replaces or reads on DeepSpeed's ZeRO-1/2 optimizer (requirements.txt pins it).
TESTED_DEEPSPEED = "0.19.8"
STREAMLINED_METHODS = ("has_overflow_partitioned_grads_serial", "get_grad_norm_direct", "unscale_and_clip_grads",
                       "_update_model_bit16_weights", "step", "allreduce_and_copy_with_multiple_ranks",
                       "allreduce_bucket", "_add_to_grad_partition_buffer")
STREAMLINED_ATTRIBUTES = ("averaged_gradients", "dp_process_group", "clip_grad", "loss_scale", "device",
                          "overlap_comm", "unflatten")
IN_STEP = "_sd_ds_in_step"  # set on the optimizer while its step() runs


def _grad_norms(gradients: list[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """[n] fp32 L2 norms of the present gradients, in one multi-tensor kernel; None when there are none."""
    present = [g for g in gradients if g is not None]
    if not present:
        return None
    return torch.stack(torch._foreach_norm(present, 2, dtype=torch.float32))


def has_overflow_partitioned_grads_serial(optimizer: Any) -> torch.Tensor:
    """[1] bool on the device: does any of this rank's partition gradients hold an inf or nan."""
    flags = [torch.zeros(1, dtype=torch.bool, device=optimizer.device)]
    for gradients in optimizer.averaged_gradients.values():
        norms = _grad_norms(gradients)
        if norms is not None:
            flags.append(~torch.isfinite(norms).all().reshape(1))
    return torch.stack(flags).any().reshape(1)


def get_grad_norm_direct(optimizer: Any, gradients: list[torch.Tensor], params: list[torch.Tensor],
                         norm_type: float = 2) -> torch.Tensor:
    """The global L2 norm of the gradients over the data-parallel group, -1 when it is not finite."""
    # Lazy, as every DeepSpeed import here: importing deepspeed costs seconds that `--help` does not need.
    from deepspeed import comm as ds_dist

    assert float(norm_type) == 2.0, "sd-ds clips by the global L2 norm"
    norms = _grad_norms(gradients)  # zero paddings add nothing to an L2 norm
    total = (norms.double().pow(2).sum().float() if norms is not None
             else torch.zeros((), dtype=torch.float32, device=optimizer.device))
    ds_dist.all_reduce(total, op=ds_dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    total = total.sqrt()
    # DeepSpeed's -1 sentinel for an invalid norm, with a Python scalar: its mask_nan_or_inf_with_val_inplace fills
    # from a device tensor, which on CUDA is a host-to-device copy plus a read back (2 syncs a step, seen in the
    # H200 trace of bench/bench_gpu_throughput.py --trace_dir).
    return total.masked_fill_(~torch.isfinite(total), -1.0)


def unscale_and_clip_grads(optimizer: Any, grad_groups_flat: list[Any], total_norm: torch.Tensor) -> None:
    """Divide the gradients by the loss scale and the clip factor, computed on the device."""
    if optimizer.clip_grad == 0.0 and optimizer.loss_scale == 1.0:
        return
    combined_scale: Any = optimizer.loss_scale
    if optimizer.clip_grad > 0.0:
        # DeepSpeed's rule (an invalid norm clips nothing), as a device-side select instead of a host read.
        valid = torch.isfinite(total_norm) & (total_norm >= 0)
        clip_norm = torch.where(valid, total_norm, torch.full_like(total_norm, float("inf")))
        clip = torch.clamp(((clip_norm / optimizer.loss_scale) + 1e-6) / optimizer.clip_grad, min=1.0)
        combined_scale = clip * optimizer.loss_scale
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / combined_scale)


def update_model_bit16_weights(optimizer: Any, group_index: int) -> None:
    """DeepSpeed's ``_update_model_bit16_weights`` (re-point each parameter at its view of the flat buffer), except
    inside step(): there the parameters are those views since init and the all-gather writes into the buffer in
    place ("TODO: we probably don't need this? just to be safe" in DeepSpeed). The checkpoint-load paths, which do
    need it, still run it."""
    if not getattr(optimizer, IN_STEP, False):
        type(optimizer)._update_model_bit16_weights(optimizer, group_index)


def step(optimizer: Any, *args: Any, **kwargs: Any) -> Any:
    """DeepSpeed's step(), marked as running (``update_model_bit16_weights`` skips its re-pointing then)."""
    setattr(optimizer, IN_STEP, True)
    try:
        return type(optimizer).step(optimizer, *args, **kwargs)
    finally:
        setattr(optimizer, IN_STEP, False)


def reduce_to_owners(optimizer: Any, small_bucket: list[torch.Tensor], communication_data_type: torch.dtype,
                     log: Any = None, divide: bool = True, process_group: Any = None,
                     bucket_ranks: Optional[list] = None, output_bucket: Optional[list] = None) -> None:
    """Gradient reduction of one backward bucket (replaces ``allreduce_and_copy_with_multiple_ranks``).

    With reduce_scatter on, DeepSpeed slices each backward bucket by the rank that owns each piece (ZeRO-2
    partitions) and then, by default (use_multi_rank_bucket_allreduce), all-reduces the whole bucket so that every
    rank receives every slice and keeps its own: 2(n-1)/n x the gradient bytes on the wire per rank, where a
    reduce-scatter needs (n-1)/n x (measured by bench/bench_comm_volume.py, in BENCHMARKS.md). Its alternative path
    (one reduce per owner) synchronises the whole device before each reduce when overlap_comm is on. Here the
    bucket's slices are grouped by owner and reduced to it: one flat `reduce` per owner (a bucket spans 1-3 of the
    contiguous partitions), each queued on the current (reduction) stream without a host sync; only the owner
    copies the result back, exactly where DeepSpeed's all-reduce path copied it."""
    owners = [next(iter(r)) if isinstance(r, frozenset) and len(r) == 1 else r for r in bucket_ranks or []]
    if len(owners) != len(small_bucket) or not all(isinstance(o, int) for o in owners):
        # a slice several ranks consume (DeepSpeed's Muon split matrices): its all-reduce path
        return type(optimizer).allreduce_and_copy_with_multiple_ranks(
            optimizer, small_bucket, communication_data_type, log=log, divide=divide, process_group=process_group,
            bucket_ranks=bucket_ranks, output_bucket=output_bucket)
    from deepspeed import comm as ds_dist
    from deepspeed.accelerator import get_accelerator

    process_group = optimizer.dp_process_group if process_group is None else process_group
    local_rank = ds_dist.get_rank(group=process_group)
    outputs = output_bucket if output_bucket is not None else [None] * len(small_bucket)
    by_owner: dict[int, list[int]] = {}
    for index, owner in enumerate(owners):
        by_owner.setdefault(owner, []).append(index)
    record = optimizer.overlap_comm and not get_accelerator().resolves_data_dependency()
    for owner, indices in by_owner.items():
        grads = [small_bucket[i] for i in indices]
        # flatten → (dtype cast) → divide → dist.reduce to the owner; the owner gets the cast-back sum
        reduced = optimizer.allreduce_bucket(grads, communication_data_type, rank=owner, divide=divide,
                                             process_group=process_group)
        if record:
            reduced.record_stream(optimizer.reduction_stream)
        if owner != local_rank:
            continue
        for i, synced in zip(indices, optimizer.unflatten(reduced, grads)):
            optimizer._add_to_grad_partition_buffer(outputs[i], synced)
            small_bucket[i].copy_(synced)
            if record:
                small_bucket[i].record_stream(optimizer.reduction_stream)


# DeepSpeed's method name -> its replacement here.
REPLACEMENTS = {
    "has_overflow_partitioned_grads_serial": has_overflow_partitioned_grads_serial,
    "get_grad_norm_direct": get_grad_norm_direct,
    "unscale_and_clip_grads": unscale_and_clip_grads,
    "_update_model_bit16_weights": update_model_bit16_weights,
    "step": step,
    "allreduce_and_copy_with_multiple_ranks": reduce_to_owners,
}


def streamline_zero_optimizer(optimizer: Any) -> bool:
    """Install the replacements above on ``optimizer`` (its own attributes; the class and other optimizers keep
    DeepSpeed's methods, which the replacements call where they defer to DeepSpeed). Returns False (and changes
    nothing) for an optimizer this does not recognise, e.g. with CPU offload; raises when DeepSpeed's ZeRO
    optimizer lacks a method or attribute this relies on (another DeepSpeed version)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    if not isinstance(optimizer, DeepSpeedZeroOptimizer) or optimizer.cpu_offload or optimizer.has_moe_layers:
        return False
    # Each replacement relies on DeepSpeed's step() calling these by name with these meanings (checked against
    # 0.19.8, the pinned version). A DeepSpeed that renamed one would silently keep its slow path (or skip the
    # replaced clipping): refuse to train instead.
    missing = [name for name in STREAMLINED_METHODS if not callable(getattr(type(optimizer), name, None))]
    missing += [name for name in STREAMLINED_ATTRIBUTES if not hasattr(optimizer, name)]
    if missing:
        import deepspeed

        raise RuntimeError(
            f"sd_ds.zero_step.streamline_zero_optimizer: DeepSpeedZeroOptimizer has no {missing} in deepspeed "
            f"{deepspeed.__version__}; sd-ds's ZeRO step is written against deepspeed=={TESTED_DEEPSPEED} "
            f"(`pip install deepspeed=={TESTED_DEEPSPEED}`, as requirements.txt pins)")
    setattr(optimizer, IN_STEP, False)
    for name, replacement in REPLACEMENTS.items():
        setattr(optimizer, name, types.MethodType(replacement, optimizer))
    return True
