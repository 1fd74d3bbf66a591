"""Serving a trained run: an OpenAI-compatible HTTP API over a continuously batched engine,
and a chat page whose every answer, rating, regeneration and edit lands in SQLite."""
