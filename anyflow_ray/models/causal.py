"""The causal (frame-autoregressive, FAR) two-time flow map (docs/method.md §6).

``WanCausalFlowMapTransformer3DModel`` is the flow map of §2 with its latent frames split into chunks
(``causal_chunks``, e.g. [1,3,3,3,3,3,3,2] of Wan's 21; frames past their sum continue in chunks of the
last size, which is how a video streams past the training length). Self-attention is block-causal (a
chunk sees itself and earlier chunks) through ``CausalWanAttnProcessor`` on diffusers' Wan attention;
every chunk has its own (T, R), so the time embedding and the adaLN modulation are per token (Wan2.2's
(B, seq, 6, D) path of the block). One forward serves three uses:

    u = model(z, T, c, timestep_r=R)                        block-causal over all chunks of z
    u = model(z, T, c, timestep_r=R, clean_states=x)        teacher forcing (Stage 1)
    u = model(z_j, T, c, timestep_r=R, kv_cache=cache,      chunk by chunk (sampling, Stage 2 rollouts)
              cache_states=x_{j-1})

Teacher forcing appends a clean copy of the clip at T = R = 0 with the same RoPE positions; a noisy
chunk reads the clean chunks before it and itself, a clean chunk the clean chunks up to itself, and
only the noisy tokens' outputs are returned. With a KV cache the call reads the cached clean K/V of
earlier chunks; ``cache_states`` (the chunk just finished) is encoded at T = R = 0 in the same call and
appended to the cache, so re-encoding the model's own output costs no extra call. RoPE positions are
absolute (``cache.frames``), also after ``cache.trim``.

With one chunk covering all frames the model is the bidirectional flow map: same weights, same output.

``full_chunk_limit`` (None: off, the tiny configs) turns on FAR's compressed context
(``models.far_context``): chunks older than the limit enter through ``far_patch_embedding`` at a quarter
of the tokens. A teacher-forced call over n > limit chunks takes the oldest n - limit as compressed clean
context (their times must be 0; their output is zeros), and a call on a KV cache encodes the cache again
from the clean latents it keeps (``KVCache.history``), the oldest compressed, in its first call of every
chunk, as diffusers' ``AnyFlowFARTransformer3DModel`` and its pipeline do.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (DiffusionPipeline looks the loader base up here)
from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

from anyflow_ray.run.config import ConfigError
from anyflow_ray.models.causal_attention import CausalWanAttnProcessor, KVCache, LayerPlan, Segment, attention_groups
from anyflow_ray.models.far_context import compressed_count, far_patch_weights, pooled_rope
from anyflow_ray.models.flowmap import WAN_ONLY, WanFlowMapTransformer3DModel, init_kwargs, unwrap_model

# (latents (B, C, F, H, W), clean?, absolute first latent frame, compressed?) of one part of a call's tokens
Part = tuple[torch.Tensor, bool, int, bool]
FAR_DIFFUSERS_CLASS = "AnyFlowFARTransformer3DModel"  # diffusers >= 0.39, NVIDIA's AnyFlow-FAR-Wan2.1-*


class WanCausalFlowMapTransformer3DModel(WanFlowMapTransformer3DModel):
    """Block-causal two-time Wan DiT over chunks of latent frames; see the module docstring."""

    is_causal = True  # read by ``is_causal``

    @register_to_config
    def __init__(self, patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
                 out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
                 rope_max_seq_len=1024, pos_embed_seq_len=None, gate_value: float = 0.25,
                 deltatime_type: str = "r", causal_chunks: list[int] | None = None,
                 full_chunk_limit: int | None = None, compressed_patch_size=(1, 4, 4)):
        super().__init__(patch_size=patch_size, num_attention_heads=num_attention_heads,
                         attention_head_dim=attention_head_dim, in_channels=in_channels, out_channels=out_channels,
                         text_dim=text_dim, freq_dim=freq_dim, ffn_dim=ffn_dim, num_layers=num_layers,
                         cross_attn_norm=cross_attn_norm, qk_norm=qk_norm, eps=eps, image_dim=image_dim,
                         added_kv_proj_dim=added_kv_proj_dim, rope_max_seq_len=rope_max_seq_len,
                         pos_embed_seq_len=pos_embed_seq_len, gate_value=gate_value,
                         deltatime_type=deltatime_type)
        chunks = list(causal_chunks or [])
        if not chunks or any(int(c) < 1 or int(c) % patch_size[0] for c in chunks):
            raise ConfigError(f"model.causal.chunks={chunks}: needs latent frames per chunk, each >= 1 and a "
                              f"multiple of the temporal patch size {patch_size[0]}")
        if image_dim is not None or added_kv_proj_dim is not None:
            raise ConfigError("the causal flow map is text-to-video only (image_dim/added_kv_proj_dim must be None)")
        if full_chunk_limit is not None:
            if int(full_chunk_limit) < 2:
                raise ConfigError(f"model.causal.full_chunk_limit={full_chunk_limit}: needs >= 2 (the chunk being "
                                  f"made and at least one before it at full size)")
            inner = num_attention_heads * attention_head_dim
            self.far_patch_embedding = torch.nn.Conv3d(in_channels, inner, kernel_size=tuple(compressed_patch_size),
                                                       stride=tuple(compressed_patch_size))
            weight, bias = far_patch_weights(self.patch_embedding.weight, self.patch_embedding.bias,
                                             tuple(compressed_patch_size))
            with torch.no_grad():
                self.far_patch_embedding.weight.copy_(weight)
                self.far_patch_embedding.bias.copy_(bias)
        for block in self.blocks:
            block.attn1.set_processor(CausalWanAttnProcessor())

    @classmethod
    def from_base(cls, base: WanTransformer3DModel, chunks: list[int], gate: float = 0.25,
                  full_chunk_limit: int | None = None) -> "WanCausalFlowMapTransformer3DModel":
        """The causal model with ``base``'s weights: a single-time Wan is first wrapped as in §2 (E_r := a
        copy of E_t, ``gate``); a flow map (causal or not) keeps its own E_r and gate. Tensors are shared
        with ``base`` as ``WanFlowMapTransformer3DModel.from_base`` shares them."""
        flow = base
        if not isinstance(base, WanFlowMapTransformer3DModel):
            flow = WanFlowMapTransformer3DModel.from_base(base, gate)
        config = init_kwargs(cls, flow.config)
        config["causal_chunks"] = [int(c) for c in chunks]
        if full_chunk_limit is not None:
            config["full_chunk_limit"] = int(full_chunk_limit)
        with torch.device("meta"):
            model = cls(**config)
        state = flow.state_dict()
        if model.config.full_chunk_limit is not None and "far_patch_embedding.weight" not in state:
            weight, bias = far_patch_weights(state["patch_embedding.weight"], state["patch_embedding.bias"],
                                             tuple(model.config.compressed_patch_size))
            state.update({"far_patch_embedding.weight": weight, "far_patch_embedding.bias": bias})
        model.load_state_dict(state, strict=True, assign=True)
        for name, buf in flow.named_buffers():  # RoPE tables: non-persistent, not in the state dict
            module_name, _, leaf = name.rpartition(".")
            model.get_submodule(module_name)._buffers[leaf] = buf
        return model

    def diffusers_config(self) -> dict | None:
        """With the compressed context on, this model's config as diffusers' ``AnyFlowFARTransformer3DModel``
        takes it (``causal_chunks`` as ``chunk_partition``); None without it (no such diffusers model)."""
        config = {k: v for k, v in self.config.items() if not k.startswith("_")}
        if config.get("full_chunk_limit") is None or any(config.get(k) != v for k, v in WAN_ONLY.items()):
            return None
        config["chunk_partition"] = list(config.pop("causal_chunks"))
        return {"_class_name": FAR_DIFFUSERS_CLASS, "_diffusers_version": self.config.get("_diffusers_version"),
                **{k: v for k, v in config.items() if k not in WAN_ONLY}}

    # -- chunks -------------------------------------------------------------------------------
    def chunk_bounds(self, num_frames: int) -> list[tuple[int, int]]:
        """[start, end) latent frames of each chunk of a ``num_frames`` video; past ``sum(causal_chunks)``
        chunks of the last size continue (streaming), the last one cut at ``num_frames``."""
        return chunk_bounds(self.config.causal_chunks, num_frames)

    def new_cache(self) -> KVCache:
        return KVCache(len(self.blocks))

    # -- calls --------------------------------------------------------------------------------
    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_r: torch.Tensor | None = None, clean_states: torch.Tensor | None = None,
                kv_cache: KVCache | None = None, cache_states: torch.Tensor | None = None,
                return_dict: bool = True, attention_kwargs: dict | None = None, bidirectional: bool = False):
        """hidden_states (B, C, F, H, W); timestep, timestep_r (B,) or (B, n): one time per chunk of
        ``hidden_states`` (0..1000); text (B, L, text_dim). Output: the noisy tokens' average velocity,
        the shape of ``hidden_states``. ``bidirectional``: all frames as one chunk, full attention (the
        Stage-1 auxiliary step of §6); a plain call only."""
        if bidirectional and (clean_states is not None or kv_cache is not None):
            raise ValueError("bidirectional=True is a plain call over all frames: no clean_states, no kv_cache")
        if clean_states is not None:
            if kv_cache is not None:
                raise ValueError("teacher forcing (clean_states) takes no kv_cache: its clean copy is the context")
            if clean_states.shape != hidden_states.shape:
                raise ValueError(f"clean_states {tuple(clean_states.shape)} must have the shape of "
                                 f"hidden_states {tuple(hidden_states.shape)}")
        if cache_states is not None and kv_cache is None:
            raise ValueError("cache_states are encoded into a kv_cache: pass kv_cache=model.new_cache()")
        if self.config.full_chunk_limit is not None and not bidirectional:
            out = self._far_forward(hidden_states, timestep, encoder_hidden_states, timestep_r, clean_states,
                                    kv_cache, cache_states)
            return (out,) if not return_dict else Transformer2DModelOutput(sample=out)
        first = kv_cache.frames if kv_cache is not None else 0
        parts: list[Part] = []
        if cache_states is not None:
            parts.append((cache_states, True, first, False))
            first += cache_states.shape[2]
        parts.append((hidden_states, False, first, False))
        if clean_states is not None:
            parts.append((clean_states, True, first, False))  # same positions as the noisy chunks
        out = self._run(parts, encoder_hidden_states, timestep, timestep_r, kv_cache, bidirectional)
        if not return_dict:
            return (out,)
        return Transformer2DModelOutput(sample=out)

    @torch.no_grad()
    def append_to_cache(self, kv_cache: KVCache, clean: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        """Encode clean latents (B, C, F, H, W), whole chunks placed at ``kv_cache.frames``, at T = R = 0
        into the cache: the re-encode alone (after the last chunk, or the fixed chunks of I2V/V2V)."""
        if self.config.full_chunk_limit is not None:
            self._run(self._cache_parts(kv_cache, clean), encoder_hidden_states, None, None, kv_cache)
            return
        self._run([(clean, True, kv_cache.frames, False)], encoder_hidden_states, None, None, kv_cache)

    # -- the compressed context (models.far_context) ---------------------------------------------
    def _far_forward(self, hidden_states, timestep, encoder_hidden_states, timestep_r, clean_states, kv_cache,
                     cache_states) -> torch.Tensor:
        """``forward`` with the compressed context on: see the module docstring."""
        if kv_cache is not None:
            parts = self._cache_parts(kv_cache, cache_states) if cache_states is not None else []
            parts.append((hidden_states, False, kv_cache.frames if cache_states is None else
                          parts[-1][2] + parts[-1][0].shape[2], False))
            return self._run(parts, encoder_hidden_states, timestep, timestep_r, kv_cache)
        spans = self._chunks_at(0, hidden_states.shape[2])
        old = compressed_count(len(spans), self.config.full_chunk_limit)
        if old == 0:
            parts = [(hidden_states, False, 0, False)]
            if clean_states is not None:
                parts.append((clean_states, True, 0, False))
            return self._run(parts, encoder_hidden_states, timestep, timestep_r, None)
        if clean_states is None:
            raise ValueError(f"a plain call over {len(spans)} chunks, more than full_chunk_limit="
                             f"{self.config.full_chunk_limit}: the compressed context is read from clean_states "
                             f"(teacher forcing) or a KV cache")
        times = []
        for name, t in (("timestep", timestep), ("timestep_r", timestep if timestep_r is None else timestep_r)):
            t = torch.as_tensor(t)
            if t.ndim != 2 or t.shape[1] != len(spans) or bool(t[:, :old].ne(0).any()):
                raise ValueError(f"{name}: the oldest {old} of {len(spans)} chunks are compressed clean context "
                                 f"(full_chunk_limit={self.config.full_chunk_limit}): give one time per chunk, 0 "
                                 f"for those")
            times.append(t[:, old:])
        cut = spans[old][1][0]
        parts = [(clean_states[:, :, :cut], True, 0, True), (hidden_states[:, :, cut:], False, cut, False),
                 (clean_states[:, :, cut:], True, cut, False)]
        out = self._run(parts, encoder_hidden_states, times[0], times[1], None)
        return torch.cat([out.new_zeros(*out.shape[:2], cut, *out.shape[3:]), out], dim=2)

    def _cache_parts(self, kv_cache: KVCache, clean: torch.Tensor) -> list[Part]:
        """The clean chunks ``kv_cache`` held plus ``clean`` (whole chunks at ``kv_cache.frames``), emptied
        from the cache to be encoded again in this call: the oldest compressed, the rest at full size."""
        first = kv_cache.reset()
        history = clean if kv_cache.history is None else torch.cat([kv_cache.history, clean], dim=2)
        kv_cache.history = history
        spans = self._chunks_at(first, history.shape[2])
        old = compressed_count(len(spans), self.config.full_chunk_limit, caching=True)
        if old == 0:
            return [(history, True, first, False)]
        cut = spans[old][1][0]
        return [(history[:, :, :cut - first], True, first, True), (history[:, :, cut - first:], True, cut, False)]

    # -- internals ----------------------------------------------------------------------------
    def _run(self, parts: list[Part], encoder_hidden_states: torch.Tensor, timestep, timestep_r,
             kv_cache: KVCache | None, bidirectional: bool = False) -> torch.Tensor | None:
        """The blocks over ``parts``; the noisy part's output (None when every part is clean)."""
        tokens, segments, rotary = self._tokens(parts, bidirectional)
        batch = tokens.shape[0]
        if kv_cache is not None and kv_cache.keys[0] is not None and kv_cache.keys[0].shape[0] != batch:
            raise ValueError(f"kv_cache holds a batch of {kv_cache.keys[0].shape[0]}, the call has {batch}")
        temb, timestep_proj = self._time(segments, timestep, timestep_r, batch, encoder_hidden_states.dtype,
                                         tokens.device)
        context = self.condition_embedder.text_embedder(encoder_hidden_states)  # (B, L, D)

        clean = [s for s in segments if s.clean]
        store = (clean[0].start, clean[-1].end) if kv_cache is not None and clean else None
        groups = attention_groups(segments, kv_cache.tokens if kv_cache is not None else 0)
        plans = [LayerPlan(rotary, groups, kv_cache.layer(i) if kv_cache is not None else None, store)
                 for i in range(len(self.blocks))]
        for block, plan in zip(self.blocks, plans):
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                tokens = self._gradient_checkpointing_func(block, tokens, context, timestep_proj, plan)
            else:
                tokens = block(tokens, context, timestep_proj, plan)
        if store is not None:
            clean_frames = sum(latents.shape[2] for latents, is_clean, *_ in parts if is_clean)
            kv_cache.append(plans, [s.end - s.start for s in clean], clean_frames, [s.frames for s in clean])

        noisy = [s for s in segments if not s.clean]
        if not noisy:
            return None
        start, end = noisy[0].start, noisy[-1].end
        tokens = tokens[:, start:end]
        if temb.ndim == 3:  # per token: (B, S, D)
            shift, scale = (self.scale_shift_table.unsqueeze(0).to(temb.device)
                            + temb[:, start:end].unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (self.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        tokens = (self.norm_out(tokens.float()) * (1 + scale) + shift).type_as(tokens)
        tokens = self.proj_out(tokens)  # (B, N, p_t p_h p_w C)
        latents = next(latents for latents, is_clean, *_ in parts if not is_clean)
        return self._unpatchify(tokens, latents.shape)

    def _tokens(self, parts: list[Part], bidirectional: bool = False
                ) -> tuple[torch.Tensor, list[Segment], tuple[torch.Tensor, torch.Tensor]]:
        """Patch tokens (B, S, D) of all parts in order, their chunk segments (``bidirectional``: one per
        part) and their RoPE (cos, sin)."""
        tokens, segments, cos, sin, offset = [], [], [], [], 0
        for latents, clean, first, compressed in parts:
            _, _, frames, height, width = latents.shape
            patch = self.config.compressed_patch_size if compressed else self.config.patch_size
            p_t, p_h, p_w = patch
            if frames % p_t or height % p_h or width % p_w:
                raise ValueError(f"latents {tuple(latents.shape)}: frames, height, width must be multiples of the "
                                 f"{'compressed ' if compressed else ''}patch size {tuple(patch)}")
            per_frame = (height // p_h) * (width // p_w)
            spans = [(0, (first, first + frames))] if bidirectional else self._chunks_at(first, frames)
            for chunk, (start, end) in spans:
                segments.append(Segment(clean, chunk, offset + (start - first) // p_t * per_frame,
                                        offset + (end - first) // p_t * per_frame, end - start))
            if compressed:
                part_cos, part_sin = pooled_rope(self.rope, first, frames, height, width, self.config.patch_size, patch)
                embedding = self.far_patch_embedding
            else:
                part_cos, part_sin = self._rope(first, frames, height, width)
                embedding = self.patch_embedding
            tokens.append(embedding(latents).flatten(2).transpose(1, 2))
            cos.append(part_cos)
            sin.append(part_sin)
            offset += tokens[-1].shape[1]
        if len(tokens) == 1:
            return tokens[0].contiguous(), segments, (cos[0], sin[0])
        return torch.cat(tokens, dim=1), segments, (torch.cat(cos, dim=1), torch.cat(sin, dim=1))

    def _chunks_at(self, first: int, frames: int) -> list[tuple[int, tuple[int, int]]]:
        """(absolute chunk index, (start, end)) of the chunks of frames [first, first + frames)."""
        found = [(i, b) for i, b in enumerate(self.chunk_bounds(first + frames)) if b[0] >= first]
        if frames < 1 or not found or found[0][1][0] != first:
            raise ValueError(f"latent frames [{first}, {first + frames}) do not start on a chunk boundary of "
                             f"causal_chunks={self.config.causal_chunks}")
        return found

    def _rope(self, first: int, frames: int, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Wan's RoPE at absolute latent frames [first, first + frames): (cos, sin), each (1, S, 1, d)."""
        p_t, p_h, p_w = self.config.patch_size
        if (first + frames) // p_t > self.config.rope_max_seq_len:
            raise ValueError(f"latent frame {first + frames} is past the RoPE table "
                             f"(rope_max_seq_len={self.config.rope_max_seq_len} patch frames)")
        cos, sin = self.rope(torch.empty(1, 1, first + frames, height, width, device="meta"))
        skip = first // p_t * (height // p_h) * (width // p_w)
        return cos[:, skip:], sin[:, skip:]

    def _time(self, segments: list[Segment], timestep, timestep_r, batch: int, dtype: torch.dtype,
              device: torch.device):
        """(temb, timestep_proj): (B, D) and (B, 6, D) when every token shares one (T, R), else per token
        (B, S, D) and (B, S, 6, D) (noisy chunks their own (T, R), clean ones T = R = 0)."""
        noisy = sum(not s.clean for s in segments)
        rows, width = [], 0
        if noisy:
            T = _per_chunk(timestep, batch, noisy, "timestep")
            R = T if timestep_r is None else _per_chunk(timestep_r, batch, noisy, "timestep_r")
            width = max(T.shape[1], R.shape[1])  # 1: one (T, R) for every noisy chunk
            T, R = T.expand(batch, width), R.expand(batch, width)
            rows.append(self.time_embedding(T.flatten(), R.flatten(), dtype).unflatten(0, (batch, width)))
        if noisy < len(segments):
            zero = torch.zeros(batch, device=device)
            rows.append(self.time_embedding(zero, zero, dtype).unsqueeze(1))  # row ``width``: T = R = 0
        table = torch.cat(rows, dim=1) if len(rows) > 1 else rows[0]  # (B, rows, D)
        index, noisy_seen = [], 0
        for s in segments:
            index.append(width if s.clean else min(noisy_seen, width - 1))
            noisy_seen += not s.clean
        embedder = self.condition_embedder
        if len(set(index)) == 1:
            temb = table[:, index[0]]
            return temb, embedder.time_proj(embedder.act_fn(temb)).unflatten(1, (6, -1))
        token_rows = torch.cat([torch.full((s.end - s.start,), row, dtype=torch.long)
                                for s, row in zip(segments, index)]).to(table.device)
        proj = embedder.time_proj(embedder.act_fn(table)).unflatten(2, (6, -1))  # (B, rows, 6, D)
        return table[:, token_rows], proj[:, token_rows]

    def _unpatchify(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, N, p_t p_h p_w C) -> (B, C, F, H, W)."""
        batch, _, frames, height, width = shape
        p_t, p_h, p_w = self.config.patch_size
        out = tokens.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def _per_chunk(t: torch.Tensor, batch: int, chunks: int, name: str) -> torch.Tensor:
    """A (B,) or (B, chunks) time as (B, 1) or (B, chunks) fp32."""
    t = torch.as_tensor(t)
    if t.ndim == 1 and t.shape[0] == batch:
        return t.float()[:, None]
    if t.ndim == 2 and t.shape == (batch, chunks):
        return t.float()
    raise ValueError(f"{name} of shape {tuple(t.shape)}: expected ({batch},) or ({batch}, {chunks}), one time "
                     f"per chunk of hidden_states")


def chunk_bounds(chunks: list[int], frames: int) -> list[tuple[int, int]]:
    """[start, end) of each chunk of a ``frames``-frame video: ``chunks`` first, then chunks of the last
    size (streaming), the last one cut at ``frames``."""
    bounds, start = [], 0
    while start < frames:
        size = chunks[len(bounds)] if len(bounds) < len(chunks) else chunks[-1]
        bounds.append((start, min(start + size, frames)))
        start = bounds[-1][1]
    return bounds


def is_causal(model: torch.nn.Module) -> bool:
    """Whether ``model`` (possibly behind peft / DeepSpeed / DDP wrappers) is a causal flow map."""
    return bool(getattr(unwrap_model(model), "is_causal", False))


__all__ = ["WanCausalFlowMapTransformer3DModel", "KVCache", "chunk_bounds", "is_causal"]
