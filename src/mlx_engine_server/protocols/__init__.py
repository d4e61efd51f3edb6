"""The protocols on one pipeline: OpenAI chat and completions, Anthropic Messages, Responses."""
