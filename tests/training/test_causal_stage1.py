"""Stage 1 of the causal student (docs/method.md §6): teacher forcing, the chunk-layout draw and the
bidirectional auxiliary step, on a tiny causal flow map built in the test."""

import pytest
import torch

from anyflow_ray.training.losses import ChunkLayout, FlowMapLossConfig, draw_layout, flowmap_loss, flowmap_terms, sample_seeds
from anyflow_ray.models.architectures import tiny_transformer_config
from anyflow_ray.models.causal import WanCausalFlowMapTransformer3DModel
from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel
from anyflow_ray.sampling.schedule import Beta08Weight

CHUNKS = [1, 1, 2]  # 4 latent frames
SHAPE = (3, 4, 8, 8)  # (C, F, H, W)
BATCH = 4  # a multiple of 4: diagonal / r = 0 / r < t


@pytest.fixture(scope="module")
def models(tiny_cfg):
    """(the bidirectional flow map, the causal one built from it), weights nudged off initialisation."""
    torch.manual_seed(0)
    flow = WanFlowMapTransformer3DModel(**tiny_transformer_config(tiny_cfg.model.tiny, 3))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return flow, WanCausalFlowMapTransformer3DModel.from_base(flow, CHUNKS)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *SHAPE, generator=g), torch.randn(BATCH, 12, 32, generator=g), torch.zeros(1, 12, 32)


class Probe(torch.nn.Module):
    """The causal model behind hooks: ``edit_clean`` rewrites the teacher-forcing copy, ``edit_out`` the
    output; every call's keyword arguments and timesteps are recorded."""

    def __init__(self, model, edit_clean=None, edit_out=None):
        super().__init__()
        self.model, self.edit_clean, self.edit_out, self.calls = model, edit_clean, edit_out, []

    def forward(self, z, T, c, clean_states=None, **kwargs):
        self.calls.append({"T": T.detach().clone(), "clean": clean_states is not None, **kwargs})
        if clean_states is not None and self.edit_clean is not None:
            clean_states = self.edit_clean(clean_states)
        out = self.model(z, T, c, clean_states=clean_states, **kwargs)
        return (self.edit_out(out[0]),) if self.edit_out is not None else out


def _loss_and_grads(model, layout=ChunkLayout(tuple(CHUNKS)), grads=True, **probe):
    x0, c, u = _batch()
    idx = torch.arange(BATCH)
    model.zero_grad(set_to_none=True)
    with torch.set_grad_enabled(grads):
        loss, _ = flowmap_loss(Probe(model, **probe), x0, c, u, idx, BATCH, sample_seeds(0, 0, idx), Beta08Weight(),
                               FlowMapLossConfig(guidance=1.0), layout=layout)
    if not grads:
        return loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _edit_chunk(frames, by=3.0):
    def edit(x):
        x = x.clone()
        x[:, :, frames] += by
        return x
    return edit


def test_the_loss_ignores_clean_tokens_that_no_noisy_chunk_reads(models):
    """The last chunk's clean copy is read by no noisy chunk: rewriting it changes neither the loss nor any
    gradient (the loss reads noisy tokens' outputs only). Rewriting the first chunk's copy, which the later
    noisy chunks read, changes both."""
    _, causal = models
    loss, grads = _loss_and_grads(causal)
    last, last_grads = _loss_and_grads(causal, edit_clean=_edit_chunk(slice(2, 4)))
    first, first_grads = _loss_and_grads(causal, edit_clean=_edit_chunk(slice(0, 1)))
    assert torch.equal(loss, last)
    assert grads.keys() == last_grads.keys() and all(torch.equal(grads[n], last_grads[n]) for n in grads)
    assert not torch.allclose(loss, first)
    assert not all(torch.allclose(grads[n], first_grads[n]) for n in grads)


def test_gradients_reach_the_clean_copy_only_through_the_noisy_chunks_reading_it(models):
    """d loss / d clean copy: zero on the last chunk (no noisy chunk reads it, and the clean tokens' own
    outputs are not in the loss), non-zero on the chunks before it."""
    _, causal = models
    held = {}

    def track(x):  # the first call is the one with grad (the two finite-difference points follow)
        held.setdefault("clean", x.detach().requires_grad_(True))
        return held["clean"]

    x0, c, u = _batch()
    idx = torch.arange(BATCH)
    probe = Probe(causal, edit_clean=track)
    terms = flowmap_terms(probe, x0, c, u, idx, BATCH, sample_seeds(0, 0, idx), Beta08Weight(),
                          FlowMapLossConfig(guidance=1.0), layout=ChunkLayout(tuple(CHUNKS)))
    (grad,) = torch.autograd.grad(terms["per_sample"].sum(), held["clean"])
    per_frame = grad.abs().sum(dim=(0, 1, 3, 4))
    assert torch.all(per_frame[2:] == 0)
    assert torch.all(per_frame[:2] > 0)


def test_noised_chunks_share_the_samples_times_and_clean_context_is_outside_the_loss(models):
    """A long-context layout: the context chunk reaches the model at T = R = 0 beside the clean copy, the
    noised chunks at the sample's (T, R); whatever the model outputs on the context frames, the loss is
    the same (and it moves when a noised frame's output does)."""
    _, causal = models
    layout = ChunkLayout(tuple(CHUNKS), context=1)
    loss = _loss_and_grads(causal, layout=layout, grads=False)
    context_out = _loss_and_grads(causal, layout=layout, grads=False, edit_out=_edit_chunk(slice(0, 1)))
    noised_out = _loss_and_grads(causal, layout=layout, grads=False, edit_out=_edit_chunk(slice(1, 2)))
    assert torch.equal(loss, context_out) and not torch.allclose(loss, noised_out)

    probe = Probe(causal)
    x0, c, u = _batch()
    idx = torch.arange(BATCH)
    with torch.no_grad():
        terms = flowmap_terms(probe, x0, c, u, idx, BATCH, sample_seeds(0, 0, idx), Beta08Weight(),
                              FlowMapLossConfig(guidance=1.0), layout=layout)
    assert len(probe.calls) == 3 and all(call["clean"] for call in probe.calls)  # u and the two fd points
    T, R = probe.calls[0]["T"], probe.calls[0]["timestep_r"]
    assert T.shape == (BATCH, 3) and torch.all(T[:, 0] == 0) and torch.all(R[:, 0] == 0)
    assert torch.equal(T[:, 1:], terms["T"][:, None].expand(-1, 2))
    assert torch.equal(R[:, 1:], terms["R"][:, None].expand(-1, 2))
    plus = probe.calls[1]["T"]  # the total derivative moves the noised chunks' times only
    assert torch.all(plus[:, 0] == 0) and torch.allclose(plus[:, 1:], T[:, 1:] + 5.0)


def test_the_layout_draw_is_the_references():
    """Seeded by (seed, step) only; without noisy_chunks the whole clip, all noised; else noisy_chunks
    chunks from the start, or (long context) a longer prefix whose last noisy_chunks chunks are noised."""
    chunks = [1, 3, 3, 3, 3, 3, 3, 2]
    assert draw_layout(chunks) == ChunkLayout(tuple(chunks), 0)
    assert {draw_layout(chunks, 3, 0.0, 0, s) for s in range(20)} == {ChunkLayout((1, 3, 3), 0)}
    drawn = [draw_layout(chunks, 3, 1.0, 0, s) for s in range(200)]
    assert drawn == [draw_layout(chunks, 3, 1.0, 0, s) for s in range(200)]
    assert {len(d.sizes) for d in drawn} == set(range(3, 9))
    assert all(d.sizes == tuple(chunks[:len(d.sizes)]) and d.context == len(d.sizes) - 3 for d in drawn)
    half = [len(draw_layout(chunks, 3, 0.5, 0, s).sizes) == 3 for s in range(400)]
    assert 0.5 < sum(half) / 400 < 0.7  # 0.5 + 0.5 / 6 of the steps train on the first 3 chunks only


def test_the_bidirectional_step_is_the_flow_map_with_full_attention(models):
    """``bidirectional=True`` makes the causal model the bidirectional flow map it was built from; the
    auxiliary loss is added to the teacher-forced one when drawn."""
    flow, causal = models
    x0, c, u = _batch()
    T = torch.linspace(100.0, 900.0, BATCH)
    with torch.no_grad():
        full = causal(x0, T, c, timestep_r=T, bidirectional=True, return_dict=False)[0]
        assert torch.allclose(full, flow(x0, T, c, timestep_r=T, return_dict=False)[0], atol=1e-5)
        assert not torch.allclose(full, causal(x0, T, c, timestep_r=T, return_dict=False)[0], atol=1e-3)

    idx = torch.arange(BATCH)
    seeds, cfg = sample_seeds(0, 0, idx), FlowMapLossConfig(guidance=3.0)
    probe = Probe(causal)
    with torch.no_grad():
        plain, metrics = flowmap_loss(probe, x0, c, u, idx, BATCH, seeds, Beta08Weight(), cfg,
                                      layout=ChunkLayout(tuple(CHUNKS)))
        both, aux_metrics = flowmap_loss(probe, x0, c, u, idx, BATCH, seeds, Beta08Weight(), cfg,
                                         layout=ChunkLayout(tuple(CHUNKS)), bidirectional=True)
    assert "bidirectional_loss" not in metrics and aux_metrics["bidirectional_loss"] > 0
    assert torch.allclose(both - plain, torch.tensor(aux_metrics["bidirectional_loss"]))
    bidirectional = [call for call in probe.calls if call.get("bidirectional")]
    assert len(bidirectional) == 2 and not any(call["clean"] for call in bidirectional)  # cond + uncond (g = 3)
    with torch.no_grad():  # its own draws: not the teacher-forced step's times
        assert bidirectional[0]["T"].shape == (BATCH,) and not torch.equal(bidirectional[0]["T"], probe.calls[0]["T"])


def test_with_the_compressed_context_the_old_chunk_is_read_through_its_own_patch_embedding(models):
    """FAR's compressed context (full_chunk_limit=2 over 3 chunks): the long-context layout's context chunk
    enters compressed; the loss reads it (its clean copy moves the loss) and trains far_patch_embedding."""
    flow, _ = models
    far = WanCausalFlowMapTransformer3DModel.from_base(flow, CHUNKS, full_chunk_limit=2)
    layout = ChunkLayout(tuple(CHUNKS), context=1)
    loss, grads = _loss_and_grads(far, layout=layout)
    assert torch.isfinite(loss) and grads["far_patch_embedding.weight"].abs().sum() > 0
    moved = _loss_and_grads(far, layout=layout, grads=False, edit_clean=_edit_chunk(slice(0, 1)))
    assert not torch.allclose(loss, moved)
    with pytest.raises(ValueError, match="compressed clean context"):  # a layout that noises the old chunk
        _loss_and_grads(far, layout=ChunkLayout(tuple(CHUNKS)), grads=False)
