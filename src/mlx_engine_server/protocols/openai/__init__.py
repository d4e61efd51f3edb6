"""OpenAI chat and text completions: wire types, limits, rendering, tokenize routes."""
