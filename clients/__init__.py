"""Python client library and ``dcsctl`` CLI for the defended-classifier service (torch-free)."""
