"""Offline training, export and evaluation of defended classifiers.

Importing ``training`` does not import torch; the subpackages that need it do.
"""
