"""Anthropic Messages: wire types, translation to chat, rendering, routes."""
