"""HTTP API surfaces: Anthropic Messages, OpenAI, admin."""
