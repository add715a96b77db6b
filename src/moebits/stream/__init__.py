"""Quantizing models larger than memory, one decoder layer at a time (see pipeline.py)."""
from .decide import StreamDecision, decide_stream
from .pipeline import StreamingUnsupported, StreamPipeline
from .ray_pass import RayStreamPipeline, RayUnavailable

__all__ = ["StreamPipeline", "StreamingUnsupported", "StreamDecision", "decide_stream", "RayStreamPipeline",
           "RayUnavailable"]
