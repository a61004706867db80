"""Models: the two-time Wan flow map, architectures, loading and text encoding."""

from anyflow_ray.models.flowmap import WanFlowMapTransformer3DModel, call_model

__all__ = ["WanFlowMapTransformer3DModel", "call_model"]
