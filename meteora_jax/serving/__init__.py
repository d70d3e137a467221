"""Serving the fused model: continuous batching and an OpenAI-compatible HTTP API."""
