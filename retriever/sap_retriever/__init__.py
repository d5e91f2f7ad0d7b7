"""sap's retrieval service: corpus store, index building, and the Search-R1-compatible server.

Imports only ``sap.rules`` from sap; heavy libraries are imported where they are used.
"""
