"""ml_collections configs (the trainer's configs arrive with the trainer)."""
