"""Boomerang's HTTP server: OpenAI-compatible and native endpoints over one model family."""
