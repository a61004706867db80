"""The two-time flow-map model u_theta(z_t, t, r, c) on diffusers' ``WanTransformer3DModel`` (docs/method.md §2).

A second timestep MLP ``delta_embedder`` (E_r) is added beside Wan's ``time_embedder`` (E_t) and
initialised as a copy of it. Both read the same sinusoidal embedding of the 0..1000-scale time. The
combined embedding

    e = (1 - gate) E_t(T) + gate E_r(D),   gate = ``gate_value`` = 0.25 fixed,
    D = R (``deltatime_type="r"``, the reference's and NVIDIA's students) or T - R (``"t-r"``),

replaces the time embedding everywhere (block adaLN modulation and output head). It is computed as
``E_t(T) + gate (E_r(R) - E_t(T))`` so that, with E_r a copy of E_t, u(z, T, T) is bit-identical to
the pretrained model. The network output is an *average velocity*: one jump is
``Phi(z; T -> R) = z - (T - R)/1000 u``.

The class is a ``WanTransformer3DModel`` subclass, so ``from_pretrained``, LoRA through peft, gradient
checkpointing and the causal model's per-chunk layout (``models.causal``) work as for Wan. Its state dict
and config are those of diffusers' ``AnyFlowTransformer3DModel`` (Wan's plus
``condition_embedder.delta_embedder.*``; ``gate_value``, ``deltatime_type``), and ``save_pretrained`` writes
that class's name, so diffusers and the released NVIDIA students read and write one format with it
(docs/method.md §2; ``models.loading`` reads every layout). Folders from earlier versions of the project
(``time_embedder_r``, ``flow_map_gate``) load through ``_fix_state_dict_keys_on_load``.
"""

from __future__ import annotations

import copy
import json

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (DiffusionPipeline looks the loader base up here)
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel


DIFFUSERS_CLASS = "AnyFlowTransformer3DModel"  # diffusers >= 0.39, NVIDIA's AnyFlow-Wan2.1-T2V-*-Diffusers
DELTA_EMBEDDER = "condition_embedder.delta_embedder."
LEGACY_PREFIX = "condition_embedder.time_embedder_r."  # anyflow-ray before the field's format
DELTATIME_TYPES = ("r", "t-r")
# Wan's config keys diffusers' AnyFlow class does not take, and the only values it builds
WAN_ONLY = {"qk_norm": "rms_norm_across_heads", "added_kv_proj_dim": None, "pos_embed_seq_len": None}


class WanFlowMapTransformer3DModel(WanTransformer3DModel):
    """Wan DiT with a second time input r. ``forward(z, T, c, timestep_r=R)``; R defaults to T."""

    is_flow_map = True  # models taking (z, T, c, timestep_r=R); read by ``call_model``
    # Wan's fp32 modules and E_r beside E_t (their mix e_t + g (e_r - e_t) is taken in fp32)
    _keep_in_fp32_modules = [*WanTransformer3DModel._keep_in_fp32_modules, "delta_embedder"]

    @register_to_config
    def __init__(self, patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024, pos_embed_seq_len=None, gate_value: float = 0.25, deltatime_type: str = "r"):
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
                         pos_embed_seq_len=pos_embed_seq_len)
        if deltatime_type not in DELTATIME_TYPES:
            raise ValueError(f"deltatime_type={deltatime_type!r}: expected one of {DELTATIME_TYPES}")
        self.condition_embedder.delta_embedder = copy.deepcopy(self.condition_embedder.time_embedder)

    @classmethod
    def from_base(cls, base: WanTransformer3DModel, gate: float = 0.25) -> "WanFlowMapTransformer3DModel":
        """Wrap a pretrained single-time Wan transformer: copy its weights, E_r := copy of E_t."""
        config = init_kwargs(WanTransformer3DModel, base.config)
        with torch.device("meta"):
            model = cls(**config, gate_value=gate)
        state = base.state_dict()
        for name, tensor in base.condition_embedder.time_embedder.state_dict().items():
            state[f"{DELTA_EMBEDDER}{name}"] = tensor.clone()  # own storage, trained apart
        model.load_state_dict(state, strict=True, assign=True)
        # Non-persistent buffers (e.g. RoPE tables) are not in the state dict: take the base's.
        for name, buf in base.named_buffers():
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = buf.clone()
        # Every tensor now has the base's dtype, including the modules a bf16 Wan keeps in fp32
        # (time embedders, norms): no blanket cast.
        return model

    def time_embedding(self, T: torch.Tensor, R: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """e = E_t(T) + gate (E_r(D) - E_t(T)), D = R or T - R (``deltatime_type``); T, R are (B,) on the
        0..1000 scale."""
        embedder = self.condition_embedder
        delta = R if self.config.deltatime_type == "r" else T - R
        sin_t = embedder.timesteps_proj(T.float()).to(next(embedder.time_embedder.parameters()).dtype)
        sin_r = embedder.timesteps_proj(delta.float()).to(next(embedder.delta_embedder.parameters()).dtype)
        e_t = embedder.time_embedder(sin_t)
        e_r = embedder.delta_embedder(sin_r).to(e_t.dtype)
        return (e_t + self.config.gate_value * (e_r - e_t)).to(dtype)

    # -- the field's format --------------------------------------------------------------------------
    def _fix_state_dict_keys_on_load(self, state_dict) -> None:
        """An earlier version's ``condition_embedder.time_embedder_r.*`` read as ``delta_embedder``
        (diffusers calls this on a single-file checkpoint; ``models.loading`` refuses sharded ones)."""
        super()._fix_state_dict_keys_on_load(state_dict)
        for key in [k for k in state_dict if k.startswith(LEGACY_PREFIX)]:
            state_dict[DELTA_EMBEDDER + key[len(LEGACY_PREFIX):]] = state_dict.pop(key)

    def diffusers_config(self) -> dict | None:
        """This model's config as diffusers' ``AnyFlowTransformer3DModel`` takes it, or None when it uses
        a Wan option that class does not have (I2V's ``added_kv_proj_dim``, another ``qk_norm``)."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        if type(self) is not WanFlowMapTransformer3DModel or any(config.get(k) != v for k, v in WAN_ONLY.items()):
            return None
        return {"_class_name": DIFFUSERS_CLASS, "_diffusers_version": self.config.get("_diffusers_version"),
                **{k: v for k, v in config.items() if k not in WAN_ONLY}}

    def to_json_string(self) -> str:
        """``save_pretrained``'s config.json: diffusers' ``AnyFlowTransformer3DModel`` where it builds this
        model (see ``diffusers_config``), the project's class otherwise (the causal model, I2V)."""
        config = self.diffusers_config()
        if config is None:
            return super().to_json_string()
        from diffusers import __version__

        config["_diffusers_version"] = __version__
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                          indent=2, sort_keys=True) + "\n"

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_r: torch.Tensor | None = None, encoder_hidden_states_image: torch.Tensor | None = None,
                return_dict: bool = True, attention_kwargs: dict | None = None):
        """hidden_states (B, C, F, H, W); timestep, timestep_r (B,) in 0..1000; text (B, L, text_dim)."""
        if timestep_r is None:
            timestep_r = timestep
        batch, _, frames, height, width = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        rotary_emb = self.rope(hidden_states)

        tokens = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # (B, N, D)
        embedder = self.condition_embedder
        temb = self.time_embedding(timestep, timestep_r, dtype=encoder_hidden_states.dtype)  # (B, D)
        timestep_proj = embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))  # (B, 6, D)
        context = embedder.text_embedder(encoder_hidden_states)  # (B, L, D)
        if encoder_hidden_states_image is not None:
            context = torch.cat([embedder.image_embedder(encoder_hidden_states_image), context], dim=1)

        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, context, timestep_proj, rotary_emb)
            else:
                tokens = block(tokens, context, timestep_proj, rotary_emb)

        shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = self.proj_out(tokens)  # (B, N, p_t p_h p_w C)

        out = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)  # (B, C, F, H, W)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)


def init_kwargs(cls, config) -> dict:
    """The entries of ``config`` that ``cls.__init__`` takes (a loaded config also keeps the keys of the
    class that wrote it, e.g. diffusers' ``chunk_partition``)."""
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in dict(config).items() if k in accepted}


def call_model(model: torch.nn.Module, z: torch.Tensor, T: torch.Tensor, context: torch.Tensor,
               R: torch.Tensor | None = None) -> torch.Tensor:
    """One network evaluation. Flow maps get (T, R); single-time models (teacher, critic) ignore R."""
    if is_flow_map(model):
        return model(z, T, context, timestep_r=T if R is None else R, return_dict=False)[0]
    return model(z, T, context, return_dict=False)[0]


def is_flow_map(model: torch.nn.Module) -> bool:
    return bool(getattr(unwrap_model(model), "is_flow_map", False))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying diffusers model behind peft / DeepSpeed / DDP wrappers."""
    seen = 0
    while seen < 5:
        inner = getattr(model, "module", None) or getattr(getattr(model, "base_model", None), "model", None)
        if inner is None or inner is model:
            return model
        model, seen = inner, seen + 1
    return model
