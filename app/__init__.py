"""vllm-ray-stack: vLLM engines on Ray Serve behind one OpenAI-compatible URL."""

__version__ = "0.1.0"
