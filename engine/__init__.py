"""kvfuse: a KV-cache service and RAG cache layer for LLM inference. `engine` holds the model glue."""

__version__ = "0.1.0"
