"""Turning requests into prompt tokens: chat templates and the context-window check."""
