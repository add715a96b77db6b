"""The layer-by-layer machinery of the streaming executors (moebits.job.streaming, moebits.job.ray_streaming):
hidden states carried between decoder layers (forward.py) and the work of one layer in each pass (layer_pass.py)."""
