"""Getting models into sap: importers (GGUF → Hugging Face checkpoint)."""
