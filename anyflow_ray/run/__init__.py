"""The run's plumbing: config, storage, run records, pre-flight, memory plan, device, logger, weight-sync transport."""
