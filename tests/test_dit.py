"""The DiT backbone (Peebles & Xie 2023) behind the same Denoiser interface, with Berrada et al.'s conditioning."""
import os
import subprocess
import sys

import pytest
import torch

import model
import plumbing
import train
from ext import metadata
from helpers import assert_moments_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--preset", "dit-tiny", "--batch-size", "16", "--warmup", "1", "--lr", "1e-3", "--grid-steps", "1",
       "--log-every", "2", "--eta", "0.1", "--cep", "uniform"]


def test_parameter_counts_are_dits():
    """At 256x256 (32x32x4 latents), 1000 classes: DiT's counts (Table 1) less what DiT has and we do not: the
    position embedding it stores as a frozen parameter (ours is a buffer) and the learned-variance half of the
    output layer. With them, XL/2 is DiT's 675,129,632 exactly."""
    want = {"dit-s2": 33.0e6, "dit-b2": 130.5e6, "dit-l2": 458.1e6, "dit-xl2": 675.13e6}
    for preset, published in want.items():
        dim, patch = (model.PRESETS[preset]["dit"][k] for k in ("dim", "patch"))
        with torch.device("meta"):
            net = model.Denoiser(1000, 32, 4, preset)
        theirs = sum(p.numel() for p in net.parameters()) + 16 * 16 * dim + dim * patch * patch * 4 + patch * patch * 4
        assert abs(theirs / published - 1) < 2e-3, (preset, theirs)
        if preset == "dit-xl2":
            assert theirs == 675_129_632


def test_fresh_dit_blocks_are_the_identity_and_its_output_is_zero():
    torch.manual_seed(0)
    net = model.Denoiser(10, 16, 3, "dit-tiny")
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 2])
    h = torch.randn(2, 64, 128)
    c = torch.randn(2, 128)
    for block in net.dit.blocks:  # adaLN-Zero: every gate starts at zero
        assert torch.equal(block(h, c), h)
    assert torch.equal(net(x, t, y), torch.zeros_like(x))


def test_class_through_attention_keeps_the_class_out_of_adaln_and_still_conditions(shapes16, tmp_path):
    torch.manual_seed(0)
    net = model.Denoiser(10, 16, 3, "dit-tiny", class_ctx=64)
    seen = []
    net.dit.blocks[0].ada.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([300, 300])
    net(x, t, torch.tensor([1, 1]))
    net(x, t, torch.tensor([7, 7]))
    assert torch.equal(seen[0], seen[1])  # the adaLN input is the time embedding alone
    out = tmp_path / "attn"
    ckpt = train.main(["--data", f"{shapes16}/train", *RUN, "--class-ctx", "64", "--steps", "6", "--ckpt-every", "6",
                       "--out", str(out)]) or plumbing.load_checkpoint(str(out))
    trained = model.Denoiser(**ckpt["config"]["model"])
    trained.load_state_dict(ckpt["model"])
    with torch.no_grad():
        a, b = trained(x, t, torch.tensor([1, 1])), trained(x, t, torch.tensor([7, 7]))
    assert (a - b).abs().max() > 1e-4  # the label reaches the output through attention


@pytest.mark.slow
def test_dit_run_resumes_bit_identically_and_matches_two_processes(shapes16, tmp_path):
    data = f"{shapes16}/train"
    text = ["--cond", "text", "--control", "phased", "--max-len", "24", "--crop-scale", "0.8"]  # ext/metadata.py
    meta = lambda argv: metadata.main(["train", *argv])
    meta(["--data", data, *RUN, *text, "--steps", "4", "--ckpt-every", "2", "--out", str(tmp_path / "full")])
    meta(["--data", data, *RUN, *text, "--steps", "2", "--ckpt-every", "2", "--out", str(tmp_path / "cut")])
    meta(["--resume", str(tmp_path / "cut"), "--steps", "4"])
    load = lambda out: plumbing.load_checkpoint(str(out), ext=True)
    a, b = load(tmp_path / "full"), load(tmp_path / "cut")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert any(k.startswith("dit.blocks.0.kv_x") for k in a["model"])  # text tokens through cross-attention
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "ext.metadata", "train", "--data", data, *RUN, *text, "--steps", "4", "--ckpt-every",
                          "4", "--batch-gpu", "4", "--out", str(tmp_path / "two")], capture_output=True, text=True,
                         cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    c = load(tmp_path / "two")
    assert_moments_close(a, c)


def test_init_from_a_lower_resolution_dit(shapes16, shapes, tmp_path):
    low = train.main(["--data", f"{shapes16}/train", *RUN, "--steps", "2", "--ckpt-every", "2", "--out",
                      str(tmp_path / "r16")]) or plumbing.load_checkpoint(str(tmp_path / "r16"))
    train.main(["--data", f"{shapes}/train", *RUN, "--steps", "1", "--ckpt-every", "1", "--lr", "1e-30",
                "--init-from", str(tmp_path / "r16"), "--out", str(tmp_path / "r32")])
    high = plumbing.load_checkpoint(str(tmp_path / "r32"))
    assert high["config"]["model"]["resolution"] == 32 and high["config"]["diffusion"]["shift"] == 2.0
    assert all(torch.allclose(low["ema"][k], high["model"][k], atol=1e-6) for k in low["ema"])  # every weight
    net = model.Denoiser(**high["config"]["model"])
    assert torch.equal(net.dit.pos, model.sincos_2d(128, 16))  # positions for the 16x16 grid of patches


@pytest.mark.parametrize("flags,message", [
    (["--preset", "dit-tiny", "--channels", "64"], "a DiT preset takes neither"),
    (["--text-dim", "64"], "are for --cond text"),
])
def test_bad_combinations_are_one_line(shapes, tmp_path, flags, message):
    r = subprocess.run([sys.executable, f"{ROOT}/train.py", "--data", f"{shapes}/train", "--steps", "1",
                        "--out", str(tmp_path / "r"), *flags], capture_output=True, text=True)
    assert r.returncode == 1 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    with pytest.raises(ValueError, match="patch size 2 does not divide"):
        model.Denoiser(10, 15, 3, "dit-tiny")
