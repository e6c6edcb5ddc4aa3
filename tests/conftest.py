"""Shared fixtures: tiny real model packages built without torch."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory) -> Path:
    """A model repository holding one numpy-trained MLP package for 8x8 digits."""
    from robustness.testing import digits_package

    repo = tmp_path_factory.mktemp("repo")
    digits_package(repo, name="digits-mlp", version=1)
    return repo


def write_token_file(tmp_path_factory, token: str) -> Path:
    """A file holding ``token`` (what ``--audit-token-file`` reads), in a fresh temp folder."""
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(token + "\n")
    return path
