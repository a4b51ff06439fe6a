"""The latent path (prepare_data.py --dataset latents, train and sample on latents) with tiny diffusers autoencoders
built here: no download."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")  # requirements-latent.txt, installed by CI through requirements-dev.txt

import model  # noqa: E402
import plumbing  # noqa: E402
import prepare_data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from helpers import assert_moments_close  # noqa: E402
from tiny_vae import make_autoencoder  # noqa: E402
import diffusion  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--preset", "tiny", "--batch-size", "16", "--warmup", "1", "--lr", "1e-3", "--grid-steps", "1", "--log-every",
       "2", "--eta", "0.1", "--cep", "uniform"]


@pytest.fixture(scope="session")
def latents(shapes16, tmp_path_factory):
    """{kind: (latent dataset folder, autoencoder folder)} of the 16x16 shapes: 8x8x4 (KL) and 8x8x3 (VQ)."""
    root, out = tmp_path_factory.mktemp("latent"), {}
    for kind in ("kl", "vq"):
        make_autoencoder(kind, str(root / f"ae-{kind}"))
        prepare_data.prepare_latents(f"{shapes16}/train", str(root), f"shapes-{kind}", "train", str(root / f"ae-{kind}"),
                                     scale=None if kind == "kl" else 1.0, batch=48, shard_size=64)
        out[kind] = str(root / f"shapes-{kind}/train"), str(root / f"ae-{kind}")
    return out


def test_schedules_equal_diffusers():
    from diffusers import DDPMScheduler
    for ours, theirs in [("linear", dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
                         ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195))]:
        want = DDPMScheduler(num_train_timesteps=1000, **theirs).betas.double().numpy()
        np.testing.assert_allclose(diffusion.make_betas(ours, 1000), want, rtol=1e-6)  # theirs is float32


def test_ldm4_parameter_count():
    with torch.device("meta"):
        net = model.Denoiser(1000, 64, 3, "ldm4")
        old = model.Denoiser(1000, 64, 3, "ldm4", transformer=False, ff=True)  # the block before cin256-v2's
    n = sum(p.numel() for p in net.parameters())
    assert n == 400_920_579 + 512_512 and abs(n / 400e6 - 1) < 0.05, n  # Chen et al. Table 3 and LDM: "400M"
    assert sum(p.numel() for p in old.parameters()) == 385_602_691
    assert net.class_ctx == 512 and net.unet.down[-1].attn.heads == 1  # class through cross-attention, one head


def test_encoding_is_deterministic_and_stores_the_mirror(latents, shapes16, tmp_path):
    folder, ae_path = latents["kl"]
    z, meta = np.load(f"{folder}/latents.npy"), json.load(open(f"{folder}/meta.json"))
    assert z.shape == (200, 2, 2, 4, 8, 8) and z.dtype == np.float16
    assert meta["latent"]["kind"] == "kl" and meta["latent"]["scale"] == pytest.approx(0.18215)
    assert meta["count"] == 200 and meta["resolution"] == 8 and meta["latent"]["image_resolution"] == 16
    assert (np.load(f"{folder}/labels.npy") == np.load(f"{shapes16}/train/labels.npy")).all()
    ae, _ = model.load_autoencoder(ae_path)
    x = torch.from_numpy(np.load(f"{shapes16}/train/images.npy")[:5]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        d, mirror = ae.encode(x).latent_dist, ae.encode(x.flip(3)).latent_dist
    for k, v in enumerate((d.mean, d.std)):  # the posterior's mean and std, of the image and of its mirror
        np.testing.assert_allclose(z[:5, 0, k], v.numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(z[:5, 1, 0], mirror.mean.numpy(), atol=2e-3, rtol=2e-3)
    assert not np.allclose(z[:5, 1, 0], z[:5, 0, 0, ..., ::-1], atol=1e-2)  # not the flipped latent
    prepare_data.prepare_latents(f"{shapes16}/train", str(tmp_path), "again", "train", ae_path, batch=7, shard_size=50)
    assert open(f"{folder}/latents.npy", "rb").read() == open(tmp_path / "again/train/latents.npy", "rb").read()
    vq = np.load(f"{latents['vq'][0]}/latents.npy")
    assert vq.shape == (200, 2, 1, 3, 8, 8)


def test_kl_latent_draw_is_the_posterior_and_reproducible_from_seed_and_step(latents):
    cfg = train.resolve_config(train.parse_args(["--data", latents["kl"][0], *RUN]), 1)
    cpu = torch.device("cpu")
    data = train.load_data(cfg, cpu)
    net = model.Denoiser(**train.model_config(cfg, data, None)[0])
    a, b = train.draw_step(3, cfg, data, net, cpu), train.draw_step(3, cfg, data, net, cpu)
    assert a.eps.shape == (16, 4, 8, 8) and torch.equal(a.eps, b.eps) and torch.equal(a.flip, b.flip)
    halves = [train.draw_step(3, cfg, data, net, cpu, rank, 2).eps for rank in (0, 1)]
    assert torch.equal(torch.cat(halves), a.eps)
    seen = {}

    class Capture:
        def loss(self, net, x, *rest, **inputs):
            seen["x"] = x
            return x.flatten(1).mean(1)
    z = torch.from_numpy(np.load(f"{latents['kl'][0]}/latents.npy")[a.idx]).float()
    train.micro_loss(net, Capture(), torch.contiguous_format, 0.5, a, z.half())
    picked = z[torch.arange(16), a.flip.long()]  # the mirror's latents where the step flips
    torch.testing.assert_close(seen["x"], (picked[:, 0] + picked[:, 1] * a.eps) * 0.5)
    assert a.flip.any() and not a.flip.all()


@pytest.mark.slow
def test_latent_run_resumes_bit_identically_and_matches_two_processes(latents, tmp_path):
    # the kill itself is tested on pixels (test_faults.py); here: a latent run's resume draws the same posterior noise
    data, full, cut = latents["kl"][0], tmp_path / "full", str(tmp_path / "cut")
    train.main(["--data", data, *RUN, "--steps", "4", "--ckpt-every", "2", "--log-every", "1", "--out", str(full)])
    train.main(["--data", data, *RUN, "--steps", "2", "--ckpt-every", "2", "--log-every", "1", "--out", cut])
    train.main(["--resume", cut, "--steps", "4"])
    a, b = plumbing.load_checkpoint(str(full)), plumbing.load_checkpoint(cut)
    assert b["step"] == 4 and all(torch.equal(a[w][k], b[w][k]) for w in ("model", "ema") for k in a[w])
    assert a["config"]["data"]["latent"]["kind"] == "kl" and a["config"]["diffusion"]["clip"] is False
    assert os.path.exists(full / "grid-0000004.png")  # decoded by the autoencoder
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          f"{ROOT}/train.py", "--data", data, *RUN, "--steps", "4", "--ckpt-every", "4", "--batch-gpu",
                          "4", "--out", str(tmp_path / "two")], capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr[-2000:]
    c = plumbing.load_checkpoint(str(tmp_path / "two"))
    assert_moments_close(a, c)
    with pytest.raises(ValueError, match="--crop-scale does not apply to precomputed latents"):
        train.main(["--data", data, *RUN, "--steps", "1", "--crop-scale", "0.8", "--out", str(tmp_path / "crop")])


@pytest.mark.slow
def test_sampling_decodes_and_refuses_another_autoencoder(latents, tmp_path):
    data, ae = latents["vq"]
    run = tmp_path / "run"
    train.main(["--data", data, *RUN, "--steps", "2", "--ckpt-every", "2", "--out", str(run)])
    sample.main(["--ckpt", str(run), "--num", "4", "--steps", "2", "--cfg-scale", "2", "--out", str(tmp_path / "a.npz")])
    assert np.load(tmp_path / "a.npz")["arr_0"].shape == (4, 16, 16, 3)  # images, decoded
    r = subprocess.run([sys.executable, f"{ROOT}/sample.py", "--ckpt", str(run), "--num", "4", "--vae",
                        latents["kl"][1], "--out", str(tmp_path / "b.npz")], capture_output=True, text=True)
    assert r.returncode == 1 and "is not the one these latents were made with" in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "b.npz").exists()
    os.rename(ae, ae + "-moved")  # the same autoencoder elsewhere: --vae says where
    try:
        sample.main(["--ckpt", str(run), "--num", "4", "--steps", "2", "--cfg-scale", "2", "--vae", ae + "-moved",
                     "--out", str(tmp_path / "c.npz")])
    finally:
        os.rename(ae + "-moved", ae)
    assert np.array_equal(np.load(tmp_path / "c.npz")["arr_0"], np.load(tmp_path / "a.npz")["arr_0"])


def test_missing_diffusers_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # what an import of a missing package does
    with pytest.raises(ValueError, match="requirements-latent.txt") as e:
        model.load_autoencoder("anything")
    assert "\n" not in str(e.value)
