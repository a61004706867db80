import pytest
import torch

from learners.distill import TrajectoryError, validate_trajectory

SHAPE = (3, 8, 16, 16)


def _payload(**changes):
    payload = {"prompt_idx": torch.tensor([0, 5]), "num_steps": 4, "k": 1, "z_k": torch.zeros(2, *SHAPE),
               "T_k": torch.full((2,), 900.0), "T_next": torch.full((2,), 700.0)}
    payload.update(changes)
    return payload


def test_a_good_trajectory_passes():
    validate_trajectory(_payload(), "generator", SHAPE, num_prompts=10)


@pytest.mark.parametrize("changes, message", [
    ({"z_k": torch.full((2, *SHAPE), float("nan"))}, "NaN"),
    ({"z_k": torch.full((2, *SHAPE), float("inf"))}, "NaN/Inf"),
    ({"z_k": torch.zeros(2, 3, 8, 8, 8)}, "shape"),
    ({"prompt_idx": torch.tensor([0, 99])}, "prompt_idx"),
])
def test_bad_trajectories_are_rejected_with_the_reason(changes, message):
    with pytest.raises(TrajectoryError, match=message):
        validate_trajectory(_payload(**changes), "generator", SHAPE, num_prompts=10)


def test_critic_trajectory_needs_x_hat():
    with pytest.raises(TrajectoryError, match="x_hat"):
        validate_trajectory(_payload(), "critic", SHAPE, num_prompts=10)


def test_a_trajectory_carrying_its_prompt_embeddings_is_checked_by_them_not_by_index():
    """data.rank_shards: the actor's prompt indices mean nothing to a learner holding other shards."""
    context = torch.zeros(2, 12, 32)
    validate_trajectory(_payload(prompt_idx=torch.tensor([0, 99]), context=context), "generator", SHAPE,
                        num_prompts=10, embedding_shape=(12, 32))
    with pytest.raises(TrajectoryError, match="context has shape"):
        validate_trajectory(_payload(context=torch.zeros(2, 12, 16)), "generator", SHAPE, num_prompts=10,
                            embedding_shape=(12, 32))
    with pytest.raises(TrajectoryError, match="context holds NaN"):
        validate_trajectory(_payload(context=torch.full((2, 12, 32), float("nan"))), "generator", SHAPE,
                            num_prompts=10, embedding_shape=(12, 32))


def test_a_causal_students_generator_trajectory_must_carry_finite_context_chunks_of_the_clip():
    """docs/method.md §6: the learner re-runs every chunk on the actor's own earlier chunks."""
    chunks = torch.zeros(2, *SHAPE)
    validate_trajectory(_payload(context_chunks=chunks), "generator", SHAPE, num_prompts=10, causal=True)
    validate_trajectory({"prompt_idx": torch.tensor([0, 5]), "x_hat": chunks}, "critic", SHAPE, num_prompts=10,
                        causal=True)  # the critic trains on x_hat alone
    with pytest.raises(TrajectoryError, match="lacks \\['context_chunks'\\]"):
        validate_trajectory(_payload(), "generator", SHAPE, num_prompts=10, causal=True)
    with pytest.raises(TrajectoryError, match="context_chunks has shape"):
        validate_trajectory(_payload(context_chunks=torch.zeros(2, 3, 6, 16, 16)), "generator", SHAPE,
                            num_prompts=10, causal=True)
    with pytest.raises(TrajectoryError, match="context_chunks holds NaN"):
        validate_trajectory(_payload(context_chunks=torch.full((2, *SHAPE), float("nan"))), "generator", SHAPE,
                            num_prompts=10, causal=True)
    with pytest.raises(TrajectoryError, match="student is bidirectional"):
        validate_trajectory(_payload(context_chunks=chunks), "generator", SHAPE, num_prompts=10)
