"""kvfuse: a KV-cache service and RAG cache layer for LLM inference."""
