"""`tierkv serve`: an OpenAI-compatible HTTP server over the engine core (entry point: `engine.server.cli:main`)."""
