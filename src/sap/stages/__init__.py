"""The pipeline stages, each an importable function behind a thin ``sap`` command."""
