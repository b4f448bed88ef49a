"""Tiny models, word-level tokenizers and the planted-facts demo corpus (built locally, no downloads)."""
