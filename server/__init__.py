"""The FastAPI steering server (OpenAI-compatible)."""
