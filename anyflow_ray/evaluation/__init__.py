"""Evaluation: sample quality against the teacher and the data, prompt adherence, video features, plots."""
