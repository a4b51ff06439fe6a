import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import prepare_data  # noqa: E402


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """A small shapes dataset (200 train / 24 test images) built by the project itself."""
    root = tmp_path_factory.mktemp("data")
    prepare_data.prepare_shapes(str(root), 200, 24)
    return os.path.join(str(root), "shapes")


@pytest.fixture(scope="session")
def shapes16(tmp_path_factory):
    """The same set drawn at 16x16: a quarter of the compute, for tests that train for many steps."""
    root = tmp_path_factory.mktemp("data16")
    prepare_data.prepare_shapes(str(root), 200, 24, res=16)
    return os.path.join(str(root), "shapes")


@pytest.fixture(scope="session")
def tiny_run(shapes, tmp_path_factory):
    """A tiny model trained for 4 steps: enough for sampling tests."""
    import train
    out = str(tmp_path_factory.mktemp("runs") / "tiny")
    train.main(["--data", f"{shapes}/train", "--out", out, "--preset", "tiny", "--batch-size", "8", "--steps", "4",
                "--warmup", "1", "--lr", "1e-3", "--ckpt-every", "4", "--grid-steps", "1"])
    return out


TEXT_RUN = ["--preset", "tiny", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--ckpt-every", "2",
            "--grid-steps", "1", "--cond", "text", "--max-len", "32"]


@pytest.fixture(scope="session")
def tiny_text_run(shapes, tmp_path_factory):
    """A tiny caption-conditioned model, trained for 2 steps."""
    import train
    out = str(tmp_path_factory.mktemp("runs") / "tiny-text")
    train.main(["--data", f"{shapes}/train", "--out", out, *TEXT_RUN])
    return out


@pytest.fixture(scope="session")
def tiny_meta_run(shapes, tmp_path_factory):
    """The same with control metadata (ext/metadata.py)."""
    from ext import metadata
    out = str(tmp_path_factory.mktemp("runs") / "tiny-meta")
    metadata.main(["train", "--data", f"{shapes}/train", "--out", out, *TEXT_RUN, "--control", "phased"])
    return out


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A randomly initialised FID Inception saved like the published weight file (no test needs the real one)."""
    import torch
    import evaluate
    torch.manual_seed(0)
    net = evaluate.FIDInception()
    for m in net.modules():  # He init keeps the signal alive through 94 layers; BatchNorm statistics non-trivial
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.05, 0.05)
            m.running_var.uniform_(0.8, 1.2)
    path = str(tmp_path_factory.mktemp("weights") / "random_inception.pth")
    torch.save(net.state_dict(), path)
    return path


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: kill -9, disk-full and hostile-input tests (part of CI)")
    config.addinivalue_line("markers", "slow: left out of the quick tier, -m 'not slow' (the full suite runs them)")
