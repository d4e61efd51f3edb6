"""OpenAI's Conversations API: stored conversations whose items responses read and extend."""
