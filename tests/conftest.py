"""Shared fixtures: tiny real model packages built without torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory) -> Path:
    """A model repository holding one numpy-trained MLP package for 8x8 digits."""
    from dcs.robustness.testing import digits_package

    repo = tmp_path_factory.mktemp("repo")
    digits_package(repo, name="digits-mlp", version=1)
    return repo


@pytest.fixture(scope="session")
def digits_test():
    """The 500 held-out 8x8 digits as (x float32 [N,1,8,8] in [0,1], y int64)."""
    from dcs.robustness.testing import load_digits_nchw

    _, _, x, y = load_digits_nchw()
    return x, y


def write_token_file(tmp_path_factory, token: str) -> Path:
    """A file holding ``token`` (what ``--audit-token-file`` reads), in a fresh temp folder."""
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(token + "\n")
    return path
