"""The config schema: one dataclass per group, its defaults and their one-line reasons.

``anyflow_ray.run.config`` loads a config against it (schema <- YAML <- overrides); every key is described
for ``anyflow-ray config`` in ``config_keys.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass
class TinyModelConfig:
    """Sizes of the tiny Wan-style model written by ``anyflow-ray make-tiny``."""
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 16
    ffn_dim: int = 128
    freq_dim: int = 64
    patch_size: list[int] = field(default_factory=lambda: [1, 4, 4])
    text_dim: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_max_length: int = 12


@dataclass
class LoraConfig:
    enabled: bool = False
    rank: int = 64
    alpha: int = 64
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2"])
    # extra targets of the two-time student only (e.g. "time_embedder.linear_1"); empty: E_r is trained in full
    flow_map_targets: list[str] = field(default_factory=list)


@dataclass
class CausalConfig:
    """The frame-autoregressive (FAR) student (docs/method.md §6). Empty ``chunks``: bidirectional."""
    chunks: list[int] = field(default_factory=list)  # latent frames per chunk, e.g. [1,3,3,3,3,3,3,2] of 21
    cache_chunks: int = 0  # chunks kept in the rolling KV cache when streaming past the training length (0: all)
    bidirectional_aux: float = 0.0  # Stage 1: probability of a bidirectional flow-matching step (reference 0.1)
    noisy_chunks: int = 0  # Stage 1: the last chunks noised, earlier ones clean context only (reference 3; 0: all)
    long_context_prob: float = 0.0  # Stage 1: probability of a longer prefix than noisy_chunks chunks (reference 0.5)
    full_chunk_limit: int = 0  # FAR's compressed context: chunks older than this many at a quarter of the tokens (reference 3; 0: off)


@dataclass
class ModelConfig:
    """Where the base model lives (a diffusers folder) and how the flow map wraps it."""
    base: str = "${run.output_dir}/base-model"  # diffusers folder (make-tiny writes one; or Wan2.1-*-Diffusers)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    gate: float = 0.25  # fixed weight of the r-time MLP in e = (1-gate) E_t(T) + gate E_r(R)
    pixel_space: bool = True  # True: identity autoencoder (tiny); False: Wan VAE
    lora: LoraConfig = field(default_factory=LoraConfig)
    causal: CausalConfig = field(default_factory=CausalConfig)
    gradient_checkpointing: bool = False
    full_size: str = ""  # "", "1.3b" or "14b": the Wan2.1 architecture (--dry-run plans)
    negative_prompt: str = ""  # c_null (dropped prompts, CFG, DMD); "" tiny, Wan's standard negative prompt for Wan2.1


@dataclass
class ScheduleConfig:
    shift: float = 5.0


@dataclass
class DataConfig:
    root: str = "${run.output_dir}/data"
    num_train: int = 2048
    num_heldout: int = 256
    frames: int = 8
    height: int = 16
    width: int = 16
    shard_size: int = 512
    seed: int = 1234
    fps: float = 16.0  # frame rate clips are sampled at (`prepare`; the mp4 files `data` writes with format=mp4)
    format: str = "parquet"  # `anyflow-ray data` writes: parquet (shards, the default) or mp4 (mp4 + json clips)
    rank_shards: bool = False  # each rank streams its own rows in bounded memory (draws then depend on the rank count)
    row_group_size: int = 16  # rows per Parquet row group written (the unit a stream reads)
    window_row_groups: int = 4  # row groups a stream holds at once (its memory bound; the shuffle's reach)
    shard_format: int = 2  # shards written: 2 (bf16, embeddings trimmed to their tokens) or 1 (fp32, padded)


@dataclass
class PrepareConfig:
    """`anyflow-ray prepare`: captioned videos -> Wan latents + UMT5 embeddings in Parquet shards (Ray Data)."""
    input: list[str] = field(default_factory=list)  # folders, .mp4 files, .tar shards, .csv/.jsonl manifests
    output: str = "${data.root}/train"
    decode_cpus: float = 1.0  # CPUs per decode task
    vae_batch_size: int = 1  # clips per VAE call
    vae_concurrency: str = "auto"  # VAE actors: a number, or auto (the cluster's GPUs less the text pool's)
    vae_gpus: float = 0.0  # GPUs per VAE actor (1 on a GPU cluster)
    vae_dtype: str = "auto"  # fp32, bf16 (checked against fp32 on each actor's first batch) or auto (bf16 on a GPU)
    text_batch_size: int = 16
    text_concurrency: str = "auto"  # text-encoder actors: a number, or auto (1 per 32 GPUs, at least 1)
    text_gpus: float = 0.0  # GPUs per text-encoder actor
    actor_cpus: float = 1.0  # CPUs per VAE / text-encoder actor
    retry_skipped: bool = False  # a re-run tries the clips of the skip list again (after fixing them)
    clips_per_block: int = 8  # clips per Ray Data block of work items (one decode task each)
    heldout_fraction: float = 0.0  # this fraction of the clips (by key hash) goes to heldout_output instead
    heldout_output: str = "${data.root}/heldout"


@dataclass
class TeacherConfig:
    """Single-time flow-matching teacher trained from scratch (docs/method.md §3)."""
    output: str = "${run.output_dir}/teacher"
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    warmup: int = 100
    uncond_prob: float = 0.1
    ema: float = 0.995
    ema_warmup: int = 0  # the EMA is a plain copy of the weights for the first N steps, then decays
    grad_clip: float = 1.0
    log_every: int = 50
    save_every: int = 1000


@dataclass
class TimeoutsConfig:
    """Seconds each phase of the learner group may take before the group fails, naming the late rank."""
    placement: float = 900.0  # the ranks' and actors' bundles placed (with run.autoscaling: nodes arriving)
    setup: float = 3600.0  # one rank's set-up: process group, data index, weights (14B and UMT5 take minutes)
    step: float = 900.0  # a training step; a trajectory fetch; the rollouts drained after the last step
    save: float = 3600.0  # a checkpoint save, its load on resume, the stage's export
    collective: float = 3600.0  # torch.distributed's watchdog on one collective: >= step and save (a rank
    # waits at a barrier while another saves)


@dataclass
class LearnerConfig:
    """The DeepSpeed learner group: N Ray actors, one rank each."""
    num_ranks: int = 1
    zero_stage: int = 0
    grad_accum: int = 1  # micro-steps per optimizer step (teacher, Stage 1): batch = ranks x grad_accum x micro
    see_node_gpus: bool = True  # each rank sees its node's GPUs and selects its own (NCCL P2P/NVLink in a node)
    cpus_per_rank: float = 1.0
    gpus_per_rank: str = "auto"  # or a number; read from the cluster's resources, never the driver's hardware
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    master_port: int = 0  # 0: rank 0 picks a free port


@dataclass
class PretrainConfig:
    """Stage 1: forward flow-map training of the student initialised from the teacher (docs/method.md §4)."""
    output: str = "${run.output_dir}/stage1"
    init: str = "${teacher.output}"  # the model the student wraps: the teacher, or ${model.base} (the reference)
    steps: int = 1000
    global_batch: int = 32  # over all ranks; a multiple of 4 (50/25/25 split)
    lr: float = 5.0e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.0
    warmup: int = 1000
    ema: float = 0.999
    ema_warmup: int = 0  # the EMA is a plain copy of the weights for the first N steps, then decays
    grad_clip: float = 1.0
    guidance: float = 3.0  # CFG fused into the student
    fd_delta: float = 5.0
    uncond_prob: float = 0.1
    derivative: str = "fd"  # fd | jvp
    target: str = "data"  # v in the target: data (eps - x0, docs/method.md §4) or teacher (its velocity)
    save_every: int = 500
    log_every: int = 25
    resume: bool = True  # continue from <output>/checkpoints/latest when present


@dataclass
class RolloutConfig:
    """Stage-2 rollout actors: scale independently of the learner ranks."""
    num_actors: Union[int, str] = 1  # or "auto": sized from the learner's throughput (run/fleet_plan.py)
    cpus_per_actor: float = 0.5
    gpus_per_actor: str = "auto"  # "auto" = 1 when the cluster has GPUs (0.5 with colocate), else 0; or a number
    colocate: bool = False  # actor i shares learner rank i mod num_ranks' bundle and GPU (e.g. 0.5 + 0.5)
    threads: int = 1
    batch_size: int = 8  # clips per trajectory
    failures_before_restart: int = 3  # consecutive rollouts of one actor that raised before it is restarted
    restarts_on_error: int = 2  # such restarts before the actor is retired (all retired: the run stops)


@dataclass
class DistillConfig:
    """Stage 2: on-policy distillation with flow-map backward simulation (docs/method.md §5)."""
    output: str = "${run.output_dir}/stage2"
    init: str = "${pretrain.output}"  # student G from the Stage-1 EMA
    teacher: str = "${teacher.output}"  # frozen real score R; the critic F starts as its copy
    steps: int = 1200
    lr: float = 2.0e-6
    critic_lr: float = "${distill.lr}"  # the reference; higher lets the critic track a fast-moving student
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.0
    ema: float = 0.99
    ema_warmup: int = 0  # the EMA is a plain copy of the weights for the first N steps, then decays
    grad_clip: float = 1.0
    critic: str = "copy"  # F: copy = a trainable copy of the teacher; lora = adapters on the frozen teacher itself
    dmd_guidance: float = 4.0  # CFG of the real score in x0 form
    budgets: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 50])
    grad_scope: str = "last"  # last: grad through the k-th step and the jump to 0; all: the prefix too (the reference)
    rollout: str = "flowmap"  # flowmap: backward simulation; consistency: the ablation's baseline (§5)
    real_batch: int = 8  # Stage-1 co-training batch (global, multiple of 4)
    real_weight: float = 1.0  # weight of the Stage-1 co-training loss against the DMD loss (the reference: 1)
    num_ranks: int = "${learner.num_ranks}"  # learner ranks of Stage 2 (rollout actors share the nodes)
    zero_stage: int = "${learner.zero_stage}"  # ZeRO stage of Stage 2's learner ranks
    sync_every: int = 1  # learner steps between weight broadcasts
    weight_sync: str = "object_store"  # object_store: rank 0 ray.puts, actors pull; torch_dist: a collective group
    sync_backend: str = "auto"  # torch_dist only: auto (nccl on GPUs, gloo on the CPU), gloo or nccl
    sync_timeout_s: float = 120.0  # torch_dist only: forming the group and each broadcast
    max_policy_lag: int = 1  # 0: strict on-policy alternation; 1: one-step-off
    buffer_capacity: int = 0  # trajectories; 0 = sized from the demand: 2 x ranks x (max_policy_lag + 1), >= actors
    save_every: int = 100
    log_every: int = 10
    resume: bool = True


@dataclass
class ExperimentsConfig:
    """Study knobs of Stage 2, fenced off from the method: each moves one part of it away from the reference
    to test a hypothesis (docs/experiments.md). The defaults are the reference; none is needed to run the
    method, and their verdicts are still open against the run-to-run spread (../shared/FINDINGS.md)."""
    critic_updates: int = 1  # critic updates per student update (the reference: 1; DMD2: 5), same x_hat, fresh noise
    dmd_shift: float = "${schedule.shift}"  # shift of DMD's and the critic's noise levels (the reference)
    critic_times: str = "logit_normal"  # the critic's noise levels (the reference); uniform: DMD's, sigma_shift(U(0,1))
    rollout_weights: str = "current"  # what the actors roll out with: the student as trained, or its EMA ("ema")
    grad_jump_only: bool = False  # DMD's gradient through the final jump alone (bidirectional students)


@dataclass
class SampleConfig:
    models: list[str] = field(default_factory=lambda: ["${distill.output}"])  # each into <output>/<folder name>/
    model: str = ""  # one pipeline folder, sampled instead of `models` when set (sample.model=X = sample.models=[X])
    prompts: list[str] = field(default_factory=lambda: ["a red circle moving right", "a blue square moving up",
                                                         "a yellow triangle moving left", "a green circle moving down"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    guidance_scale: float = 3.0
    output: str = "${run.output_dir}/samples"
    seed: int = 0
    max_chunks: int = 0  # causal students: chunks to generate (0: the training length; more streams on)


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["${teacher.output}", "${pretrain.output}", "${distill.output}"])
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    num_prompts: int = 64
    reference_steps: int = 100
    teacher_guidance: float = 3.0  # CFG of the teacher's samples and of its reference ODE solution
    batch_size: int = 32
    swd_projections: int = 256
    output: str = "${run.output_dir}/eval"
    seed: int = 7
    consistency_models: list[str] = field(default_factory=list)  # also sampled the consistency way (the demo trains them)
    frechet: bool = True  # Fréchet distance + adherence of the data's feature classifier (synthetic prompts only)


@dataclass
class RunConfig:
    output_dir: str = "outputs/tiny"
    # "": run.output_dir is the storage; s3://, gs://, file:///abs: the storage root, run.output_dir each node's
    # staging mirror of it (anyflow_ray/run/storage.py)
    storage: str = ""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16
    wandb_mode: str = "offline"  # overridden by WANDB_MODE when set
    wandb_project: str = "anyflow-ray"
    threads: int = 2
    keep_checkpoints: int = 2  # newest <output>/checkpoints/step-* folders kept after `latest` moves
    autoscaling: bool = False  # the cluster grows on demand: wait for nodes instead of refusing a placement
    gpu_memory_gb: float = 80.0  # per-GPU memory the --dry-run memory plan must fit in
    new_run: bool = False  # start a fresh <output>-2 (-3, ...) instead of resuming an earlier run (records.py)
    export_dtype: str = "auto"  # dtype of the exported pipelines: auto (the training precision) | fp32 | bf16
    lease_expiry_s: float = 300.0  # a crashed run's lease on its folder lets go this long after its last heartbeat


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiments: ExperimentsConfig = field(default_factory=ExperimentsConfig)
