"""Tiny diffusers autoencoders for the latent path, with no download.

make_autoencoder(kind, path): a randomly initialised AutoencoderKL or VQModel (2x downsampling), saved in diffusers'
format; the tests load it from there, as users load the SD VAE or LDM's VQ-f4.

As a script, a stand-in for the SD VAE that means something: an AutoencoderKL (4x downsampling, 4 latent channels)
trained for a few minutes on a dataset folder, on the CPU:

    python tests/tiny_vae.py --data data/shapes/train --out runs/tiny-vae --minutes 5

Reconstruction MSE plus a small KL term (weight 1e-6); no perceptual or adversarial loss, unlike the SD VAE.
"""
import argparse
import os
import sys
import time

import numpy as np
import torch


def make_autoencoder(kind, path, seed=0, blocks=(16, 32)):
    from diffusers import AutoencoderKL, VQModel
    torch.manual_seed(seed)
    common = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * len(blocks),
                  up_block_types=("UpDecoderBlock2D",) * len(blocks), block_out_channels=blocks, layers_per_block=1,
                  norm_num_groups=8)
    ae = AutoencoderKL(latent_channels=4, **common) if kind == "kl" else \
        VQModel(latent_channels=3, num_vq_embeddings=64, vq_embed_dim=3, **common)
    ae.save_pretrained(path)
    return ae


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args(argv)
    images = np.load(os.path.join(a.data, "images.npy"), mmap_mode="r")
    ae = make_autoencoder("kl", a.out, blocks=(32, 64, 64))
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    rng, t0, step = np.random.default_rng(0), time.time(), 0
    while time.time() - t0 < a.minutes * 60:
        x = torch.from_numpy(np.array(images[np.sort(rng.choice(len(images), a.batch, replace=False))]))
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        d = ae.encode(x).latent_dist
        recon = ae.decode(d.sample()).sample
        kl = 0.5 * (d.mean ** 2 + d.var - 1 - d.logvar).sum((1, 2, 3)).mean()
        loss = (recon - x).pow(2).mean() + 1e-6 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"step {step}: mse {(recon - x).pow(2).mean().item():.4f}, kl {kl.item():.1f}", flush=True)
    with torch.no_grad():  # the latents' std sets the scaling factor, as for the SD VAE (0.18215)
        x = torch.from_numpy(np.array(images[:256])).permute(0, 3, 1, 2).float() / 127.5 - 1
        z, mse = ae.encode(x).latent_dist.mean, (ae.decode(ae.encode(x).latent_dist.mean).sample - x).pow(2).mean()
    ae.register_to_config(scaling_factor=float(1 / z.std()))
    ae.save_pretrained(a.out)
    print(f"{step} steps in {time.time() - t0:.0f} s; reconstruction MSE {mse:.4f} on 256 images; scaling factor "
          f"{1 / z.std():.4f}; wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
