"""Per-GPU memory plan of a training job, from the architecture alone (meta device: no weights, no GPU).

``--dry-run`` of ``teacher``, ``pretrain`` and ``distill`` prints it and refuses a plan above
``run.gpu_memory_gb``, so a cluster run fails on the laptop rather than after it has queued for GPUs.

What is counted per learner GPU (bf16 training, the learner worker's DeepSpeed set-up):
- weights: 2 bytes per parameter of every model the rank holds; partitioned over the ranks at ZeRO-3
  only when the model is inside a DeepSpeed engine (a frozen teacher outside one is whole on every rank);
- gradients: 2 bytes per trainable parameter, partitioned at ZeRO >= 2;
- optimizer: fp32 master copy + two AdamW moments, 12 bytes per trainable parameter, partitioned at ZeRO >= 1;
- EMA: 4 bytes per trainable parameter (fp32 shadow), whole on every rank at ZeRO <= 2;
- activations, with gradient checkpointing: the block input kept per transformer block for every forward
  whose graph is alive at the peak (B, L, D bf16 each), plus one block recomputed in backward
  (about L (60 D + 4 F) bytes per clip: an estimate of the bf16/fp32 intermediates of attention, norms
  and FFN, flash attention assumed). Without checkpointing every block keeps that much.
LoRA makes only the adapters (and E_r when it has no adapters of its own) trainable; see ``models/lora.py``.
A causal student (``model.causal.chunks``, docs/method.md §6) runs its graphs teacher-forced: the noisy
chunks followed by their clean copy, twice a clip's tokens, so each of its clip-forwards counts twice; its
rollout actors also hold the KV cache of a clip's clean chunks (K and V per layer).
DeepSpeed's gradient buckets, ZeRO-3's gathered parameters, the activations outside the blocks and NCCL's
buffers are ``run/overheads.py``'s; the CUDA context is taken off the card's limit (``usable_gib``).
Not counted: allocator fragmentation (keep a few GB of headroom; ``expandable_segments`` keeps it small).
"""

from __future__ import annotations

import functools
from pathlib import Path
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from anyflow_ray.run.config import ConfigError, grad_scope
from anyflow_ray.run.overheads import overhead_items

GiB = 2 ** 30
BF16, FP32, ADAM = 2, 4, 12  # bytes per parameter: weights/grads, EMA, master + two moments

# Wan2.1's text encoder (google/umt5-xxl, encoder only) and VAE, as their Diffusers folders configure them
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, relative_attention_max_distance=128,
                feed_forward_proj="gated-gelu", dropout_rate=0.0)


# What PyTorch reports as a card's total memory (torch.cuda.get_device_properties().total_memory, GiB): an
# "80 GB" H100 or A100 is 79.1-79.3 GiB, an H200 139.8; the CUDA context takes about 0.5 GiB of it.
CARDS = {80: ("H100 / A100 80 GB", 79.1), 141: ("H200 141 GB", 139.8), 40: ("A100 40 GB", 39.4)}


def usable_gib(card_gb: float) -> float:
    """The GiB a plan may use on a card of ``card_gb`` GB as sold (``run.gpu_memory_gb``): the total PyTorch
    reports for the cards in ``CARDS``, else the GB in GiB less 1.5%, both less 0.5 GiB of CUDA context."""
    total = CARDS[int(card_gb)][1] if float(card_gb) in CARDS else card_gb * 1e9 / GiB * 0.985
    return total - 0.5


class MemoryPlanError(ValueError):
    """The plan does not fit ``run.gpu_memory_gb``; the message names the biggest items."""


@dataclass
class Item:
    name: str
    bytes: float
    note: str = ""


@dataclass
class MemoryPlan:
    job: str
    limit_gb: float
    items: list[Item] = field(default_factory=list)  # per learner GPU
    other: dict[str, list[Item]] = field(default_factory=dict)  # other processes (rollout actor GPU, host RAM)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(item.bytes for item in self.items)

    def biggest(self, n: int = 3) -> list[Item]:
        return sorted(self.items, key=lambda item: -item.bytes)[:n]

    def fits(self, card_gb: float | None = None) -> bool:
        return self.total <= usable_gib(self.limit_gb if card_gb is None else card_gb) * GiB

    def cards(self) -> str:
        """Whether the learner GPU's total fits each card of ``CARDS``."""
        return "; ".join(f"{name}: " + (f"fits, {usable_gib(gb) - self.total / GiB:.1f} GiB spare" if self.fits(gb)
                                         else f"does not fit ({self.total / GiB - usable_gib(gb):.1f} GiB over)")
                         for gb, (name, _) in CARDS.items())

    def table(self) -> str:
        lines = [f"per-GPU memory plan, {self.job} (learner rank):"]
        lines += [f"  {item.name:<44s} {item.bytes / GiB:9.2f} GiB  {item.note}".rstrip() for item in self.items]
        lines.append(f"  {'total':<44s} {self.total / GiB:9.2f} GiB  (run.gpu_memory_gb={self.limit_gb:g}: "
                     f"{usable_gib(self.limit_gb):.1f} GiB usable)")
        lines.append(f"  cards: {self.cards()}")
        for where, items in self.other.items():
            lines.append(f"{where}:")
            lines += [f"  {item.name:<44s} {item.bytes / GiB:9.2f} GiB  {item.note}".rstrip() for item in items]
            lines.append(f"  {'total':<44s} {sum(i.bytes for i in items) / GiB:9.2f} GiB")
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def check(self) -> None:
        """Raise MemoryPlanError when the learner GPU's total exceeds the limit."""
        if not self.fits():
            worst = ", ".join(f"{item.name} {item.bytes / GiB:.1f} GiB" for item in self.biggest())
            raise MemoryPlanError(f"{self.job} needs {self.total / GiB:.1f} GiB per GPU, more than run.gpu_memory_gb="
                                  f"{self.limit_gb:g} leaves ({usable_gib(self.limit_gb):.1f} GiB); biggest: {worst}")


@dataclass(frozen=True)
class ModelCounts:
    total: int
    trainable: int


def transformer_counts(size: str, flow_map: bool, lora) -> ModelCounts:
    """Parameter counts of the Wan2.1 ``size`` transformer on the meta device, with LoRA when enabled."""
    return _counts(size, flow_map, OmegaConf.to_yaml(lora))


@functools.lru_cache(maxsize=None)
def _counts(size: str, flow_map: bool, lora_yaml: str) -> ModelCounts:
    """``transformer_counts`` once per (size, kind, LoRA settings): a meta 14B with LoRA takes seconds."""
    from anyflow_ray.models.architectures import count_parameters, meta_transformer
    from anyflow_ray.models.lora import apply_lora

    lora = OmegaConf.create(lora_yaml)
    model = meta_transformer(size, flow_map=flow_map)
    if lora.enabled:
        apply_lora(model, lora)
    return ModelCounts(count_parameters(model), count_parameters(model, trainable_only=True))


@functools.lru_cache(maxsize=None)
def text_encoder_parameters() -> int:
    """Parameters of Wan2.1's UMT5-XXL encoder (meta device)."""
    import torch
    from transformers import UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        model = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    return sum(p.numel() for p in model.parameters())


def tokens_per_clip(cfg: DictConfig) -> int:
    """Transformer tokens of one clip: Wan VAE (4x temporal, 8x spatial) then the 1x2x2 patches."""
    from anyflow_ray.models.architectures import WAN_CONFIGS

    from anyflow_ray.run.config import latent_frames

    p_t, p_h, p_w = WAN_CONFIGS[cfg.model.full_size]["patch_size"]
    return (latent_frames(cfg) // p_t) * (cfg.data.height // 8 // p_h) * (cfg.data.width // 8 // p_w)


def far_on(cfg: DictConfig) -> bool:
    """Whether FAR's compressed context is in play: a causal student with more chunks than ``full_chunk_limit``."""
    limit = int(cfg.model.causal.get("full_chunk_limit", 0))
    return bool(limit) and len(cfg.model.causal.chunks) > limit


def student_sequence(cfg: DictConfig, stage: str = "pretrain") -> float:
    """Clips' worth of tokens in one student forward with grad: 2 for a causal student (teacher forcing:
    the noisy chunks and their clean copy, docs/method.md §6), else 1. With FAR's compressed context
    Stage 1's widest layout reads its old chunks at a quarter of the tokens and noises only the newest,
    and Stage 2 re-runs chunk by chunk: 1 (its caches: ``far_caches``)."""
    cc = cfg.model.causal
    chunks = [int(c) for c in cc.chunks]
    if not chunks or not far_on(cfg):
        return 2 if chunks else 1
    if stage == "distill":
        return 1
    n = len(chunks) if cc.long_context_prob > 0 else max(int(cc.noisy_chunks), 1)
    old = max(0, n - int(cc.full_chunk_limit))
    return (sum(chunks[:old]) / 4 + 2 * sum(chunks[old:n])) / sum(chunks)


def far_caches(cfg: DictConfig) -> float:
    """Bytes of the K/V caches a Stage-2 learner rank keeps for the backward of its per-chunk re-run with
    FAR's compressed context: one cache per chunk (its earlier chunks, the oldest compressed), per clip."""
    from anyflow_ray.models.architectures import WAN_CONFIGS
    from anyflow_ray.models.far_context import compressed_count

    chunks, arch = [int(c) for c in cfg.model.causal.chunks], WAN_CONFIGS[cfg.model.full_size]
    frames = 0.0
    for j in range(1, len(chunks)):
        old = compressed_count(j, int(cfg.model.causal.full_chunk_limit), caching=True)
        frames += sum(chunks[:old]) / 4 + sum(chunks[old:j])
    d = arch["num_attention_heads"] * arch["attention_head_dim"]
    tokens = frames * tokens_per_clip(cfg) / sum(chunks)
    return cfg.rollout.batch_size * tokens * arch["num_layers"] * 2 * d * BF16


def activation_bytes(cfg: DictConfig, clips_forwards: int, clips_per_pass: int) -> tuple[float, float]:
    """(kept, recompute) bytes: the checkpointed block inputs of ``clips_forwards`` clip-forwards whose
    graphs are alive together, and one block's backward for ``clips_per_pass`` clips."""
    from anyflow_ray.models.architectures import WAN_CONFIGS

    arch = WAN_CONFIGS[cfg.model.full_size]
    d, f, layers = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"], arch["num_layers"]
    tokens = tokens_per_clip(cfg)
    block = tokens * (60 * d + 4 * f)
    if not cfg.model.gradient_checkpointing:  # every block keeps its intermediates
        return clips_forwards * layers * block, 0.0
    return clips_forwards * layers * tokens * d * BF16, clips_per_pass * block


def engine_items(name: str, counts: ModelCounts, zero: int, ranks: int, ema: bool) -> list[Item]:
    """Weights, gradients, optimizer (and EMA) of one DeepSpeed engine at ZeRO ``zero`` over ``ranks``."""
    def part(on: bool) -> int:
        return ranks if on else 1

    items = [Item(f"{name} weights", BF16 * counts.total / part(zero >= 3),
                  f"{counts.total / 1e9:.3f} B params, bf16" + (", ZeRO-3 partitioned" if zero >= 3 else "")),
             Item(f"{name} gradients", BF16 * counts.trainable / part(zero >= 2),
                  f"{counts.trainable / 1e6:.1f} M trainable"),
             Item(f"{name} optimizer (AdamW)", ADAM * counts.trainable / part(zero >= 1), "fp32 master + 2 moments")]
    if ema:
        items.append(Item(f"{name} EMA", FP32 * counts.trainable / part(zero >= 3), "fp32"))
    return items


def _activation_items(cfg: DictConfig, forwards: int, per_pass: int, what: str) -> list[Item]:
    kept, recompute = activation_bytes(cfg, forwards, per_pass)
    ckpt = "gradient checkpointing" if cfg.model.gradient_checkpointing else "no checkpointing"
    return [Item("activations: kept block inputs", kept, f"{what}; {tokens_per_clip(cfg)} tokens/clip, {ckpt}"),
            Item("activations: one block's backward (est.)", recompute, f"{per_pass:.3g} clip(s)")]


def _host_items(cfg: DictConfig, job: str = "") -> dict[str, list[Item]]:
    from anyflow_ray.run.data_plan import data_items

    n = text_encoder_parameters()
    stored = "://" not in str(cfg.data.root) and (Path(str(cfg.data.root)) / "c_null.safetensors").is_file()
    encoder = (Item("text encoder UMT5-XXL: not loaded", 0.0, "c_null is stored beside the data (data/uncond.py)")
               if stored else Item("text encoder UMT5-XXL (encodes c_null once)", FP32 * n,
                                   f"{n / 1e9:.2f} B params, fp32, CPU; none once `prepare` has written "
                                   f"{cfg.data.root}/c_null.safetensors"))
    items = {HOST_RANK: [encoder, *data_items(cfg)]}
    if job == "distill":
        items["host RAM per rollout actor (not GPU)"] = data_items(cfg, videos=False)
    return items


HOST_RANK = "host RAM per learner rank (not GPU)"


def node_note(plan: MemoryPlan, ranks: int, gpus_per_node: int = 8) -> str:
    """Host RAM of a node's learner ranks (``gpus_per_node`` of them, one GPU each)."""
    per_rank = sum(item.bytes for item in plan.other[HOST_RANK])
    on_node = min(ranks, gpus_per_node)
    return (f"host RAM of the learner ranks of one {gpus_per_node}-GPU node: {on_node} x {per_rank / GiB:.1f} GiB "
            f"= {on_node * per_rank / GiB:.1f} GiB (rollout actors on the node add theirs)")


def _accum(cfg: DictConfig) -> str:
    accum = int(cfg.learner.grad_accum)
    return f" per micro-step ({accum} per step, learner.grad_accum)" if accum > 1 else ""


def plan_teacher(cfg: DictConfig) -> MemoryPlan:
    ranks, zero = cfg.learner.num_ranks, cfg.learner.zero_stage
    plan = MemoryPlan("teacher", cfg.run.gpu_memory_gb)
    teacher = transformer_counts(cfg.model.full_size, False, cfg.model.lora)
    plan.items += engine_items("teacher", teacher, zero, ranks, ema=True)
    micro = cfg.teacher.batch_size // (ranks * cfg.learner.grad_accum)
    plan.items += _activation_items(cfg, micro, micro, f"{micro} clip(s) x 1 forward with grad{_accum(cfg)}")
    plan.items += overhead_items(cfg, {"teacher": teacher.trainable}, zero, ranks, micro)
    plan.other = _host_items(cfg)
    plan.notes.append(node_note(plan, ranks))
    return plan


def plan_pretrain(cfg: DictConfig) -> MemoryPlan:
    ranks, zero = cfg.learner.num_ranks, cfg.learner.zero_stage
    plan = MemoryPlan("pretrain (Stage 1)", cfg.run.gpu_memory_gb)
    student = transformer_counts(cfg.model.full_size, True, cfg.model.lora)
    plan.items += engine_items("student", student, zero, ranks, ema=True)
    if cfg.pretrain.target == "teacher":  # a frozen teacher outside the engine: whole on every rank
        frozen = transformer_counts(cfg.model.full_size, False, no_lora())
        plan.items.append(Item("teacher weights (frozen)", BF16 * frozen.total, "pretrain.target=teacher"))
    micro, seq = cfg.pretrain.global_batch // (ranks * cfg.learner.grad_accum), student_sequence(cfg)
    what = f"{micro} clip(s) x 1 forward with grad (+3 without){_accum(cfg)}"
    forwards = micro * seq
    if seq > 1:
        what = f"{micro} clip(s) x 1 teacher-forced forward (2x tokens) with grad (+3 without){_accum(cfg)}"
    if cfg.model.causal.bidirectional_aux > 0:  # one graph with the causal loss's: both alive at the backward
        forwards += micro
        what += " + the bidirectional auxiliary forward"
    plan.items += _activation_items(cfg, forwards, micro * seq, what)
    plan.items += overhead_items(cfg, {"student": student.trainable}, zero, ranks, forwards)
    plan.other = _host_items(cfg)
    plan.notes.append(node_note(plan, ranks))
    return plan


def distill_forwards(cfg: DictConfig) -> tuple[int, int]:
    """(clip-forwards alive at the peak, clips per backward pass) of one Stage-2 learner rank.

    The generator's loss is two backward passes (learners/distill.py): DMD's graph holds the student jumps
    with grad (k-th step and jump to 0; the prefix too with ``grad_scope: all``; the jump alone with
    ``experiments.grad_jump_only``) for each of the rank's ``rollout.batch_size`` clips, the co-training's
    its real clips; the critic's graph is built after both are freed, so the peak is the largest of the
    three. A causal student's forwards are teacher-forced (``student_sequence``: twice a clip's tokens);
    the critic stays bidirectional.
    """
    clips, seq, co = cfg.rollout.batch_size, student_sequence(cfg, "distill"), student_sequence(cfg)
    jumps = {"all": 3, "last": 2, "jump": 1}[grad_scope(cfg)]
    real = cfg.distill.real_batch // cfg.distill.num_ranks
    return max(clips * jumps * seq, real * co, clips), max(clips * seq, real * co)


def plan_distill(cfg: DictConfig) -> MemoryPlan:
    ranks, zero, lora = cfg.distill.num_ranks, cfg.distill.zero_stage, cfg.model.lora
    plan = MemoryPlan("distill (Stage 2)", cfg.run.gpu_memory_gb)
    student = transformer_counts(cfg.model.full_size, True, lora)
    plan.items += engine_items("student G", student, zero, ranks, ema=True)
    shared = cfg.distill.critic == "lora"
    critic = transformer_counts(cfg.model.full_size, False, lora if lora.enabled else _all_trainable())
    name = "critic F = teacher R + LoRA" if shared else "critic F (copy of the teacher)"
    plan.items += engine_items(name, critic, zero, ranks, ema=False)
    if not shared:
        frozen = transformer_counts(cfg.model.full_size, False, no_lora())
        plan.items.append(Item("teacher R weights (frozen)", BF16 * frozen.total, "outside any engine: whole"))
    forwards, per_pass = distill_forwards(cfg)
    plan.items += _activation_items(cfg, forwards, per_pass, f"{forwards:g} clip-forward(s) with grad at the peak "
                                    f"(grad_scope={grad_scope(cfg)})")
    plan.items += overhead_items(cfg, {"student": student.trainable, "critic": critic.trainable}, zero, ranks, forwards)
    if far_on(cfg):
        plan.items.append(Item("K/V caches of the per-chunk re-run (FAR)", far_caches(cfg),
                               f"{cfg.rollout.batch_size} clip(s), one cache per chunk kept for the backward"))
    plan.other = {"rollout actor GPU": _rollout_items(cfg, student), **_host_items(cfg, "distill")}
    plan.notes.append(node_note(plan, ranks))
    if cfg.rollout.colocate:
        plan.notes.append("rollout.colocate: a rollout actor shares each learner GPU; add its total to the learner's")
        plan.items.append(Item("colocated rollout actor", sum(i.bytes for i in plan.other["rollout actor GPU"])))
    if zero >= 3:
        plan.notes.append("ZeRO-3: every learner rank gathers each weight version it publishes (one chunk of whole "
                          "tensors at a time, <= 1 GiB) and the EMA at exports; distill.weight_sync must be "
                          "object_store")
    return plan


def _rollout_items(cfg: DictConfig, student: ModelCounts) -> list[Item]:
    """A rollout actor: the student (no optimizer), no-grad jumps of ``rollout.batch_size`` clips."""
    from anyflow_ray.models.architectures import WAN_CONFIGS

    arch = WAN_CONFIGS[cfg.model.full_size]
    d, f = arch["num_attention_heads"] * arch["attention_head_dim"], arch["ffn_dim"]
    block = cfg.rollout.batch_size * tokens_per_clip(cfg) * (16 * d + 4 * f)
    items = [Item("student weights", BF16 * student.total, "bf16, whole"),
             Item("no-grad forward (est.)", block, f"{cfg.rollout.batch_size} clip(s), one block's intermediates")]
    if cfg.model.causal.chunks:  # chunk by chunk on the K/V of the clip's earlier chunks (docs/method.md §6)
        cache = cfg.rollout.batch_size * arch["num_layers"] * 2 * tokens_per_clip(cfg) * d * BF16
        items.append(Item("KV cache (causal rollout)", cache, f"{cfg.rollout.batch_size} clip(s), K and V of every "
                          f"chunk, {arch['num_layers']} layers"))
    return items


def no_lora():
    return OmegaConf.create({"enabled": False})


def _all_trainable():
    """A marker for a fully trainable model (``transformer_counts`` then counts every parameter)."""
    return no_lora()


PLANS = {"teacher": plan_teacher, "pretrain": plan_pretrain, "distill": plan_distill}


def memory_plan(cfg: DictConfig, job: str) -> MemoryPlan:
    """The plan of ``job`` (teacher, pretrain or distill) for a full-size config (``model.full_size``)."""
    if job not in PLANS:
        raise ValueError(f"no memory plan for job {job!r}; expected one of {sorted(PLANS)}")
    if not cfg.model.full_size:
        raise ConfigError(f"{job} --dry-run needs model.full_size (1.3b or 14b), e.g. --config "
                         f"configs/wan2.1-t2v-1.3b.yaml")
    return PLANS[job](cfg)
