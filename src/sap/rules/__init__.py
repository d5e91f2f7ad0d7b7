"""The rules every stage shares (no heavy imports): config, tag grammar, prompts, scoring,
question files, run directory and atomic IO."""
