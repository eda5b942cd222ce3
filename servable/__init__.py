"""What a model the Trainer exports promises its servers: request format and warm-up records."""
