"""The agent layer: the multi-turn search loop, generation engines and the retriever client."""
