"""Throughput of the three heavy stages on the GPU at hand, each against eager fp32 measured in the same run.

    python -m ext.bench [--presets cifar in64] [--train-batch 128 16] [--train-steps 200] [--sample-batch 500]
                        [--feature-images 10000] [--baseline DIR] [--profile]
    python -m ext.bench --time-train N [train.py flags]    # one variant: N steps of train.py's step function

Training: each variant is `--time-train` in its own process, on random images of the preset's size. On the GPU
they first compile in parallel (a one-step run each, which fills torch.compile's on-disk caches), then are timed one
at a time, so no timing shares the GPU or the CPU with a compile: the defaults (bf16, torch.compile with CUDA graphs,
NCHW), eager fp32, the defaults without CUDA graphs, in NHWC, and under torchrun's environment at world size 1 (which
adds the gradient all-reduce). --time-train times the step function train.py's loop calls, built by its own setup.
--baseline DIR times the training of another checkout (an earlier commit, say) with its own defaults, after the others.
Sampling: DDIM 50 steps with classifier-free guidance (scale 1.5) of a randomly initialised model.
FID features: our Inception on random uint8 32x32 images, batch 500 on the GPU vs batch 50 converted on the host.
--profile: the CUDA kernels of 20 training steps (defaults, first preset and batch), by total time.
Random weights cost the same FLOPs as trained ones; nothing here is a quality figure.
--device cpu runs every stage eagerly at toy sizes: a smoke test of this script, not a benchmark.
"""
import argparse
import datetime
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import evaluate
import train
from diffusion import Diffusion, generate
from model import Denoiser
from plumbing import Interval, check_flags, cli, distributed, mfu, peak_flops

# input size of each preset; the DiTs train on 32x32x4 latents (256x256 images through an 8x autoencoder), the
# paper's DiT-XL/2 setting
RES = {"tiny": 32, "cifar": 32, "in64": 64, "dit-tiny": 32, "dit-xl2": 32}
CLASSES = {"in64": 1000, "dit-xl2": 1000}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed(fn, device, warmup=1, reps=3, reset_memory=False):
    """Seconds per call of fn, after warmup untimed calls (and, reset_memory, with the peak memory counted anew)."""
    import torch
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    if reset_memory and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def time_training(argv, n):
    """train.py's setup for its flags argv (nothing written: the run folder is a temporary one), then n calls of its
    step function after min(n, 10) untimed ones (compile, graph capture, cuDNN's search) -> images/s, ms/step, peak
    memory, GFLOP/image, MFU; printed, and as one JSON line for the parent process."""
    args = train.parse_args(argv)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank), \
            tempfile.TemporaryDirectory() as tmp:
        args.out = os.path.join(tmp, "run")
        cfg, config, data, s, rt = train.setup(args, ddp, rank, world, local_rank, grids=False)
        step_fn = train.make_step_fn(cfg, data, s, rt)
        grid = train.grid_rows(cfg.cond, data.meta["class_names"], data.captions, data.text_emb, cfg.max_len)
        flops = train.train_flops_per_image(s.net, s.diffusion, (data.ch, data.res, data.res), grid, rt.device)
        s.net.train()
        return bench_steps(step_fn, s.step, n, cfg.batch_size, flops, rt.device, world, rank,
                           f"{cfg.preset} batch {cfg.batch_size} on {world}x compile={rt.compile} bf16={rt.bf16}")


def bench_steps(step_fn, step, n, batch, flops_img, device, world, rank, what):
    """--bench n: n steps of the training step function after min(n, 10) untimed ones (compile, graph capture,
    cuDNN's search) -> images/s, ms/step, peak memory, GFLOP/image, MFU; printed, and as one JSON line for bench.py."""
    steps = iter(range(step, step + min(10, n) + n))
    dt = timed(lambda: step_fn(next(steps)), device, warmup=min(10, n), reps=n, reset_memory=True)
    cuda, peak = device.type == "cuda", peak_flops(device)
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    r = dict(images_per_s=batch / dt, step_ms=dt * 1000, peak_mem_gib=mem, gflop_per_image=flops_img / 1e9,
             mfu=mfu(flops_img, batch / dt, peak, world))
    if rank == 0:
        print(f"bench {what} {torch.cuda.get_device_name(device) if cuda else 'cpu'}: {r['images_per_s']:.1f} "
              f"images/s, {r['step_ms']:.1f} ms/step, peak memory {mem:.2f} GiB, {r['gflop_per_image']:.2f} "
              f"GFLOP/image (fwd+bwd), MFU "
              + (f"{r['mfu']:.1%} of bf16 dense peak" if peak else "n/a (peak unknown)"))
        print(json.dumps(dict(bench=r)))
    return r


def fake_dataset(root, preset, n=4096):
    """Random images of the preset's size, or for a DiT random KL latents (mean, std) as prepare_data writes them."""
    os.makedirs(root, exist_ok=True)
    rng, res, num_classes = np.random.default_rng(0), RES[preset], CLASSES.get(preset, 10)
    meta = dict(num_classes=num_classes, class_names=[str(i) for i in range(num_classes)], resolution=res,
                channels=3, count=n, source="bench", source_checksum="", skipped=[])
    if preset.startswith("dit"):
        np.save(os.path.join(root, "latents.npy"), rng.standard_normal((n, 2, 2, 4, res, res), dtype=np.float32)
                .astype(np.float16))
        meta.update(channels=4, latent=dict(vae="none", cls="AutoencoderKL", sha256="", scale=0.18215, kind="kl",
                                            shape=[2, 2, 4, res, res], image_resolution=8 * res, image_channels=3))
    else:
        np.save(os.path.join(root, "images.npy"), rng.integers(0, 256, (n, res, res, 3), dtype=np.uint8))
    np.save(os.path.join(root, "labels.npy"), rng.integers(0, num_classes, n))
    json.dump(meta, open(os.path.join(root, "meta.json"), "w"))
    return root


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(argv, steps, log, ddp=False, root=ROOT):
    """--time-train of the checkout at root in a process of its own (an older checkout's train.py --bench), stderr
    (progress bars) to a file; ddp: with the environment torchrun --nproc_per_node=1 would set."""
    env = dict(os.environ)
    if ddp:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=free_port())
    cmd = ["-m", "ext.bench", "--time-train", str(steps), *argv] if os.path.isfile(f"{root}/ext/bench.py") else \
        [os.path.join(root, "train.py"), *argv, "--bench", str(steps)]
    p = subprocess.Popen([sys.executable, *cmd], stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=env,
                         cwd=root)
    p.log = log
    return p


def result(proc, name):
    """The figures a --time-train process printed as its last line, one JSON object."""
    out = proc.communicate()[0]
    try:
        assert proc.returncode == 0
        return json.loads(out.strip().splitlines()[-1])["bench"]
    except (AssertionError, IndexError, ValueError, KeyError):
        raise SystemExit(f"bench.py: error: variant {name} failed:\n{out[-2000:]}{open(proc.log).read()[-3000:]}") \
            from None


def bench_train(preset, batches, steps, tmp, device, baseline=None, baseline_batches=(), extra=True):
    """{(batch, variant): figures}: every variant compiles at once (GPU), then each is timed alone. The first batch
    also times the defaults without CUDA graphs and in NHWC."""
    data = fake_dataset(os.path.join(tmp, preset), preset)
    variants = {"fast": ([], False), "eager fp32": (["--no-compile", "--no-bf16"], False), "DDP world 1": ([], True)}
    runs = {}
    for batch in batches:
        common = ["--data", data, "--preset", preset, "--batch-size", str(batch), "--device", device.type]
        if device.type == "cuda" and batch == batches[0] and extra:
            variants = {**variants, "no CUDA graphs": (["--no-cuda-graphs"], False),
                        "NHWC": (["--channels-last"], False)}
        elif batch != batches[0]:
            variants = {k: v for k, v in variants.items() if k not in ("no CUDA graphs", "NHWC")}
        for name, (flags, ddp) in variants.items():
            runs[batch, name] = (common + flags, ddp, os.path.join(tmp, f"{preset}-{batch}-{name.replace(' ', '_')}"))
    if device.type == "cuda":  # compile every variant at once; the timed runs below find the compiled code cached
        warm = {k: launch(argv, 1, log + "-warm.log", ddp) for k, (argv, ddp, log) in runs.items()}
        for key, p in warm.items():
            result(p, key)
    out = {key: result(launch(argv, steps, log + ".log", ddp), key) for key, (argv, ddp, log) in runs.items()}
    for batch in baseline_batches if baseline else []:
        common = ["--data", data, "--preset", preset, "--batch-size", str(batch)]
        log = os.path.join(tmp, f"{preset}-{batch}-baseline.log")
        out[batch, "baseline"] = result(launch(common, steps, log, root=os.path.abspath(baseline)), "baseline")
    return out


def profile_train(preset, batch, tmp, device, top=15):
    """The CUDA kernels of 20 steps of the default training path, by total time, and GPU time per step."""
    from torch.profiler import ProfilerActivity, profile
    data = fake_dataset(os.path.join(tmp, preset), preset)
    argv = ["--data", data, "--preset", preset, "--batch-size", str(batch), "--device", device.type]
    time_training(argv, 3)  # compile outside the profile (the cache serves the run below)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        r = time_training(argv, 20)
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events)
    lines = [f"profile {preset} batch {batch}: wall {r['step_ms']:.1f} ms/step; GPU busy {total / 30 / 1000:.1f} ms "
             f"per step (30 steps: 10 warm-up + 20)"]
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:top]:
        lines.append(f"  {e.self_device_time_total / total:6.1%} {e.count:6d}x  {e.key[:110]}")
    return lines


def bench_sample(preset, batch, device, steps=50):
    classes, ch = CLASSES.get(preset, 10), 4 if preset.startswith("dit") else 3  # DiT: latents, not decoded
    net = Denoiser(classes, RES[preset], ch, preset).to(device).eval().requires_grad_(False)
    diffusion = Diffusion().to(device)
    idx = np.arange(batch)
    c = torch.from_numpy(idx % classes)
    fast = device.type == "cuda"  # sample.py's defaults: compile and bf16 on CUDA only
    out = {}
    for name, fwd, bf16 in [("fast", torch.compile(net) if fast else net, fast), ("eager", net, False)]:
        torch._dynamo.reset()
        dt = timed(lambda: generate(fwd, diffusion, idx, c, seed=0, shape=(ch, RES[preset], RES[preset]),
                                           device=device, bf16=bf16, steps=steps, cfg_scale=1.5), device, reps=2)
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


def train_lines(preset, r, batches):
    lines = []
    for b in batches:
        fast, ips = r[b, "fast"], {k: v["images_per_s"] for (bb, k), v in r.items() if bb == b}
        mfu = f"{fast['mfu']:.1%}" if fast["mfu"] else "n/a"
        line = (f"train {preset} batch {b}: {ips['fast']:.0f} images/s, {fast['step_ms']:.1f} ms/step, "
                f"{fast['peak_mem_gib']:.1f} GiB, MFU {mfu} | eager fp32 {ips['eager fp32']:.0f} images/s, "
                f"x{ips['fast'] / ips['eager fp32']:.2f}")
        for name in ("no CUDA graphs", "NHWC", "baseline"):
            if name in ips:
                line += f" | {name} {ips[name]:.0f} images/s (fast x{ips['fast'] / ips[name]:.2f})"
        lines.append(line + f" | DDP world 1 {ips['DDP world 1']:.0f} images/s, overhead "
                            f"{1 - ips['DDP world 1'] / ips['fast']:.1%}")
    return lines


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    count = Interval(int, "[1, inf)")
    p.add_argument("--presets", nargs="+", default=["cifar", "in64"], choices=list(RES))
    p.add_argument("--train-steps", type=count, default=200)
    p.add_argument("--train-batch", type=count, nargs="+", default=[128, 16],
                   help="per-GPU batches (the paper's 128 over 8 GPUs is 16 each)")
    p.add_argument("--sample-batch", type=count, default=500, help="sample.py's GPU default")
    p.add_argument("--sample-steps", type=Interval(int, "[1, 1000]"), default=50)
    p.add_argument("--feature-images", type=Interval(int, "[0, inf)"), default=10000, help="0: skip the FID features")
    p.add_argument("--no-sample", action="store_true", help="skip sampling")
    p.add_argument("--no-train", action="store_true", help="skip training")
    p.add_argument("--no-variants", action="store_true", help="time only the defaults, eager fp32 and DDP world 1")
    p.add_argument("--baseline", help="another checkout whose training to time too (its own defaults; its ext/bench.py "
                                      "--time-train, or an older train.py --bench that prints its figures as JSON)")
    p.add_argument("--baseline-batch", type=count, nargs="+", help="batches to time the baseline at (default: all)")
    p.add_argument("--profile", action="store_true", help="print the kernels of the default training step")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    return p


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--time-train"]:
        return time_training(argv[2:], int(argv[1]))
    p = get_parser()
    a = check_flags(p, p.parse_args(argv))
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.py: error: no CUDA GPU here (--device cpu runs a smoke test, not a benchmark)")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    lines = [f"{name} | torch {torch.__version__} | {datetime.date.today()}"]
    with tempfile.TemporaryDirectory() as tmp:
        for preset in a.presets:
            if not a.no_train:
                r = bench_train(preset, a.train_batch, a.train_steps, tmp, device, a.baseline,
                                a.baseline_batch or a.train_batch, not a.no_variants)
                lines += train_lines(preset, r, a.train_batch)
                print("\n".join(lines), flush=True)
            if not a.no_sample:
                s = bench_sample(preset, a.sample_batch, device, a.sample_steps)
                lines.append(f"sample {preset} DDIM {a.sample_steps} steps, cfg 1.5, batch {a.sample_batch}: "
                             f"{s['fast']:.0f} images/s (50k in {50000 / s['fast'] / 60:.1f} min) | eager fp32 "
                             f"{s['eager']:.0f} images/s | x{s['fast'] / s['eager']:.2f}")
        if a.profile and not a.no_train:
            lines += profile_train(a.presets[0], a.train_batch[0], tmp, device)
    if a.feature_images:
        fast, slow = bench_features(a.feature_images, device)
        lines.append(f"FID features 32x32, batch 500: {fast:.0f} images/s (50k in {50000 / fast:.0f} s) | batch 50 "
                     f"host-converted {slow:.0f} images/s | x{fast / slow:.2f}")
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    cli(main, "ext.bench", (ValueError, OSError, FloatingPointError))
