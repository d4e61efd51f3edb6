"""OpenAI Responses: wire types, translation to chat, rendering, routes."""
