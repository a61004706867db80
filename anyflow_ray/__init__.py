"""anyflow-ray: any-step flow-map distillation of flow-matching video models."""
__version__ = "0.1.0"
