"""The Wan configs carry the reference recipe (docs/method.md §4, §5, §9; NVlabs/AnyFlow options/train/anyflow)."""

import pytest
from omegaconf import OmegaConf

from anyflow_ray.run.config import load_config
from anyflow_ray.models.text import WAN_NEGATIVE_PROMPT

SELF_ATTN_FFN = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
TIME_EMBEDDERS = ["time_embedder.linear_1", "time_embedder.linear_2", "delta_embedder.linear_1",
                  "delta_embedder.linear_2"]
COMMON = {
    "model.negative_prompt": WAN_NEGATIVE_PROMPT,
    "model.lora.enabled": True, "model.lora.rank": 256, "model.lora.alpha": 256,
    "model.lora.target_modules": SELF_ATTN_FFN, "model.lora.flow_map_targets": TIME_EMBEDDERS,
    "schedule.shift": 5.0, "data.frames": 81, "data.height": 480, "data.width": 832,
    "teacher.lr": 5e-5, "teacher.betas": [0.9, 0.95], "teacher.weight_decay": 0.0, "teacher.warmup": 1000,
    "teacher.ema": 0.999, "teacher.ema_warmup": 1000, "teacher.grad_clip": 1.0, "teacher.uncond_prob": 0.1,
    "pretrain.lr": 5e-5, "pretrain.betas": [0.9, 0.95], "pretrain.weight_decay": 0.0, "pretrain.warmup": 1000,
    "pretrain.ema": 0.999, "pretrain.ema_warmup": 1000, "pretrain.grad_clip": 1.0, "pretrain.uncond_prob": 0.1,
    "pretrain.guidance": 3.0, "pretrain.fd_delta": 5.0, "pretrain.target": "data", "pretrain.derivative": "fd",
    "distill.steps": 1200, "distill.lr": 2e-6, "distill.critic_lr": 2e-6, "distill.betas": [0.0, 0.999],
    "distill.weight_decay": 0.0, "distill.ema": 0.99, "distill.ema_warmup": 200, "distill.grad_clip": 1.0,
    "distill.real_weight": 1.0, "distill.dmd_guidance": 4.0, "distill.budgets": [2, 4, 8, 16, 50],
    "distill.grad_scope": "all", "distill.critic": "lora",
}
BY_SIZE = {"1.3b": {"teacher.steps": 6000, "pretrain.steps": 6000, "teacher.batch_size": 32,
                    "pretrain.global_batch": 32, "distill.real_batch": 32},
           "14b": {"teacher.steps": 4000, "pretrain.steps": 4000, "teacher.batch_size": 16,
                   # Stage 2 at 8 ranks x 1 clip (what fits 8 x 80 GB, at ZeRO-3); the reference: 16 GPUs x 1
                   "pretrain.global_batch": 16, "distill.real_batch": 8, "distill.zero_stage": 3,
                   "learner.zero_stage": 2}}


@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_wan_config_matches_the_reference_recipe(size):
    cfg = load_config(f"configs/wan2.1-t2v-{size}.yaml")
    expected = {**COMMON, **BY_SIZE[size]}
    got = {key: OmegaConf.select(cfg, key) for key in expected}
    got = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v for k, v in got.items()}
    assert got == expected
    assert cfg.pretrain.init == cfg.model.base  # Stage 1 from the base model + fresh LoRA, not the teacher
    # Stage 2's generator batch (one trajectory per learner rank) equals the co-training batch
    assert cfg.distill.num_ranks * cfg.rollout.batch_size == cfg.distill.real_batch


def test_tiny_config_keeps_its_behaviour():
    cfg = load_config("configs/tiny.yaml")
    assert cfg.model.negative_prompt == "" and cfg.model.lora.flow_map_targets == []
    assert (cfg.teacher.ema_warmup, cfg.pretrain.ema_warmup, cfg.distill.ema_warmup) == (0, 0, 0)
    assert list(cfg.teacher.betas) == [0.9, 0.999] and cfg.distill.critic == "copy"
    assert cfg.pretrain.init == cfg.teacher.output and cfg.distill.grad_scope == "last"


# the reference's FAR options (options/train/anyflow/farwan_causal): chunk_partition, full_chunk_limit,
# long_context_training_ratio, bidirectional_modeling_prob
FAR = {"model.causal.chunks": [1, 3, 3, 3, 3, 3, 3, 2], "model.causal.noisy_chunks": 3, "model.causal.full_chunk_limit": 3,
       "model.causal.long_context_prob": 0.5, "model.causal.bidirectional_aux": 0.1}
# what each causal config changes besides FAR and its own folder (docs/method.md §6; the configs say why)
CAUSAL_CHANGES = {"1.3b": {"model.causal.cache_chunks": 7, "distill.num_ranks": 16, "rollout.batch_size": 2,
                           "rollout.num_actors": 4},  # auto: 16 ranks keep 3.5 rollout GPUs busy
                  "14b": {"model.causal.cache_chunks": 7, "run.gpu_memory_gb": 141.0, "learner.zero_stage": 3}}


def _flat(cfg) -> dict:
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    return dict(walk(OmegaConf.to_container(cfg), ""))


@pytest.mark.parametrize("size", ["1.3b", "14b"])
def test_causal_wan_config_is_the_bidirectional_recipe_plus_the_references_far_options(size):
    causal, bidirectional = (_flat(load_config(f"configs/wan2.1-t2v-{size}{tail}.yaml")) for tail in ("-causal", ""))
    assert {key: causal[key] for key in FAR} == FAR
    assert sum(FAR["model.causal.chunks"]) == (81 - 1) // 4 + 1  # 21 latent frames
    changed = {key for key in causal if causal[key] != bidirectional[key]}
    own_folder = {key for key in changed if f"/mnt/anyflow/runs/wan2.1-t2v-{size}-causal" in str(causal[key])}
    assert changed - own_folder == set(FAR) | set(CAUSAL_CHANGES[size])
    assert {key: causal[key] for key in CAUSAL_CHANGES[size]} == CAUSAL_CHANGES[size]
    assert causal["teacher.output"] == bidirectional["teacher.output"]  # the bidirectional run's teacher
    assert causal["pretrain.init"] == causal["model.base"] and causal["pretrain.target"] == "data"
    cfg = load_config(f"configs/wan2.1-t2v-{size}-causal.yaml")
    assert cfg.distill.num_ranks * cfg.rollout.batch_size == cfg.distill.real_batch
