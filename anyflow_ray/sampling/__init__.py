"""Sampling: the schedule and the jump, the any-step samplers, and every rollout kind of Stage 2."""
