"""Other protocols served on the same pipeline: Anthropic Messages, OpenAI Responses."""
