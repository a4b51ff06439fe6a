"""Throughput of the three heavy stages on the GPU at hand, each against eager fp32 measured in the same run.

    python bench.py [--presets cifar in64] [--train-steps 200] [--sample-batch 1000] [--feature-images 10000]

Training: train.py --bench (bf16 + torch.compile vs --no-bf16 --no-compile) on random images of the preset's size,
and the fast path again under DDP at world size 1 (its overhead over the plain run).
Sampling: DDIM 50 steps with classifier-free guidance (scale 1.5) of a randomly initialised model.
FID features: our Inception on random uint8 32x32 images, batch 500 on the GPU vs batch 50 converted on the host.
Random weights cost the same FLOPs as trained ones; nothing here is a quality figure.
"""
import argparse
import datetime
import json
import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch

import evaluate
import sample
import train
from model import Denoiser, Diffusion

RES = {"tiny": 32, "cifar": 32, "in64": 64}


def fake_dataset(root, res, num_classes, n=4096):
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(os.path.join(root, "images.npy"), rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8))
    np.save(os.path.join(root, "labels.npy"), rng.integers(0, num_classes, n))
    json.dump(dict(num_classes=num_classes, class_names=[str(i) for i in range(num_classes)], resolution=res,
                   channels=3, count=n, source="bench", source_checksum="", skipped=[]),
              open(os.path.join(root, "meta.json"), "w"))
    return root


def timed(fn, warmup=1, reps=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def bench_train(preset, steps, batch, tmp):
    classes = 1000 if preset == "in64" else 10
    data = fake_dataset(os.path.join(tmp, preset), RES[preset], classes)
    common = ["--data", data, "--preset", preset, "--batch-size", str(batch), "--bench", str(steps)]
    fast = train.main(common)
    slow = train.main(common + ["--no-compile", "--no-bf16"])
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT="29533")
    os.environ.update(env)  # what torchrun --nproc_per_node=1 would set: train.py takes its DDP path
    try:
        ddp = train.main(common)
    finally:
        for k in env:
            del os.environ[k]
    return fast, slow, ddp


def bench_sample(preset, batch):
    classes = 1000 if preset == "in64" else 10
    net = Denoiser(classes, RES[preset], 3, preset).cuda().eval().requires_grad_(False)
    diffusion = Diffusion().to("cuda")
    idx = np.arange(batch)
    y = idx % classes
    out = {}
    for name, fwd, bf16 in [("fast", torch.compile(net), True), ("eager fp32", net, False)]:
        args = SimpleNamespace(cfg_scale=1.5, sampler="ddim", steps=50, ddim_eta=0.0)
        dt = timed(lambda: sample.generate(fwd, diffusion, idx, y, 0, (3, RES[preset], RES[preset]), args,
                                           torch.device("cuda"), bf16), warmup=1, reps=2)
        out[name] = batch / dt
    return out


def bench_features(n):
    net = evaluate.FIDInception().cuda().eval().requires_grad_(False)
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fast = n / timed(lambda: evaluate.inception_features(net, images, batch=500), warmup=1, reps=1)

    def host_converted(batch=50):  # how a per-image loader would feed it: float on the host, small batches
        with evaluate.no_tf32(), torch.no_grad():
            for i in range(0, n, batch):
                x = torch.from_numpy(images[i:i + batch]).float().cuda()
                net(x)
    slow = n / timed(host_converted, warmup=0, reps=1)
    return fast, slow


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cifar", "in64"], choices=list(RES))
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=1000)
    p.add_argument("--feature-images", type=int, default=10000)
    a = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench.py: error: needs a CUDA GPU (train.py --bench N measures a CPU run)")
    lines = [f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {datetime.date.today()}"]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            fast, slow, ddp = bench_train(preset, a.train_steps, a.train_batch, tmp)
            mfu = f"{fast['mfu']:.1%}" if fast["mfu"] else "n/a"
            lines.append(f"train {preset} batch {a.train_batch}: {fast['images_per_s']:.0f} images/s, "
                         f"{fast['step_ms']:.1f} ms/step, {fast['peak_mem_gib']:.1f} GiB, MFU {mfu} | eager fp32 "
                         f"{slow['images_per_s']:.0f} images/s | x{fast['images_per_s'] / slow['images_per_s']:.2f} | "
                         f"DDP world 1: {ddp['images_per_s']:.0f} images/s, overhead "
                         f"{1 - ddp['images_per_s'] / fast['images_per_s']:.1%}")
            s = bench_sample(preset, a.sample_batch)
            lines.append(f"sample {preset} DDIM 50 steps, cfg 1.5, batch {a.sample_batch}: {s['fast']:.0f} images/s "
                         f"(50k in {50000 / s['fast'] / 60:.1f} min) | eager fp32 {s['eager fp32']:.0f} images/s | "
                         f"x{s['fast'] / s['eager fp32']:.2f}")
    fast, slow = bench_features(a.feature_images)
    lines.append(f"FID features 32x32, batch 500: {fast:.0f} images/s (50k in {50000 / fast:.0f} s) | batch 50 "
                 f"host-converted {slow:.0f} images/s | x{fast / slow:.2f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
