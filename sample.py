"""Generate samples from a trained run into samples.npz (the layout the ADM evaluation suite reads).

    python sample.py --ckpt runs/NAME --num 50000 [--sampler ddim|ddpm] [--steps 50] [--ddim-eta 0]
                     [--cfg-scale 1.5] [--seed 0] [--labels 3,5] [--out runs/NAME/samples.npz]
    torchrun --nproc_per_node=8 sample.py --ckpt runs/NAME --num-samples 50000

The model and diffusion settings come from the checkpoint. The initial noise and every noise draw of sample i
depend only on (seed, i), so a sample is the same for any batch size and any number of GPUs, and two models
given the same seed can be compared image by image (Zhang et al. 2024). Work is cut into shards of
--shard-size samples written as they finish; an interrupted run skips the shards it already has.
"""
import argparse
import hashlib
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import (build, guided, load_checkpoint, resolve_device, sample_noise, save_atomic, save_grid, to_device,
                   to_uint8)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="run folder or checkpoint file")
    # --num-samples under torchrun: its parser rejects --num as an abbreviation of its own --numa-binding
    a("--num", "--num-samples", dest="num", type=int, default=50000, help="number of samples")
    a("--sampler", default="ddim", choices=["ddim", "ddpm"])
    a("--steps", type=int, default=50, help="DDIM steps (ddpm always uses all T steps)")
    a("--ddim-eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    a("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale s (1 = off)")
    a("--seed", type=int, default=0)
    a("--labels", help="comma-separated class indices to cycle through (default: all classes, balanced)")
    a("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    a("--batch", type=int, help="per-process batch (default: 500 on a GPU, 32 on the CPU)")
    a("--shard-size", type=int, default=1000, help="samples per resumable shard")
    a("--out", help="output npz (default: samples.npz in the run folder)")
    a("--device", default="auto")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    return p


def class_labels(num, num_classes, spec=None):
    """Label of sample i: cycles through the given classes (default all), so classes are balanced."""
    classes = np.arange(num_classes)
    if spec:
        classes = np.array([int(c) for c in str(spec).split(",") if c.strip()], dtype=np.int64)
        if len(classes) == 0 or classes.min() < 0 or classes.max() >= num_classes:
            raise ValueError(f"--labels must be class indices in [0, {num_classes})")
    return classes[np.arange(num) % len(classes)]


def generate(net, diffusion, idx, y, seed, shape, args, device, use_bf16):
    """Samples for global indices idx with labels y -> uint8 [b, H, W, C]."""
    x = to_device(sample_noise(seed, idx, shape), device)
    noise_fn = lambda k: to_device(sample_noise(seed, idx, shape, step=k), device)
    model_fn = guided(net, torch.from_numpy(y).to(device), args.cfg_scale)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
        if args.sampler == "ddim":
            x = diffusion.ddim_sample(model_fn, x, args.steps, args.ddim_eta, noise_fn)
        else:
            x = diffusion.ddpm_sample(model_fn, x, noise_fn)
    return to_uint8(x)


def check_args(a):
    if a.num < 1 or (a.batch is not None and a.batch < 1) or a.shard_size < 1:
        raise ValueError("--num, --batch and --shard-size must be at least 1")
    if a.cfg_scale < 0 or not 0 <= a.ddim_eta <= 1:
        raise ValueError("--cfg-scale must be >= 0 and --ddim-eta in [0, 1]")


def main(argv=None):
    args = get_parser().parse_args(argv)
    check_args(args)
    ddp = "RANK" in os.environ
    if ddp:
        dist.init_process_group("nccl" if torch.cuda.is_available() and args.device != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    try:
        run(args, rank, world, ddp)
    finally:
        if ddp:
            dist.destroy_process_group()


def run(args, rank, world, ddp):
    ckpt = load_checkpoint(args.ckpt)
    run_dir = os.path.dirname(os.path.join(args.ckpt, "ckpt.pt") if os.path.isdir(args.ckpt) else args.ckpt)
    out = args.out or os.path.join(run_dir, "samples.npz")
    device = resolve_device(args.device, int(os.environ.get("LOCAL_RANK", 0)))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    use_bf16 = (args.bf16 if args.bf16 is not None else True) and device.type == "cuda"
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    args.batch = args.batch or (500 if device.type == "cuda" else 32)

    cfg = ckpt["config"]
    net, diffusion = build(cfg)
    diffusion.to(device)
    net.load_state_dict(ckpt[args.weights])
    net = net.to(device).eval().requires_grad_(False)
    fwd = torch.compile(net) if use_compile else net
    m = cfg["model"]
    shape = (m["channels"], m["resolution"], m["resolution"])
    labels = class_labels(args.num, m["num_classes"], args.labels)
    settings = dict(ckpt=os.path.abspath(args.ckpt), step=ckpt["step"], weights=args.weights, num=args.num,
                    sampler=args.sampler, steps=args.steps if args.sampler == "ddim" else diffusion.T,
                    ddim_eta=args.ddim_eta, cfg_scale=args.cfg_scale, seed=args.seed, labels=args.labels,
                    config=cfg)
    # shards of a different setting never mix: their folder is keyed by the settings
    key = hashlib.sha256(json.dumps({k: v for k, v in settings.items() if k != "config"},
                                    sort_keys=True).encode()).hexdigest()[:12]
    shard_dir = f"{out}.shards-{key}"
    os.makedirs(shard_dir, exist_ok=True)
    n_shards = -(-args.num // args.shard_size)
    shard_path = lambda s: os.path.join(shard_dir, f"{s:06d}.npy")
    missing = [s for s in range(n_shards) if not os.path.exists(shard_path(s))]
    todo = missing[rank::world]
    if ddp:  # every rank lists the shards before any rank writes one
        dist.barrier()
    if rank == 0:
        print(f"{args.num} samples, {args.sampler} {settings['steps']} steps, cfg {args.cfg_scale}, seed {args.seed}, "
              f"{args.weights} weights at step {ckpt['step']} | {len(missing)} of {n_shards} shards to do on "
              f"{world} x {device} | bf16={use_bf16} compile={use_compile}")
    t0, done = time.perf_counter(), 0
    bar = tqdm(total=sum(min(args.shard_size, args.num - s * args.shard_size) for s in todo), disable=rank != 0,
               unit="img", dynamic_ncols=True)
    for s in todo:
        lo, hi = s * args.shard_size, min((s + 1) * args.shard_size, args.num)
        parts = []
        for b in range(lo, hi, args.batch):
            idx = np.arange(b, min(b + args.batch, hi))
            # a compiled model sees one batch shape (no recompile for a short last batch): pad, then drop the extra
            padded = np.pad(idx, (0, args.batch - len(idx)), mode="edge") if use_compile else idx
            images = generate(fwd, diffusion, padded, labels[padded], args.seed, shape, args, device, use_bf16)
            parts.append(images[:len(idx)])
            bar.update(len(idx))
            done += len(idx)
        save_atomic(shard_path(s), lambda f: np.save(f, np.concatenate(parts)))
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    if done:
        dt = time.perf_counter() - t0
        print(f"rank {rank}: {done} samples in {dt:.1f} s, {done / dt:.1f} images/s")
    if ddp:
        dist.barrier()
    if rank == 0:
        images = np.concatenate([np.load(shard_path(s)) for s in range(n_shards)])
        save_atomic(out, lambda f: np.savez(f, arr_0=images, arr_1=labels, settings=np.array(json.dumps(settings))))
        shutil.rmtree(shard_dir)
        grid = images[:min(len(images), 100)]
        save_grid(os.path.splitext(out)[0] + ".png", grid, nrow=max(1, int(np.sqrt(len(grid)))))
        print(f"wrote {out}: arr_0 {images.shape} uint8, arr_1 labels")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"sample.py: error: {e}")
