"""sap, the search-agent pipeline: SFT then RL for small LLMs that use a search engine."""

__version__ = "0.1.0"
