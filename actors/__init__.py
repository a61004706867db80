"""Ray rollout actors, trajectory buffer, weight registry (Stage 2)."""
