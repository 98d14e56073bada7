"""Semantic cache: answers a request whose meaning matches a cached one, guarded against look-alike prompts."""
