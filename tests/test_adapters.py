"""Downstream adaptation (Chen et al. Sec. 3.2): controls.npy, ControlNet and T2I-Adapter on a frozen pre-trained
model, sampling from control images and their edge F1."""
import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

import evaluate
import model
import plumbing
import sample
import train
from ext import adapters
from helpers import finish, run_cli

cv2 = pytest.importorskip("cv2")  # requirements-canny.txt, in the dev requirements

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "8", "--warmup", "1", "--lr", "1e-3", "--grid-steps", "1", "--log-every", "1"]


@pytest.fixture(scope="module")
def base(shapes16, tmp_path_factory):
    """A copy of the 16x16 shapes with Canny controls in both splits, and a tiny base run pre-trained at eta 0.1."""
    root = tmp_path_factory.mktemp("adapters")
    data = str(root / "shapes")
    shutil.copytree(shapes16, data)
    for split in ("train", "test"):
        adapters.main(["controls", "--control", "canny", "--src", f"{data}/{split}"])
    run = str(root / "base")
    train.main(["--data", f"{data}/train", "--preset", "tiny", *TINY, "--steps", "2", "--eta", "0.1", "--out", run])
    return data, run


def randomised(net):
    """Every weight of the base drawn N(0, 0.2^2): a fresh UNet's zero output layer would hide any difference."""
    with torch.no_grad():
        for k, p in net.named_parameters():
            if not k.startswith("adapter."):
                p.normal_(0, 0.2)
    if isinstance(net.adapter, (adapters.ControlNet, adapters.DiTControlNet)):
        net.adapter.reset(net.backbone)
    return net


@pytest.mark.parametrize("preset,kind", [("tiny", "controlnet"), ("tiny", "t2i"), ("dit-tiny", "controlnet")])
def test_a_fresh_adapter_leaves_the_base_model_unchanged(preset, kind):
    torch.manual_seed(0)
    net = randomised(adapters.AdapterDenoiser(kind, 1, num_classes=10, resolution=16, channels=3, preset=preset))
    plain = model.Denoiser(10, 16, 3, preset)
    plain.load_state_dict({k: v for k, v in net.state_dict().items() if not k.startswith("adapter.")})
    x, t, c, hint = torch.randn(2, 3, 16, 16), torch.tensor([10, 700]), torch.tensor([1, 10]), torch.rand(2, 1, 16, 16)
    assert torch.equal(net(x, t, c, hint=hint), plain(x, t, c))  # zero-initialised: exactly the base
    with torch.no_grad():
        for p in net.adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert (net(x, t, c, hint=hint) - plain(x, t, c)).abs().max() > 1e-3  # and it does act once trained
    net.train()  # training mode reaches the adapter only: the frozen base keeps its dropout off
    assert net.adapter.training and not net.backbone.training and not any(m.training for m in net.backbone.modules())


def test_controls_are_opencvs_canny_edges_or_a_given_array(base, tmp_path):
    data, _ = base
    images, controls = np.load(f"{data}/train/images.npy"), np.load(f"{data}/train/controls.npy")
    assert controls.shape == (200, 16, 16, 1) and controls.dtype == np.uint8
    assert all(np.array_equal(controls[i, ..., 0], cv2.Canny(images[i], 100, 200)) for i in range(0, 200, 20))
    assert json.load(open(f"{data}/train/meta.json"))["control"] == dict(kind="canny", low=100, high=200, channels=1)
    folder = str(tmp_path / "test")
    shutil.copytree(f"{data}/test", folder)
    np.save(tmp_path / "masks.npy", np.zeros((24, 16, 16), np.uint8))  # e.g. SAM masks: [N, H, W] is taken as C = 1
    adapters.main(["controls", "--control", str(tmp_path / "masks.npy"), "--src", folder])
    assert json.load(open(f"{folder}/meta.json"))["control"]["kind"] == "file"
    np.save(tmp_path / "bad.npy", np.zeros((24, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"want uint8 \[24, 16, 16\(, C\)\]"):
        adapters.main(["controls", "--control", str(tmp_path / "bad.npy"), "--src", folder])
    assert np.load(f"{folder}/controls.npy").shape == (24, 16, 16, 1)  # the earlier file is left as it was


@pytest.mark.slow
def test_adapter_trains_only_itself_and_resumes_after_a_kill_bit_identically(base, tmp_path):
    data, run = base
    args = ["--data", f"{data}/train", "--init-from", run, "--adapter", "controlnet", *TINY, "--steps", "4",
            "--ckpt-every", "2"]
    adapters.main(["train", *args, "--out", str(tmp_path / "ref")])
    ref, start = plumbing.load_checkpoint(str(tmp_path / "ref"), ext=True), plumbing.load_checkpoint(run)
    assert ref["model"] and all(k.startswith("adapter.") for k in ref["model"])  # the adapter only ...
    named = ref["config"]["base"]
    assert named["sha256"] == plumbing.weights_hash(start["ema"]) and named["eta"] == 0.1
    merged = adapters.load_run(str(tmp_path / "ref"))  # ... and the base, frozen: bit-identical after training
    assert all(torch.equal(merged["model"][k], v) and torch.equal(merged["ema"][k], v) for k, v in start["ema"].items())
    assert ref["model"]["adapter.zero.0.weight"].abs().max() > 0  # the zero convolutions did learn
    out = str(tmp_path / "killed")
    fresh = [sys.executable, "-m", "ext.adapters", "train", *args, "--out", out]
    assert not finish(fresh, None, out, kill_at=3)  # SIGKILL after the step-2 checkpoint
    assert finish(None, [sys.executable, "-m", "ext.adapters", "train", "--resume", out], out)
    got = plumbing.load_checkpoint(out, ext=True)
    assert got["step"] == 4 and all(torch.equal(ref[w][k], got[w][k]) for w in ("model", "ema") for k in ref[w])


def test_adapter_samples_from_controls_and_report_names_the_base_corruption(base, tmp_path):
    data, run = base
    for kind in ("t2i", "controlnet"):
        adapters.main(["train", "--data", f"{data}/train", "--init-from", run, "--adapter", kind, *TINY, "--steps",
                       "1", "--out", str(tmp_path / kind)])
        adapters.main(["sample", "--ckpt", str(tmp_path / kind), "--controls", f"{data}/test", "--num", "30",
                       "--steps", "3", "--cfg-scale", "2"])
    z = np.load(tmp_path / "controlnet" / "samples.npz")
    rows = np.arange(30) % 24  # index-matched with the test split: its controls and its labels
    assert np.array_equal(z["control_rows"], rows)
    assert np.array_equal(z["arr_1"], np.load(f"{data}/test/labels.npy")[rows])
    out = evaluate.main(["control", "--samples", str(tmp_path / "controlnet" / "samples.npz")])
    assert 0 <= out["edge_f1"] <= 1 and out["canny"] == [100, 200]
    report = evaluate.main(["report", str(tmp_path / "controlnet"), "--out", str(tmp_path / "report")])
    assert report[0]["adapter"] == "controlnet" and report[0]["eta"] == 0.1 and report[0]["edge_f1"] == out["edge_f1"]


def test_edge_f1_by_hand():
    edges = np.zeros((1, 8, 8), bool)
    edges[0, 2, 1:7] = True  # a horizontal line of 6 pixels
    shifted = np.roll(edges, 1, axis=1)
    assert adapters.edge_f1(edges, edges, 0) == (1.0, 1.0, 1.0)
    assert adapters.edge_f1(shifted, edges, 1) == (1.0, 1.0, 1.0)  # one pixel off: within the tolerance
    assert adapters.edge_f1(shifted, edges, 0) == (0.0, 0.0, 0.0)
    half = edges.copy()
    half[0, 2, 4:7] = False  # 3 of the 6 pixels: precision 1, recall 1/2 (with tolerance 1, 4 of 6 are near one)
    assert adapters.edge_f1(half, edges, 0) == pytest.approx((1.0, 0.5, 2 / 3))


def test_adapter_errors_are_one_line(base, tmp_path):
    data, run = base
    run_script = run_cli
    plain = str(tmp_path / "plain")  # a dataset without controls.npy
    shutil.copytree(f"{data}/test", plain)
    os.remove(f"{plain}/controls.npy")
    r = run_script("ext.adapters", "train", "--data", plain, "--init-from", run, "--adapter", "t2i", *TINY, "--steps",
                   "1", "--out", tmp_path / "x")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "has no controls.npy" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="--adapter trains on top of a pre-trained model"):
        adapters.main(["train", "--data", f"{data}/train", "--adapter", "t2i", "--out", str(tmp_path / "y")])
    adapter = str(tmp_path / "t2i")
    adapters.main(["train", "--data", f"{data}/train", "--init-from", run, "--adapter", "t2i", *TINY, "--steps", "1",
                   "--out", adapter])
    big = str(tmp_path / "big")  # controls of another size
    shutil.copytree(f"{data}/test", big)
    np.save(f"{big}/controls.npy", np.zeros((24, 32, 32, 1), np.uint8))
    with pytest.raises(ValueError, match=r"want uint8 \[24, 16, 16, 1\]"):
        adapters.main(["sample", "--ckpt", adapter, "--controls", big, "--num", "2", "--out", str(tmp_path / "a.npz")])
    with pytest.raises(ValueError, match="goes with a model with an adapter"):
        adapters.main(["sample", "--ckpt", run, "--controls", f"{data}/test", "--num", "2", "--out",
                       str(tmp_path / "b.npz")])
    with pytest.raises(ValueError, match="is a run of ext/adapters.py: .* python -m ext.adapters"):  # it needs its controls
        sample.main(["--ckpt", adapter, "--num", "2", "--out", str(tmp_path / "c.npz")])
    other = str(tmp_path / "base2")  # the base run replaced by another one: the adapter refuses it
    shutil.copytree(run, other)
    cfg = plumbing.load_checkpoint(adapter, ext=True)
    cfg["config"]["base"]["path"] = os.path.join(other, "ckpt.pt")
    torch.save(cfg, os.path.join(adapter, "ckpt.pt"))
    state = plumbing.load_checkpoint(other)
    state["ema"] = {k: v + 1 for k, v in state["ema"].items()}
    torch.save(state, os.path.join(other, "ckpt.pt"))
    r = run_script("ext.adapters", "sample", "--ckpt", adapter, "--controls", f"{data}/test", "--num", "2", "--out",
                   tmp_path / "d.npz")
    assert r.returncode == 1 and "is not the one this adapter was trained on" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "d.npz").exists()
