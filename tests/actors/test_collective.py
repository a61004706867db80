"""The torch.distributed weight-broadcast group (gloo), its packing and its layout checks."""

import threading

import pytest
import torch

from anyflow_ray.run.weight_sync import (WeightGroup, check_layout, empty_buffers, host_store, layout_of, pack, resolve_backend,
                               unpack_into)


def _mixed_state(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"b.lora_A": torch.randn(3, 4, generator=gen), "a.weight": torch.randn(5, generator=gen),
            "c.scale": torch.randn(2, 2, generator=gen).to(torch.bfloat16)}


def test_pack_and_unpack_round_trip_mixed_dtypes():
    src = _mixed_state(0)
    layout = layout_of(src)
    assert [name for name, _, _ in layout] == sorted(src)
    buffers = pack(src, layout, torch.device("cpu"))
    assert {b.dtype for b in buffers} == {torch.bfloat16, torch.float32} and len(buffers) == 2
    dst = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in _mixed_state(1).items()}
    unpack_into(dst, layout, buffers)
    for name, tensor in src.items():
        assert torch.equal(dst[name].data, tensor), name


def test_a_layout_the_receiver_cannot_take_is_refused_by_name():
    params = {k: torch.nn.Parameter(v) for k, v in _mixed_state(0).items()}
    layout = layout_of(params)
    check_layout(params, layout)
    with pytest.raises(KeyError, match="x.extra"):
        check_layout(params, [*layout, ("x.extra", (1,), "float32")])
    bad = [(n, (9, 9) if n == "a.weight" else s, d) for n, s, d in layout]
    with pytest.raises(ValueError, match="a.weight"):
        check_layout(params, bad)
    # another dtype is fine (a bf16 learner, fp32 actors): unpacking casts
    check_layout(params, [(n, s, "bfloat16") for n, s, _ in layout])
    buffers = pack({k: v.to(torch.bfloat16) for k, v in params.items()}, [(n, s, "bfloat16") for n, s, _ in layout],
                   torch.device("cpu"))
    unpack_into(params, [(n, s, "bfloat16") for n, s, _ in layout], buffers)
    assert params["a.weight"].dtype == torch.float32


def test_backend_resolution():
    assert resolve_backend("auto", torch.device("cpu")) == "gloo"
    assert resolve_backend("auto", torch.device("cuda")) == "nccl"
    with pytest.raises(ValueError, match="sync_backend=nccl"):
        resolve_backend("nccl", torch.device("cpu"))


def test_gloo_group_broadcasts_from_rank_0_to_every_member_and_reforms_by_epoch():
    """Three members (a root and two receivers) in threads; a second epoch on a new port works the same."""
    src = _mixed_state(0)
    layout = layout_of(src)
    for epoch in range(2):
        size = 3
        store = host_store("127.0.0.1", size, timeout_s=30)  # rank 0 hosts it on an OS-chosen port
        received, errors = {}, []

        def member(rank, port=store.port, epoch=epoch, store=store):
            try:
                group = WeightGroup("127.0.0.1", port, rank, size, epoch, "gloo", timeout_s=30,
                                    store=store if rank == 0 else None)
                buffers = pack(src, layout, torch.device("cpu")) if rank == 0 else empty_buffers(layout, torch.device("cpu"))
                group.broadcast(buffers)
                params = {k: torch.nn.Parameter(torch.zeros_like(v)) for k, v in src.items()}
                unpack_into(params, layout, buffers)
                received[rank] = params
            except Exception as err:  # surfaced below with its rank
                errors.append((rank, err))

        threads = [threading.Thread(target=member, args=(rank,)) for rank in range(size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        assert sorted(received) == [0, 1, 2]
        for rank in (1, 2):
            for name, tensor in src.items():
                assert torch.equal(received[rank][name].data, tensor), (epoch, rank, name)
