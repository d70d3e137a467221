"""Data: prompt formatting and tokenisation (`prompts`)."""
