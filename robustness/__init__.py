"""Torch-free robustness toolkit: the model-package loader, the oracle protocol and the attack engine.

Everything under this package imports without torch, so the server and the client can use it.
"""
