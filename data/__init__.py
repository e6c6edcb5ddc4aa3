"""Datasets as numpy arrays (torch-free): ``load_dataset(name, ...) -> Dataset``.

Names: ``fmnist``, ``mnist5k``, ``digits``, ``npz:<path>``, ``folder:<path>``,
``lisa:<path>`` / ``lisa<N>:<path>`` (top-N classes, default 18). See ``registry``.
"""
from dcs.data.base import DataError, Dataset
from dcs.data.registry import DATASET_KINDS, load_dataset

__all__ = ["DATASET_KINDS", "DataError", "Dataset", "load_dataset"]
