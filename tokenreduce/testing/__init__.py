"""Test helpers: tiny random-weight VLMs, a local tokenizer and processors (no network)."""
