"""Export a quantized run to the serving ecosystem.

`compressed.py` writes compressed-tensors `pack-quantized` (what vLLM serves) and reads it back with the
compressed-tensors package to check it; `vllm_rules.py` says which plans vLLM can serve and promotes the
others (`--envelope`).
"""
