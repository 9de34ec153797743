"""The coordinator: one HTTP endpoint (Anthropic + OpenAI APIs) in front of the mesh."""
