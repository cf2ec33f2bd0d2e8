"""Serving fmoe's exports in real engines: vLLM through fmoe's plugin (plugins/vllm), run in vLLM's environment."""
