import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare_data  # noqa: E402


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small shapes dataset (200 train / 50 test images) built by the project itself."""
    root = tmp_path_factory.mktemp("data")
    prepare_data.prepare_shapes(str(root), 200, 50)
    return os.path.join(str(root), "shapes")
