"""Ray learner group and DeepSpeed learner worker."""
