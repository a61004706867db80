"""One config tree: OmegaConf structured configs (dataclasses), YAML files, ``key=value`` overrides.

``load_config("configs/tiny.yaml", ["train.steps=200"])`` merges YAML and overrides onto the dataclass schema;
a YAML file may start from another with ``extends: other.yaml`` (its own keys win). An unknown key or a value
of the wrong type fails with OmegaConf's message (which names the key); ``validate`` then checks ranges and
names the offending key too. Nothing runs before the config is valid."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad config key or value; the message names the key."""


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
    meta_init: bool = False  # build the full-size transformer on the meta device (dry runs, param counts)
    full_size: str = ""  # "", "1.3b" or "14b": the Wan2.1 architecture used by meta_init
    # c_null: the prompt whose embedding replaces dropped prompts, is the unconditional branch of CFG
    # fusion, DMD and sampling. "" for the tiny model; Wan's standard negative prompt for Wan2.1.
    negative_prompt: str = ""


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
    # true: each learner rank reads only its own shards (real data sets); its draws then depend on the
    # number of ranks (anyflow_ray/training/objectives.py). false: every rank reads the whole set (tiny data)
    rank_shards: bool = False


@dataclass
class PrepareConfig:
    """`anyflow-ray prepare`: captioned videos -> Wan latents + UMT5 embeddings in Parquet shards (Ray Data)."""
    input: list[str] = field(default_factory=list)  # folders, .mp4 files, .tar shards, .csv/.jsonl manifests
    output: str = "${data.root}/train"
    decode_cpus: float = 1.0  # CPUs per decode task
    vae_batch_size: int = 1  # clips per VAE call
    vae_concurrency: int = 1  # VAE actors
    vae_gpus: float = 0.0  # GPUs per VAE actor (1 on a GPU cluster)
    text_batch_size: int = 16
    text_concurrency: int = 1  # text-encoder actors
    text_gpus: float = 0.0  # GPUs per text-encoder actor
    actor_cpus: float = 1.0  # CPUs per VAE / text-encoder actor
    retry_skipped: bool = False  # a re-run tries the clips of the skip list again (after fixing them)


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
class LearnerConfig:
    """The DeepSpeed learner group: N Ray actors, one rank each."""
    num_ranks: int = 1
    zero_stage: int = 0
    cpus_per_rank: float = 1.0
    # GPUs per rank: "auto" = 1 when the cluster has GPUs (0.5 with rollout.colocate), else 0; or a
    # number. Read from the cluster's resources by the driver, never from the driver's own hardware.
    gpus_per_rank: str = "auto"
    timeout_s: float = 900.0  # start-up and collective time-out: a dead or stuck rank fails the group
    master_port: int = 0  # 0: rank 0 picks a free port


@dataclass
class PretrainConfig:
    """Stage 1: forward flow-map training of the student initialised from the teacher (docs/method.md §4)."""
    output: str = "${run.output_dir}/stage1"
    # the model the student wraps (E_r := copy of E_t): the teacher pipeline folder (tiny), or the base
    # model folder (${model.base}: the reference's Stage 1, base Wan2.1 + fresh LoRA)
    init: str = "${teacher.output}"
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
    # v in the target: "data" (eps - x0, docs/method.md §4) or "teacher" (the frozen teacher's velocity at
    # (z, T, c): the same expected target with a perfect teacher, no single-clip variance, one more call)
    target: str = "data"
    save_every: int = 500
    log_every: int = 25
    resume: bool = True  # continue from <output>/checkpoints/latest when present
    dry_run: bool = False  # meta-device model: parameter counts, DeepSpeed config, memory estimate


@dataclass
class RolloutConfig:
    """Stage-2 rollout actors: scale independently of the learner ranks."""
    num_actors: int = 1
    cpus_per_actor: float = 0.5
    gpus_per_actor: str = "auto"  # "auto" = 1 when the cluster has GPUs (0.5 with colocate), else 0; or a number
    # share the learner ranks' GPUs: each rollout actor is placed in a learner rank's bundle (actor i with
    # rank i mod num_ranks), e.g. 0.5 + 0.5 of a GPU, for clusters with fewer GPUs than roles
    colocate: bool = False
    threads: int = 1
    batch_size: int = 8  # clips per trajectory


@dataclass
class DistillConfig:
    """Stage 2: on-policy distillation with flow-map backward simulation (docs/method.md §5)."""
    output: str = "${run.output_dir}/stage2"
    init: str = "${pretrain.output}"  # student G from the Stage-1 EMA
    teacher: str = "${teacher.output}"  # frozen real score R; the critic F starts as its copy
    steps: int = 1200
    lr: float = 2.0e-6
    critic_lr: float = 0.0  # 0: same as lr (the reference); > 0 lets the critic track a fast-moving student
    critic_updates: int = 1  # critic updates per student update (the reference: 1; DMD2: 5), same x_hat, fresh noise
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.0
    ema: float = 0.99
    ema_warmup: int = 0  # the EMA is a plain copy of the weights for the first N steps, then decays
    rollout_weights: str = "current"  # what the actors roll out with: the student as trained, or its EMA ("ema")
    grad_clip: float = 1.0
    # critic F: "copy" = a trainable copy of the teacher (LoRA on it when model.lora.enabled); "lora" = LoRA adapters
    # on the frozen teacher itself: one copy of the base weights serves R (adapters off) and F (on); needs LoRA on
    critic: str = "copy"
    dmd_guidance: float = 4.0  # CFG of the real score in x0 form
    dmd_shift: float = 0.0  # shift of DMD's and the critic's noise levels; 0: schedule.shift (the reference)
    critic_times: str = "logit_normal"  # the critic's noise levels (the reference); uniform: DMD's, sigma_shift(U(0,1))
    budgets: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 50])
    grad_scope: str = "last"  # last: grad through the k-th step and the jump to 0; all: prefix too; jump: the jump only
    # flowmap: backward simulation (the method); consistency: the rollout ablation's baseline (predict x0,
    # re-noise with fresh noise; k calls to z_k, the learner re-runs the last prediction; docs/method.md §5)
    rollout: str = "flowmap"
    real_batch: int = 8  # Stage-1 co-training batch (global, multiple of 4)
    real_weight: float = 1.0  # weight of the Stage-1 co-training loss against the DMD loss (the reference: 1)
    num_ranks: int = 0  # learner ranks of Stage 2; 0 = learner.num_ranks (rollout actors share the nodes)
    zero_stage: int = -1  # ZeRO stage of Stage 2's learner ranks; -1 = learner.zero_stage
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
class SampleConfig:
    # pipeline folders to sample, each into <output>/<folder name>/ (teacher/, stage1/, stage2/ ...);
    # default: the final student of Stage 2
    models: list[str] = field(default_factory=lambda: ["${distill.output}"])
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
    # "" : run.output_dir is the storage (a local folder; on a cluster a mount every node shares).
    # s3://bucket/prefix, gs://..., file:///abs/path: the durable storage root for nodes that share no
    # disk; run.output_dir is then each node's staging mirror of it (anyflow_ray/run/storage.py)
    storage: str = ""
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (fp32 on CPU, bf16 on GPU) | fp32 | bf16
    wandb_mode: str = "offline"  # overridden by WANDB_MODE when set
    wandb_project: str = "anyflow-ray"
    threads: int = 2
    keep_checkpoints: int = 2  # newest <output>/checkpoints/step-* folders kept after `latest` moves
    # the cluster grows on demand (ray up's autoscaler, KubeRay autoscaling): wait for nodes instead of
    # refusing at once a placement that the nodes present now cannot hold
    autoscaling: bool = False
    gpu_memory_gb: float = 80.0  # per-GPU memory the --dry-run memory plan must fit in
    # a training job whose output folder holds an earlier run starts a fresh <output>-2 (-3, ...) instead of
    # resuming it (a resume with a config that differs in more than the step budget is refused: records.py)
    new_run: bool = False


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
    extra: Optional[dict[str, Any]] = None  # reserved; must stay empty


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """Schema <- YAML file <- ``key=value`` overrides, then resolved and validated."""
    schema = OmegaConf.structured(Config)
    try:
        merged = schema
        if path is not None:
            merged = OmegaConf.merge(merged, _load_yaml(Path(path)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key = item.split("=", 1)[0]
            try:
                merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
            except (OmegaConfBaseException, yaml.YAMLError) as err:  # YAML: e.g. an unquoted ${...} in a list
                raise ConfigError(f"bad override {key!r}: {err}") from err
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid config{f' {path}' if path else ''}: {err}") from err
    validate(merged)
    OmegaConf.set_readonly(merged, True)
    return merged


def _load_yaml(path: Path, extended_by: tuple[Path, ...] = ()) -> DictConfig:
    """A YAML config merged onto the file its top-level ``extends:`` names (relative to its folder)."""
    where = f" (extended by {extended_by[-1]})" if extended_by else ""
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}{where}")
    if path.resolve() in {p.resolve() for p in extended_by}:
        chain = " -> ".join(str(p) for p in (*extended_by, path))
        raise ConfigError(f"config 'extends' cycle: {chain}")
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"config file {path}{line}: malformed YAML ({problem}){where}") from err
    if not isinstance(node, DictConfig):
        raise ConfigError(f"config file {path}: expected a mapping of keys, got a {type(node).__name__}")
    parent = node.pop("extends", None)
    if parent is None:
        return node
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"extends={parent!r} in {path}: must be the path of another YAML config")
    return OmegaConf.merge(_load_yaml(path.parent / parent, (*extended_by, path)), node)


def _require(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


def validate(cfg: DictConfig) -> None:
    """Range checks OmegaConf's type checks cannot express. Each error names its key."""
    for key in ("schedule.shift", "data.fps", "teacher.lr", "run.gpu_memory_gb", "learner.cpus_per_rank",
                "learner.timeout_s", "pretrain.fd_delta", "distill.sync_timeout_s"):
        _require(OmegaConf.select(cfg, key) > 0, key, OmegaConf.select(cfg, key), "must be > 0")
    _require(0.0 <= cfg.model.gate <= 1.0, "model.gate", cfg.model.gate, "must be in [0, 1]")
    _require(cfg.model.full_size in ("", "1.3b", "14b"), "model.full_size", cfg.model.full_size, "must be '', '1.3b' or '14b'")
    _require(cfg.run.device in ("auto", "cpu", "cuda"), "run.device", cfg.run.device, "must be auto, cpu or cuda")
    _require(cfg.run.precision in ("auto", "fp32", "bf16"), "run.precision", cfg.run.precision, "must be auto, fp32 or bf16")
    for key in ("run.threads", "run.keep_checkpoints", "learner.num_ranks", "rollout.num_actors", "rollout.batch_size",
                "eval.num_prompts", "model.lora.rank", "prepare.vae_batch_size", "prepare.vae_concurrency",
                "prepare.text_batch_size", "prepare.text_concurrency"):
        _require(OmegaConf.select(cfg, key) >= 1, key, OmegaConf.select(cfg, key), "must be >= 1")
    for key in ("prepare.decode_cpus", "prepare.vae_gpus", "prepare.text_gpus", "prepare.actor_cpus", "teacher.ema_warmup",
                "pretrain.ema_warmup", "distill.ema_warmup", "distill.max_policy_lag", "distill.real_weight",
                "distill.dmd_shift", "rollout.cpus_per_actor", "model.causal.cache_chunks", "sample.max_chunks"):
        _require(OmegaConf.select(cfg, key) >= 0, key, OmegaConf.select(cfg, key), "must be >= 0")
    patch = list(cfg.model.tiny.patch_size)
    _require(len(patch) == 3 and all(p >= 1 for p in patch), "model.tiny.patch_size", patch, "must be 3 positive ints")
    _require(cfg.data.frames % patch[0] == 0 and cfg.data.height % patch[1] == 0 and cfg.data.width % patch[2] == 0,
             "data.frames/height/width", (cfg.data.frames, cfg.data.height, cfg.data.width),
             f"must be divisible by model.tiny.patch_size={patch}")
    for key in ("num_train", "num_heldout", "frames", "height", "width", "shard_size"):
        _require(cfg.data[key] >= 1, f"data.{key}", cfg.data[key], "must be >= 1")
    _require(cfg.data.format in ("parquet", "mp4"), "data.format", cfg.data.format, "must be parquet or mp4")
    for key in ("steps", "batch_size", "warmup", "log_every"):
        _require(cfg.teacher[key] >= (0 if key == "warmup" else 1), f"teacher.{key}", cfg.teacher[key], "out of range")
    _require(0.0 <= cfg.teacher.uncond_prob < 1.0, "teacher.uncond_prob", cfg.teacher.uncond_prob, "must be in [0, 1)")
    _require(0.0 <= cfg.teacher.ema < 1.0, "teacher.ema", cfg.teacher.ema, "must be in [0, 1)")
    _require(len(cfg.teacher.betas) == 2 and all(0 <= b < 1 for b in cfg.teacher.betas), "teacher.betas",
             list(cfg.teacher.betas), "must be two numbers in [0, 1)")
    for key, steps in (("sample.steps", cfg.sample.steps), ("eval.steps", cfg.eval.steps)):
        _require(len(steps) > 0 and all(int(n) >= 1 for n in steps), key, list(steps), "must be a non-empty list of ints >= 1")
    _require(cfg.eval.reference_steps >= max(cfg.eval.steps), "eval.reference_steps", cfg.eval.reference_steps,
             "must be >= the largest eval step count")
    _require(cfg.run.wandb_mode in ("offline", "online", "disabled"), "run.wandb_mode", cfg.run.wandb_mode,
             "must be offline, online or disabled")
    _require(not cfg.extra, "extra", cfg.extra, "is reserved and must be empty")
    _validate_causal(cfg)
    _require(cfg.run.storage == "" or "://" in cfg.run.storage, "run.storage", cfg.run.storage,
             "must be empty (run.output_dir is the storage) or a URI such as s3://bucket/prefix or file:///abs/path")
    _require(cfg.learner.zero_stage in (0, 1, 2, 3), "learner.zero_stage", cfg.learner.zero_stage, "must be 0, 1, 2 or 3")
    pc = cfg.pretrain
    _require(pc.global_batch > 0 and pc.global_batch % 4 == 0, "pretrain.global_batch", pc.global_batch,
             "must be a positive multiple of 4 (the 50/25/25 diagonal / r=0 / r<t split)")
    _require(pc.global_batch % cfg.learner.num_ranks == 0, "pretrain.global_batch", pc.global_batch,
             f"must be divisible by learner.num_ranks={cfg.learner.num_ranks}")
    _require(cfg.teacher.batch_size % cfg.learner.num_ranks == 0, "teacher.batch_size", cfg.teacher.batch_size,
             f"must be divisible by learner.num_ranks={cfg.learner.num_ranks}")
    _require(pc.derivative in ("fd", "jvp"), "pretrain.derivative", pc.derivative, "must be fd or jvp")
    _require(pc.target in ("data", "teacher"), "pretrain.target", pc.target, "must be data or teacher")
    _require(len(pc.betas) == 2 and all(0 <= b < 1 for b in pc.betas), "pretrain.betas", list(pc.betas),
             "must be two numbers in [0, 1)")
    _require(pc.guidance >= 1.0, "pretrain.guidance", pc.guidance, "must be >= 1")
    for key in ("steps", "save_every", "log_every"):
        _require(pc[key] >= 1, f"pretrain.{key}", pc[key], "must be >= 1")
    dc = cfg.distill
    for key in ("steps", "save_every", "log_every", "sync_every", "critic_updates"):
        _require(dc[key] >= 1, f"distill.{key}", dc[key], "must be >= 1")
    _require(dc.buffer_capacity >= 0, "distill.buffer_capacity", dc.buffer_capacity, "must be >= 0 (0: from the demand)")
    _require(dc.grad_scope in ("last", "all") or (dc.grad_scope == "jump" and not cfg.model.causal.chunks),
             "distill.grad_scope", dc.grad_scope, "must be last, all or jump (jump: a bidirectional student only)")
    for key, allowed in (("rollout", ("flowmap", "consistency")), ("critic_times", ("logit_normal", "uniform")),
                         ("rollout_weights", ("current", "ema")), ("critic", ("copy", "lora")),
                         ("weight_sync", ("object_store", "torch_dist")), ("sync_backend", ("auto", "gloo", "nccl"))):
        _require(dc[key] in allowed, f"distill.{key}", dc[key], f"must be {', '.join(allowed[:-1])} or {allowed[-1]}")
    _require(dc.rollout == "flowmap" or (dc.grad_scope == "last" and not cfg.model.causal.chunks), "distill.rollout",
             dc.rollout, "consistency takes distill.grad_scope=last and a bidirectional student (model.causal.chunks=[])")
    _require(dc.critic != "lora" or cfg.model.lora.enabled, "distill.critic", dc.critic,
             "lora needs model.lora.enabled=true (the critic is LoRA adapters on the frozen teacher)")
    _require(len(dc.budgets) > 0 and all(int(n) >= 1 for n in dc.budgets), "distill.budgets", list(dc.budgets),
             "must be a non-empty list of ints >= 1")
    _require(dc.num_ranks >= 0, "distill.num_ranks", dc.num_ranks, "must be >= 0 (0: learner.num_ranks)")
    _require(dc.zero_stage in (-1, 0, 1, 2, 3), "distill.zero_stage", dc.zero_stage,
             "must be -1 (learner.zero_stage), 0, 1, 2 or 3")
    zero_key = "distill.zero_stage" if dc.zero_stage >= 0 else "learner.zero_stage"
    _require(dc.weight_sync != "torch_dist" or distill_zero_stage(cfg) < 3, "distill.weight_sync", dc.weight_sync,
             f"torch_dist broadcasts whole weights from learner rank 0 alone, which {zero_key}=3 partitions; "
             f"use distill.weight_sync=object_store or {zero_key} <= 2")
    ranks = distill_ranks(cfg)
    _require(dc.real_batch > 0 and dc.real_batch % 4 == 0 and dc.real_batch % ranks == 0,
             "distill.real_batch", dc.real_batch, f"must be a positive multiple of 4 and of the {ranks} Stage-2 "
             f"learner rank(s)")
    for key in ("learner.gpus_per_rank", "rollout.gpus_per_actor"):
        value = OmegaConf.select(cfg, key)
        _require(value == "auto" or _is_amount(value), key, value, "must be auto or a number >= 0")
    if cfg.rollout.colocate:
        for key in ("learner.gpus_per_rank", "rollout.gpus_per_actor"):
            value = OmegaConf.select(cfg, key)
            _require(value == "auto" or float(value) < 1, key, value,
                     "must be auto or below 1 with rollout.colocate (learner and actor share one GPU)")


def latent_frames(cfg: DictConfig) -> int:
    """Latent frames of a clip: its frames in pixel space, 1 + (frames - 1) / 4 through the Wan VAE."""
    return int(cfg.data.frames) if cfg.model.pixel_space else (int(cfg.data.frames) - 1) // 4 + 1


def _validate_causal(cfg: DictConfig) -> None:
    """The FAR student's keys (docs/method.md §6): chunks tile the latent frames, Stage-1 options in range."""
    cc, chunks, frames = cfg.model.causal, list(cfg.model.causal.chunks), latent_frames(cfg)
    p_t = 1 if cfg.model.full_size else cfg.model.tiny.patch_size[0]
    _require(all(c >= 1 and c % p_t == 0 for c in chunks) and sum(chunks) in (0, frames), "model.causal.chunks",
             chunks, f"must be empty (bidirectional) or sizes (multiples of {p_t}) summing to the {frames} latent frames")
    _require(0 <= cc.noisy_chunks <= len(chunks), "model.causal.noisy_chunks", cc.noisy_chunks, f"must be in [0, {len(chunks)}]")
    _require(0 <= cc.bidirectional_aux <= 1 and (cc.bidirectional_aux == 0 or chunks), "model.causal.bidirectional_aux",
             cc.bidirectional_aux, "must be in [0, 1]; above 0 it needs model.causal.chunks")
    _require(0 <= cc.long_context_prob <= 1 and (cc.long_context_prob == 0 or cc.noisy_chunks > 0),
             "model.causal.long_context_prob", cc.long_context_prob, "must be in [0, 1]; above 0 it needs noisy_chunks > 0")
    _require(not chunks or cfg.pretrain.target == "data", "pretrain.target", cfg.pretrain.target,
             "must be data for a causal student: the teacher's velocity sees noisy, not clean, earlier chunks (§6)")


def _is_amount(value: str) -> bool:
    try:
        return float(value) >= 0
    except ValueError:
        return False


def gpu_amount(value: str, cluster_gpus: float, colocate: bool) -> float:
    """A ``gpus_per_rank`` / ``gpus_per_actor`` value as a number: ``auto`` is 1 GPU (0.5 when a learner
    rank and a rollout actor share one) when the cluster has any, else 0."""
    if value != "auto":
        return float(value)
    if cluster_gpus <= 0:
        return 0.0
    return 0.5 if colocate else 1.0


def distill_ranks(cfg: DictConfig) -> int:
    """Learner ranks of Stage 2: ``distill.num_ranks``, or ``learner.num_ranks`` when that is 0."""
    return int(cfg.distill.num_ranks or cfg.learner.num_ranks)


def distill_zero_stage(cfg: DictConfig) -> int:
    """ZeRO stage of Stage 2's learner ranks: ``distill.zero_stage``, or ``learner.zero_stage`` when it is -1."""
    stage = int(cfg.distill.zero_stage)
    return stage if stage >= 0 else int(cfg.learner.zero_stage)


def save_config(cfg: DictConfig, out_dir: str | Path) -> Path:
    """Write the resolved config as ``config.yaml`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.yaml"
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return path
