"""Built-in providers: the local renderer and any OpenAI-compatible upstream."""
