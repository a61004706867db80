"""What a learner GPU holds besides the models' states and the transformer blocks' activations: DeepSpeed's
gradient buckets and ZeRO-3's gathered parameters, the activations outside the blocks, NCCL's buffers.

The sizes follow DeepSpeed 0.19's defaults, which the learners' DeepSpeed config leaves as they are
(learners/worker.py::deepspeed_config):
- ZeRO-1/2 stage each engine's gradients in a bucket of ``reduce_bucket_size`` (5e8) elements, fp32 at
  ZeRO-1 and bf16 at ZeRO-2 (one buffer: ``overlap_comm`` is off below ZeRO-3); ZeRO-3 keeps one of the
  gradients' dtype (``contiguous_gradients``); ZeRO-0 all-reduces flattened copies of up to 5e8 elements.
- ZeRO-3 gathers a block's parameters for its forward and backward and prefetches the next
  (``stage3_prefetch_bucket_size`` 5e7, at most ``stage3_max_live_parameters`` 1e9 live): two blocks' worth.
- Outside the blocks a forward with gradient keeps the patch embedding's output (bf16) and the output
  norm's and modulation's fp32 inputs: about 10 bytes per token and channel.
- NCCL allocates its channels' buffers per communicator (4 MiB x channels x peers): about 1 GiB per rank
  with DeepSpeed's groups, an estimate.
The CUDA context (about 0.5 GiB) is taken off the card's limit instead (``memory_plan.usable_gib``).
"""

from __future__ import annotations

from omegaconf import DictConfig

BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size (elements)
PREFETCH, MAX_LIVE = 50_000_000, 1_000_000_000  # stage3_prefetch_bucket_size, stage3_max_live_parameters
OUTSIDE_BYTES = 10  # per token and channel of a clip-forward with gradient, outside the blocks
NCCL_GIB = 1.0


def bucket_bytes(zero: int, trainable: int) -> float:
    """One engine's gradient bucket at ZeRO ``zero`` (bytes)."""
    if zero == 0:
        return 2 * min(BUCKET, trainable)
    return (4 if zero == 1 else 2) * BUCKET


def gathered_bytes(cfg: DictConfig) -> float:
    """ZeRO-3's live gathered parameters while a block runs: two blocks' worth and the prefetch (bf16)."""
    from anyflow_ray.models.architectures import WAN_CONFIGS

    arch = WAN_CONFIGS[cfg.model.full_size]
    d, f = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"]
    block = 8 * d * d + 2 * d * f + 21 * d + f
    return 2 * min(MAX_LIVE, 2 * block + PREFETCH)


def outside_bytes(cfg: DictConfig, clip_forwards: float) -> float:
    """Activations kept outside the transformer blocks by ``clip_forwards`` forwards with gradient."""
    from anyflow_ray.models.architectures import WAN_CONFIGS
    from anyflow_ray.run.memory_plan import tokens_per_clip

    arch = WAN_CONFIGS[cfg.model.full_size]
    return clip_forwards * tokens_per_clip(cfg) * arch["num_attention_heads"] * arch["attention_head_dim"] * OUTSIDE_BYTES


def overhead_items(cfg: DictConfig, engines: dict[str, int], zero: int, ranks: int, clip_forwards: float) -> list:
    """The plan's rows for a learner rank with ``engines`` (name -> trainable parameters) at ZeRO ``zero``."""
    from anyflow_ray.run.memory_plan import GiB, Item

    items = [Item("ZeRO gradient buckets", sum(bucket_bytes(zero, n) for n in engines.values()),
                  f"{len(engines)} engine(s) x reduce_bucket_size 5e8 ({'fp32' if zero == 1 else 'bf16'})")]
    if zero >= 3:
        items.append(Item("ZeRO-3 gathered parameters (live)", gathered_bytes(cfg), "two blocks + the prefetch, bf16"))
    items.append(Item("activations outside the blocks (est.)", outside_bytes(cfg, clip_forwards),
                      f"{clip_forwards:g} clip-forward(s) x {OUTSIDE_BYTES} B per token and channel"))
    if ranks > 1:
        items.append(Item("NCCL buffers (est.)", NCCL_GIB * GiB, "per rank, DeepSpeed's process groups"))
    return items
