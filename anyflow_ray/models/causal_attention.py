"""Block-causal self-attention on diffusers' Wan attention, and the KV cache (docs/method.md §6).

A call of the causal model lays its tokens out as *segments*: one chunk of latent frames each, either
noisy (the chunks being denoised) or clean (context at T = R = 0: the teacher-forcing copy, or the
model's own outputs being re-encoded into the cache). Who reads whom:

- a clean chunk reads the clean chunks up to and including itself;
- a noisy chunk reads itself, and each earlier chunk from its clean copy when the call has one
  (teacher forcing), else from its noisy tokens (the plain block-causal call);
- every token reads the whole KV cache (clean chunks of earlier calls).

Rather than a dense (S, S) mask (about 4 GB per layer for the 21-frame Wan at 480p with its clean
copy), the queries are cut into groups with the same visible keys and each group runs one unmasked
attention over its key ranges. That costs exactly the block-causal FLOPs, keeps flash/SDPA kernels
usable, and makes a one-chunk call the plain bidirectional attention, bit for bit.

``CausalWanAttnProcessor`` replaces ``WanAttnProcessor`` on each block's ``attn1``. Wan's block passes
its ``rotary_emb`` argument straight to ``attn1`` (and ``None`` to the cross-attention), so the model
hands each block a ``LayerPlan`` in that slot: RoPE, groups, the layer's cached K/V and where to put
the new clean K/V. Gradient checkpointing replays the same plan object, so a recomputed block sees the
cache as it was at call time.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

Range = tuple[int, int]


@dataclass(frozen=True)
class Segment:
    """One chunk of a call's token sequence: ``[start, end)`` in the call's tokens; ``chunk`` is absolute."""
    clean: bool
    chunk: int
    start: int
    end: int
    frames: int = 0  # latent frames of the chunk


@dataclass(frozen=True)
class QueryGroup:
    """Queries ``[start, end)`` of the call, reading ``keys`` (ranges over [cache tokens; call tokens])."""
    start: int
    end: int
    keys: tuple[Range, ...]


def _visible(query: Segment, key: Segment, clean_chunks: set[int]) -> bool:
    """The block-causal rule of the module docstring (teacher forcing as in docs/method.md §6)."""
    if query.clean:
        return key.clean and key.chunk <= query.chunk
    if key.clean:
        return key.chunk < query.chunk
    return key.chunk == query.chunk or (key.chunk < query.chunk and key.chunk not in clean_chunks)


def attention_groups(segments: list[Segment], cached_tokens: int) -> list[QueryGroup]:
    """Query groups of a call whose ``segments`` are in token order, after ``cached_tokens`` cached keys."""
    clean_chunks = {s.chunk for s in segments if s.clean}
    groups: list[QueryGroup] = []
    for query in segments:
        ranges: list[Range] = [(0, cached_tokens)] if cached_tokens else []
        for key in segments:
            if not _visible(query, key, clean_chunks):
                continue
            start, end = cached_tokens + key.start, cached_tokens + key.end
            if ranges and ranges[-1][1] == start:  # adjacent: one slice, no copy
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        keys = tuple(ranges)
        if groups and groups[-1].keys == keys and groups[-1].end == query.start:
            groups[-1] = QueryGroup(groups[-1].start, query.end, keys)
        else:
            groups.append(QueryGroup(query.start, query.end, keys))
    return groups


@dataclass
class LayerPlan:
    """What one block's self-attention needs for one call; passed in Wan's ``rotary_emb`` slot."""
    rotary: tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (1, S, 1, head_dim), the call's tokens
    groups: list[QueryGroup]
    cached: tuple[torch.Tensor, torch.Tensor] | None  # this layer's cached (K, V), (B, S_cache, H, D)
    store: Range | None = None  # call tokens whose K/V go into the cache (clean chunks being encoded)
    stored: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)  # set by the processor


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on interleaved pairs, the arithmetic of Wan's processor (so one chunk is bit-identical)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def _gather(tensor: torch.Tensor, ranges: tuple[Range, ...]) -> torch.Tensor:
    """Token ranges of (B, S, H, D) along S: a view for one range, a concatenation otherwise."""
    if len(ranges) == 1:
        return tensor[:, ranges[0][0]:ranges[0][1]]
    return torch.cat([tensor[:, start:end] for start, end in ranges], dim=1)


class CausalWanAttnProcessor(WanAttnProcessor):
    """Wan's self-attention processor with block-causal groups and a KV cache (a ``LayerPlan``).

    Given Wan's own ``(cos, sin)`` RoPE tuple it is ``WanAttnProcessor`` unchanged, so the block still
    works when called as a plain Wan block.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if not isinstance(rotary_emb, LayerPlan):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        plan = rotary_emb
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))  # (B, S, H, D)
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        query = _rotate(query, *plan.rotary)
        key = _rotate(key, *plan.rotary)
        if plan.store is not None:  # the cache never carries gradient (docs/method.md §6) ...
            start, end = plan.store
            plan.stored = (key[:, start:end].detach(), value[:, start:end].detach())
            if torch.is_grad_enabled():  # ... nor do the clean chunks encoded into it in this same call
                key = torch.cat([key[:, :start], plan.stored[0], key[:, end:]], dim=1)
                value = torch.cat([value[:, :start], plan.stored[1], value[:, end:]], dim=1)
        if plan.cached is not None:
            key = torch.cat([plan.cached[0].to(key.dtype), key], dim=1)
            value = torch.cat([plan.cached[1].to(value.dtype), value], dim=1)

        outputs = []
        for group in plan.groups:
            out = dispatch_attention_fn(query[:, group.start:group.end], _gather(key, group.keys),
                                        _gather(value, group.keys), attn_mask=None, dropout_p=0.0,
                                        is_causal=False, backend=self._attention_backend)
            outputs.append(out)
        hidden_states = (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)).flatten(2, 3)
        hidden_states = hidden_states.type_as(query)
        hidden_states = attn.to_out[0](hidden_states)
        return attn.to_out[1](hidden_states)


class KVCache:
    """Self-attention K/V of clean chunks, per layer, detached; made by ``model.new_cache()``.

    ``frames`` is the absolute latent-frame position of the next chunk and ``chunks`` its absolute chunk
    index: both keep counting when ``trim`` drops old chunks, so RoPE positions stay absolute.
    ``history``: the clean latents of the cached chunks, kept by a model with FAR's compressed context,
    which encodes its cache again from them (``reset``) as the compressed chunks move on.
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.chunk_tokens: list[int] = []  # tokens of each cached chunk, oldest first
        self.chunk_frames: list[int] = []  # latent frames of each cached chunk, oldest first
        self.frames = 0
        self.chunks = 0
        self.history: torch.Tensor | None = None  # (B, C, frames of the cached chunks, H, W)

    @property
    def tokens(self) -> int:
        return sum(self.chunk_tokens)

    def __len__(self) -> int:
        """Chunks held now (after any trim)."""
        return len(self.chunk_tokens)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None if self.keys[index] is None else (self.keys[index], self.values[index])

    def append(self, plans: list[LayerPlan], chunk_tokens: list[int], frames: int,
               chunk_frames: list[int] | None = None) -> None:
        """Add the K/V each layer's processor stored for ``chunk_tokens`` new chunks of ``frames`` frames
        (``chunk_frames`` each)."""
        for index, plan in enumerate(plans):
            key, value = plan.stored
            if self.keys[index] is None:
                self.keys[index], self.values[index] = key, value
            else:
                self.keys[index] = torch.cat([self.keys[index], key], dim=1)
                self.values[index] = torch.cat([self.values[index], value], dim=1)
        self.chunk_tokens += chunk_tokens
        self.chunk_frames += list(chunk_frames or [])
        self.frames += frames
        self.chunks += len(chunk_tokens)

    def reset(self) -> int:
        """Empty the K/V (not ``history``) to encode them again; returns the absolute first frame of
        ``history``, where the encoding starts (``frames`` and ``chunks`` step back to it)."""
        self.frames -= sum(self.chunk_frames)
        self.chunks -= len(self.chunk_tokens)
        self.keys = [None] * len(self.keys)
        self.values = [None] * len(self.values)
        self.chunk_tokens, self.chunk_frames = [], []
        return self.frames

    def trim(self, keep_chunks: int) -> None:
        """Keep only the newest ``keep_chunks`` chunks (the rolling window of streaming, §6; 0 empties it)."""
        if keep_chunks < 0:
            raise ValueError(f"keep_chunks must be >= 0, got {keep_chunks}")
        drop = len(self.chunk_tokens) - keep_chunks
        if drop <= 0:
            return
        tokens = sum(self.chunk_tokens[:drop])
        self.keys = [None if k is None else k[:, tokens:] for k in self.keys]
        self.values = [None if v is None else v[:, tokens:] for v in self.values]
        if self.history is not None:
            self.history = self.history[:, :, sum(self.chunk_frames[:drop]):]
        self.chunk_tokens, self.chunk_frames = self.chunk_tokens[drop:], self.chunk_frames[drop:]


__all__ = ["CausalWanAttnProcessor", "KVCache", "LayerPlan", "Segment", "attention_groups"]
