"""LoRA targets of the reference recipe, and one base model serving the real score R and the critic F."""

import torch
from omegaconf import OmegaConf

from anyflow_ray.run.config import TinyModelConfig
from anyflow_ray.models.architectures import tiny_transformer_config
from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel, call_model
from anyflow_ray.models.lora import AdaptersOff, apply_lora

SELF_ATTN_FFN = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
TIME = ["time_embedder.linear_1", "time_embedder.linear_2", "delta_embedder.linear_1", "delta_embedder.linear_2"]


def tiny(flow_map: bool):
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    torch.manual_seed(0)
    cls = WanFlowMapTransformer3DModel if flow_map else WanTransformer3DModel
    return cls(**tiny_transformer_config(TinyModelConfig(num_layers=1), channels=3))


def lora_cfg(flow_map_targets=()):
    return OmegaConf.create({"enabled": True, "rank": 4, "alpha": 4, "target_modules": SELF_ATTN_FFN,
                             "flow_map_targets": list(flow_map_targets)})


def trainable(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_student_gets_time_embedder_adapters_and_only_adapters_train():
    student = tiny(flow_map=True)
    apply_lora(student, lora_cfg(TIME))
    names = trainable(student)
    assert names and all("lora_" in n for n in names)  # E_r itself frozen: it has adapters of its own
    assert any("delta_embedder.linear_1.lora_A" in n for n in names)
    assert any("condition_embedder.time_embedder.linear_2.lora_B" in n for n in names)
    assert not any("attn2" in n for n in names)  # no cross-attention adapters


def test_without_flow_map_targets_er_stays_fully_trainable_as_before():
    student = tiny(flow_map=True)
    apply_lora(student, lora_cfg())
    assert "condition_embedder.delta_embedder.linear_1.weight" in trainable(student)


def test_teacher_and_critic_ignore_the_flow_map_targets():
    teacher = tiny(flow_map=False)
    apply_lora(teacher, lora_cfg(TIME))
    assert not any("time_embedder" in n for n in trainable(teacher))


def test_adapters_off_is_the_frozen_base_and_leaves_the_critic_adapters_on():
    critic = tiny(flow_map=False)
    z, T, c = torch.randn(1, 3, 2, 8, 8), torch.tensor([500.0]), torch.randn(1, 4, 32)
    base = call_model(critic, z, T, c).detach()
    apply_lora(critic, lora_cfg())
    with torch.no_grad():
        for name, p in critic.named_parameters():
            if "lora_B" in name:
                p.normal_()  # a trained critic: F differs from R
    real = AdaptersOff(critic)
    assert torch.allclose(call_model(real, z, T, c), base, atol=1e-6)
    assert not torch.allclose(call_model(critic, z, T, c), base, atol=1e-3)  # adapters back on afterwards
    assert all(p.requires_grad for n, p in critic.named_parameters() if "lora_" in n)
