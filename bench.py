"""Throughput of the three heavy stages on the GPU at hand, each against eager fp32 measured in the same run.

    python bench.py [--presets cifar in64] [--train-steps 200] [--sample-batch 500] [--feature-images 10000]

Training: train.py --bench (bf16 + torch.compile vs --no-bf16 --no-compile) on random images of the preset's size,
the fast path with --channels-last, and the fast path under DDP at world size 1 (its overhead over the plain run).
Sampling: DDIM 50 steps with classifier-free guidance (scale 1.5) of a randomly initialised model.
FID features: our Inception on random uint8 32x32 images, batch 500 on the GPU vs batch 50 converted on the host.
Random weights cost the same FLOPs as trained ones; nothing here is a quality figure.
--device cpu runs every stage eagerly at toy sizes: a smoke test of this script, not a benchmark.
"""
import argparse
import datetime
import json
import os
import socket
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


def timed(fn, device, warmup=1, reps=3):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_once(argv, ddp=False):
    torch._dynamo.reset()  # each measurement compiles afresh, never near dynamo's recompile limit
    if not ddp:
        return train.main(argv)
    env = dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=free_port())
    os.environ.update(env)  # what torchrun --nproc_per_node=1 would set: train.py takes its DDP path
    try:
        return train.main(argv)
    finally:
        for k in env:
            del os.environ[k]


def bench_train(preset, steps, batch, tmp, device):
    classes = 1000 if preset == "in64" else 10
    data = fake_dataset(os.path.join(tmp, preset), RES[preset], classes)
    common = ["--data", data, "--preset", preset, "--batch-size", str(batch), "--bench", str(steps),
              "--device", device.type]
    return dict(fast=train_once(common), eager=train_once(common + ["--no-compile", "--no-bf16"]),
                nhwc=train_once(common + ["--channels-last"]), ddp=train_once(common, ddp=True))


def bench_sample(preset, batch, device, steps=50):
    classes = 1000 if preset == "in64" else 10
    net = Denoiser(classes, RES[preset], 3, preset).to(device).eval().requires_grad_(False)
    diffusion = Diffusion().to(device)
    idx = np.arange(batch)
    y = idx % classes
    args = SimpleNamespace(cfg_scale=1.5, sampler="ddim", steps=steps, ddim_eta=0.0)
    fast = device.type == "cuda"  # sample.py's defaults: compile and bf16 on CUDA only
    out = {}
    for name, fwd, bf16 in [("fast", torch.compile(net) if fast else net, fast), ("eager", net, False)]:
        torch._dynamo.reset()
        dt = timed(lambda: sample.generate(fwd, diffusion, idx, y, 0, (3, RES[preset], RES[preset]), args, device,
                                           bf16), device, warmup=1, reps=2)
        out[name] = batch / dt
    return out


def bench_features(n, device):
    net = evaluate.FIDInception().to(device).eval().requires_grad_(False)
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fast = n / timed(lambda: evaluate.inception_features(net, images, batch=500), device, warmup=1, reps=1)

    def host_converted(batch=50):  # how a per-image loader would feed it: float on the host, small batches
        with evaluate.no_tf32(), torch.no_grad():
            for i in range(0, n, batch):
                net(torch.from_numpy(images[i:i + batch]).float().to(device))
    slow = n / timed(host_converted, device, warmup=0, reps=1)
    return fast, slow


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=["cifar", "in64"], choices=list(RES))
    p.add_argument("--train-steps", type=int, default=200)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--sample-batch", type=int, default=500, help="sample.py's GPU default")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--feature-images", type=int, default=10000)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: no CUDA GPU here (--device cpu runs a smoke test, not a benchmark)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [f"{name} | torch {torch.__version__} | {datetime.date.today()}"]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            r = bench_train(preset, a.train_steps, a.train_batch, tmp, device)
            fast, ips = r["fast"], {k: v["images_per_s"] for k, v in r.items()}
            mfu = f"{fast['mfu']:.1%}" if fast["mfu"] else "n/a"
            lines.append(f"train {preset} batch {a.train_batch}: {ips['fast']:.0f} images/s, {fast['step_ms']:.1f} "
                         f"ms/step, {fast['peak_mem_gib']:.1f} GiB, MFU {mfu} | eager fp32 {ips['eager']:.0f} "
                         f"images/s | x{ips['fast'] / ips['eager']:.2f} | channels_last {ips['nhwc']:.0f} images/s "
                         f"(x{ips['nhwc'] / ips['fast']:.2f}) | DDP world 1: {ips['ddp']:.0f} images/s, overhead "
                         f"{1 - ips['ddp'] / ips['fast']:.1%}")
            s = bench_sample(preset, a.sample_batch, device, a.sample_steps)
            lines.append(f"sample {preset} DDIM {a.sample_steps} steps, cfg 1.5, batch {a.sample_batch}: "
                         f"{s['fast']:.0f} images/s (50k in {50000 / s['fast'] / 60:.1f} min) | eager fp32 "
                         f"{s['eager']:.0f} images/s | x{s['fast'] / s['eager']:.2f}")
    fast, slow = bench_features(a.feature_images, device)
    lines.append(f"FID features 32x32, batch 500: {fast:.0f} images/s (50k in {50000 / fast:.0f} s) | batch 50 "
                 f"host-converted {slow:.0f} images/s | x{fast / slow:.2f}")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
