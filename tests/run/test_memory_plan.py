"""The --dry-run memory plan against hand-computed counts (parameters x bytes), its refusal and the CLI exit code."""

import pytest

from anyflow_ray.cli import EXIT_MEMORY_PLAN, main
from anyflow_ray.run.config import load_config
from anyflow_ray.run.memory_plan import GiB, MemoryPlanError, memory_plan, tokens_per_clip

ARCH = {"1.3b": dict(d=1536, f=8960, layers=30), "14b": dict(d=5120, f=13824, layers=40)}
RANK = 256


def base_params(d: int, f: int, layers: int, flow_map: bool) -> int:
    """Wan2.1 transformer parameters by hand: blocks (self- and cross-attention with q/k norms, cross-attention
    norm, FFN, modulation table) plus patch, text and time embedders, time projection, head (+ E_r)."""
    block = 8 * d * d + 2 * d * f + 21 * d + f
    outside = 65 * d + (4096 * d + 2 * d + d * d) + (256 * d + 2 * d + d * d) + (6 * d * d + 6 * d) + 64 * d + 64 + 2 * d
    return layers * block + outside + ((256 * d + 2 * d + d * d) if flow_map else 0)


def lora_params(d: int, f: int, layers: int, flow_map: bool) -> int:
    """Rank-256 adapters r (in + out) on attn1 q/k/v/out and the FFN; the student also on E_t and E_r."""
    per_layer = 4 * RANK * (d + d) + 2 * RANK * (d + f)
    time = RANK * (256 + d) + RANK * (d + d)
    return layers * per_layer + (2 * time if flow_map else 0)


def items(plan) -> dict[str, float]:
    return {item.name: item.bytes for item in plan.items}


@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_distill_plan_matches_hand_counts(size):
    cfg = load_config(f"configs/wan2.1-t2v-{size}.yaml")
    a, ranks = ARCH[size], cfg.learner.num_ranks
    zero3 = ranks if cfg.distill.zero_stage == 3 else 1  # the 14B config runs Stage 2 at ZeRO-3
    assert cfg.distill.zero_stage == {"1.3b": 2, "14b": 3}[size]
    student_lora, critic_lora = lora_params(**a, flow_map=True), lora_params(**a, flow_map=False)
    plan = memory_plan(cfg, "distill")
    got = items(plan)
    assert got["student G weights"] == pytest.approx(2 * (base_params(**a, flow_map=True) + student_lora) / zero3)
    assert got["critic F = teacher R + LoRA weights"] == pytest.approx(
        2 * (base_params(**a, flow_map=False) + critic_lora) / zero3)
    assert "teacher R weights (frozen)" not in got  # the critic's frozen base is the real score
    assert got["student G gradients"] == pytest.approx(2 * student_lora / ranks)  # ZeRO-2: partitioned
    assert got["student G optimizer (AdamW)"] == pytest.approx(12 * student_lora / ranks)
    assert got["student G EMA"] == pytest.approx(4 * student_lora / zero3)
    assert got["critic F = teacher R + LoRA gradients"] == pytest.approx(2 * critic_lora / ranks)
    # grad_scope all: 3 jumps per generator clip, or the co-training clips (their own backward), whichever
    # graph is larger; block inputs kept per layer
    clips = cfg.rollout.batch_size
    forwards = max(3 * clips, cfg.distill.real_batch // ranks)
    assert tokens_per_clip(cfg) == 21 * (480 // 16) * (832 // 16)
    assert got["activations: kept block inputs"] == forwards * a["layers"] * tokens_per_clip(cfg) * a["d"] * 2
    assert plan.total == pytest.approx(sum(got.values()))


def test_teacher_and_pretrain_plans_count_only_their_adapters_as_trainable():
    cfg = load_config("configs/wan2.1-t2v-1.3b.yaml")
    a = ARCH["1.3b"]
    teacher, student = items(memory_plan(cfg, "teacher")), items(memory_plan(cfg, "pretrain"))
    assert teacher["teacher weights"] == 2 * (base_params(**a, flow_map=False) + lora_params(**a, flow_map=False))
    assert teacher["teacher EMA"] == 4 * lora_params(**a, flow_map=False)
    assert student["student EMA"] == 4 * lora_params(**a, flow_map=True)  # E_t and E_r adapters, E_r frozen
    micro = cfg.pretrain.global_batch // (cfg.learner.num_ranks * cfg.learner.grad_accum)
    assert student["activations: kept block inputs"] == micro * a["layers"] * tokens_per_clip(cfg) * a["d"] * 2


def test_zero3_partitions_the_weights_and_a_copied_critic_adds_the_teacher():
    cfg = load_config("configs/wan2.1-t2v-14b.yaml", ["learner.zero_stage=3", "distill.critic=copy"])
    a = ARCH["14b"]
    got = items(memory_plan(cfg, "distill"))
    assert got["student G weights"] == pytest.approx(2 * (base_params(**a, flow_map=True)
                                                          + lora_params(**a, flow_map=True)) / 8)
    assert got["teacher R weights (frozen)"] == 2 * base_params(**a, flow_map=False)  # outside the engines


def test_14b_distill_fits_8x80gb_at_zero3_with_one_clip_per_rank():
    cfg = load_config("configs/wan2.1-t2v-14b.yaml", ["learner.zero_stage=3", "rollout.batch_size=1",
                                                      "distill.real_batch=8"])
    plan = memory_plan(cfg, "distill")
    plan.check()
    assert plan.total < 80 * GiB


def test_a_plan_above_gpu_memory_gb_is_refused_naming_the_biggest_items():
    cfg = load_config("configs/wan2.1-t2v-1.3b.yaml", ["run.gpu_memory_gb=8"])
    with pytest.raises(MemoryPlanError, match=r"needs .* GiB per GPU, more than run.gpu_memory_gb=8 leaves \(6.8 GiB\); "
                                              r"biggest: activations: .*, activations: .*, teacher weights [0-9.]+ GiB"):
        memory_plan(cfg, "teacher").check()


def test_the_limit_is_what_the_card_leaves_pytorch_and_the_plan_says_which_cards_hold_it():
    """An "80 GB" H100 is 79.1 GiB to PyTorch, 78.6 after the CUDA context: a 79 GiB plan is refused there
    and fits an H200; every plan names the 80, 141 and 40 GB cards it fits."""
    from anyflow_ray.run.memory_plan import usable_gib

    assert usable_gib(80) == pytest.approx(78.6) and usable_gib(141) == pytest.approx(139.3)
    assert usable_gib(48) == pytest.approx(48e9 / GiB * 0.985 - 0.5)  # a card not in the table: GB less 1.5%
    from anyflow_ray.run.memory_plan import Item, MemoryPlan

    plan = MemoryPlan("pretrain", 80, [Item("activations", 79 * GiB)])  # it fitted "80 GiB" before
    with pytest.raises(MemoryPlanError, match="run.gpu_memory_gb=80 leaves"):
        plan.check()
    assert plan.cards() == ("H100 / A100 80 GB: does not fit (0.4 GiB over); H200 141 GB: fits, 60.3 GiB spare; "
                            "A100 40 GB: does not fit (40.1 GiB over)")
    assert memory_plan(load_config("configs/wan2.1-t2v-14b.yaml"), "pretrain").cards().startswith("H100 / A100 80 GB: fits")


def test_cli_dry_run_exit_codes(capsys):
    assert main(["distill", "--config", "configs/wan2.1-t2v-1.3b.yaml", "--dry-run"]) == 0
    assert "plan fits" in capsys.readouterr().out
    assert main(["teacher", "--config", "configs/wan2.1-t2v-1.3b.yaml", "--dry-run", "run.gpu_memory_gb=10"]) \
        == EXIT_MEMORY_PLAN
    err = capsys.readouterr().err
    assert err.startswith("anyflow-ray teacher: teacher needs") and len(err.strip().splitlines()) == 1


def test_dry_run_needs_a_full_size_model(capsys):
    assert main(["distill", "--config", "configs/tiny.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distill --dry-run needs model.full_size" in err[0]


@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_causal_plans_count_the_clean_copy_and_the_rollout_kv_cache(size):
    """Without FAR's compressed context teacher forcing doubles the student's tokens (noisy chunks + clean
    copy); the bidirectional auxiliary step adds one plain forward; causal rollouts hold K and V of every chunk."""
    full = ["model.causal.full_chunk_limit=0"]
    cfg = load_config(f"configs/wan2.1-t2v-{size}-causal.yaml", full)
    a, tokens = ARCH[size], tokens_per_clip(cfg)
    per_clip = a["layers"] * tokens * a["d"] * 2  # one clip-forward's checkpointed block inputs
    micro = cfg.pretrain.global_batch // (cfg.learner.num_ranks * cfg.learner.grad_accum)
    assert items(memory_plan(cfg, "pretrain"))["activations: kept block inputs"] == (2 * micro + micro) * per_clip
    no_aux = load_config(f"configs/wan2.1-t2v-{size}-causal.yaml", [*full, "model.causal.bidirectional_aux=0"])
    assert items(memory_plan(no_aux, "pretrain"))["activations: kept block inputs"] == 2 * micro * per_clip
    clips, real = cfg.rollout.batch_size, cfg.distill.real_batch // cfg.distill.num_ranks
    plan = memory_plan(cfg, "distill")
    assert items(plan)["activations: kept block inputs"] == 2 * max(3 * clips, real) * per_clip  # grad_scope all
    rollout = {item.name: item.bytes for item in plan.other["rollout actor GPU"]}
    assert rollout["KV cache (causal rollout)"] == clips * a["layers"] * 2 * tokens * a["d"] * 2


def test_with_fars_compressed_context_old_chunks_count_a_quarter_and_stage2_keeps_a_cache_per_chunk():
    """14B causal (full_chunk_limit 3 over chunks [1,3,3,3,3,3,3,2], the reference's): Stage 1's widest layout
    is 13 frames compressed (13/4) + 8 noisy frames and their clean copy; Stage 2 re-runs chunk by chunk (one
    clip's tokens) and keeps, per chunk j >= 1, the K/V cache of chunks < j, all but the last two compressed.
    Stage 1 fits an 80 GB GPU, Stage 2 the config's 141 GB."""
    config = "configs/wan2.1-t2v-14b-causal.yaml"
    cfg, plain = load_config(config), load_config(config, ["model.causal.full_chunk_limit=0"])
    a, tokens = ARCH["14b"], tokens_per_clip(cfg)
    per_clip = a["layers"] * tokens * a["d"] * 2
    micro = cfg.pretrain.global_batch // (cfg.learner.num_ranks * cfg.learner.grad_accum)
    seq = (13 / 4 + 2 * 8) / 21
    assert items(memory_plan(cfg, "pretrain"))["activations: kept block inputs"] == pytest.approx((seq * micro + micro) * per_clip)
    clips, real = cfg.rollout.batch_size, cfg.distill.real_batch // cfg.distill.num_ranks
    far, full = items(memory_plan(cfg, "distill")), items(memory_plan(plain, "distill"))
    assert far["activations: kept block inputs"] == pytest.approx(max(3 * clips, seq * real) * per_clip)
    frames = 1 + 4 + (1 / 4 + 6) + (4 / 4 + 6) + (7 / 4 + 6) + (10 / 4 + 6) + (13 / 4 + 6)  # chunks 1..7
    cache = far["K/V caches of the per-chunk re-run (FAR)"]
    assert cache == pytest.approx(clips * frames * tokens / 21 * a["layers"] * 2 * a["d"] * 2)
    assert "K/V caches of the per-chunk re-run (FAR)" not in full
    memory_plan(load_config(config, ["run.gpu_memory_gb=80"]), "pretrain").check()
    memory_plan(cfg, "distill").check()
    with pytest.raises(MemoryPlanError):
        memory_plan(load_config(config, ["run.gpu_memory_gb=80"]), "distill").check()


@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_the_causal_configs_plans_fit_their_gpus(size):
    for job in ("pretrain", "distill"):
        memory_plan(load_config(f"configs/wan2.1-t2v-{size}-causal.yaml"), job).check()


def test_the_generator_graph_holds_the_jumps_the_grad_scope_names():
    from anyflow_ray.run.memory_plan import distill_forwards

    def generator(scope):
        cfg = load_config("configs/wan2.1-t2v-1.3b.yaml", ["experiments.grad_jump_only=true"] if scope == "jump"
                          else [f"distill.grad_scope={scope}"])
        return distill_forwards(cfg)[0], cfg.rollout.batch_size, cfg.distill.real_batch // cfg.distill.num_ranks

    (all_, clips, real), (last, _, _), (jump, _, _) = generator("all"), generator("last"), generator("jump")
    assert real <= clips  # the DMD graph is the larger: the jumps with grad are the peak
    assert (all_, last, jump) == (3 * clips, 2 * clips, clips)


def test_wan_data_rows_are_counted_in_the_shard_format_a_reader_holds(tmp_path):
    """A stream's windows hold rows as stored: shard format 2 is bf16 latents (16 x 21 x 60 x 104) and bf16
    states of the prompt's tokens (512 at most without a manifest; the manifest's longest prompt when the
    data set is prepared), format 1 fp32 padded to 512 tokens; read_shards holds fp32 rows (and each shard as
    stored while it loads)."""
    from anyflow_ray.run.data_plan import data_items

    latent = 16 * 21 * 60 * 104
    cfg = load_config("configs/wan2.1-t2v-1.3b.yaml", ["data.rank_shards=true"])
    held = cfg.data.window_row_groups * cfg.data.row_group_size
    (window,) = data_items(cfg)
    assert window.bytes == 3 * held * 2 * (latent + 512 * 4096)
    (v1,) = data_items(load_config("configs/wan2.1-t2v-1.3b.yaml", ["data.rank_shards=true", "data.shard_format=1"]))
    assert v1.bytes == 3 * held * 4 * (latent + 512 * 4096) == 2 * window.bytes
    (embeddings,) = data_items(cfg, videos=False)
    assert embeddings.bytes == 3 * held * 2 * 512 * 4096
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text('{"num_rows": 50000, "max_embedding_length": 120}')
    prepared = load_config("configs/wan2.1-t2v-1.3b.yaml", ["data.rank_shards=true", f"data.root={tmp_path}"])
    (window,) = data_items(prepared)
    assert window.bytes == 3 * held * 2 * (latent + 120 * 4096) and "120 tokens" in window.note
    whole = load_config("configs/wan2.1-t2v-1.3b.yaml", ["data.rank_shards=false", f"data.root={tmp_path}"])
    (memory,) = data_items(whole)
    assert memory.bytes == 50_000 * (4 * (latent + 512 * 4096) + 2 * (latent + 120 * 4096))


def test_learner_ranks_hold_no_text_encoder_once_c_null_is_stored(tmp_path):
    from anyflow_ray.run.memory_plan import HOST_RANK

    def encoder_bytes():
        plan = memory_plan(load_config("configs/wan2.1-t2v-1.3b.yaml", [f"data.root={tmp_path}"]), "pretrain")
        return next(item.bytes for item in plan.other[HOST_RANK] if item.name.startswith("text encoder"))

    assert encoder_bytes() > 20 * GiB  # UMT5-XXL in fp32: encoding c_null on every rank
    (tmp_path / "c_null.safetensors").write_bytes(b"")
    assert encoder_bytes() == 0


def test_deepspeeds_buckets_zero3_gathers_activations_outside_the_blocks_and_nccl_are_counted():
    """14B Stage 2 at ZeRO-3 on 8 ranks: a bf16 bucket of 5e8 elements per engine (student, critic), two
    blocks' parameters gathered plus the 5e7 prefetch, 10 bytes per token and channel outside the blocks for
    each of the 3 clip-forwards with gradient, 1 GiB of NCCL buffers; Stage 1 at ZeRO-2: one bucket, no gather."""
    a = ARCH["14b"]
    cfg = load_config("configs/wan2.1-t2v-14b.yaml")
    got = items(memory_plan(cfg, "distill"))
    assert got["ZeRO gradient buckets"] == 2 * 2 * 5e8
    block = 8 * a["d"] ** 2 + 2 * a["d"] * a["f"] + 21 * a["d"] + a["f"]
    assert got["ZeRO-3 gathered parameters (live)"] == 2 * (2 * block + 5e7)
    assert got["activations outside the blocks (est.)"] == 3 * tokens_per_clip(cfg) * a["d"] * 10
    assert got["NCCL buffers (est.)"] == GiB
    stage1 = items(memory_plan(cfg, "pretrain"))
    assert stage1["ZeRO gradient buckets"] == 2 * 5e8 and "ZeRO-3 gathered parameters (live)" not in stage1
    one_rank = items(memory_plan(load_config("configs/wan2.1-t2v-14b.yaml", ["learner.num_ranks=1",
                                                                            "learner.zero_stage=1"]), "teacher"))
    assert one_rank["ZeRO gradient buckets"] == 4 * 5e8 and "NCCL buffers (est.)" not in one_rank  # fp32 at ZeRO-1
