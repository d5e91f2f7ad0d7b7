"""The rules every stage shares (no heavy imports): config, tag grammar, prompts, scoring,
run directory and atomic IO."""
