"""Generate samples from a trained run into samples.npz (the layout the ADM evaluation suite reads).

    python sample.py --ckpt runs/NAME --num 50000 [--sampler ddim|ddpm|dpm++|heun] [--steps 50] [--ddim-eta 0]
                     [--cfg-scale 1.5] [--seed 0] [--labels 3,5] [--out runs/NAME/samples.npz]
    torchrun --nproc_per_node=8 sample.py --ckpt runs/NAME --num-samples 50000
    python sample.py --ckpt runs/TEXT --prompt "a red disk" --num 100     # or --prompts FILE (one per line)
    python sample.py --ckpt runs/NAME --cfg-scale 1.5,2,3,5   # a guidance sweep: samples-cfg1.5.npz ... one per scale

Input: a run folder or checkpoint, or a released DiT (DiT's .pt, a diffusers folder or hub id; with --out). An
adapter run (ControlNet, T2I-Adapter) samples from control images: python -m ext.adapters sample.
Output: samples.npz (arr_0 uint8 [N, H, W, C]; arr_1 labels, or captions for text models; the settings as JSON)
and samples.png beside it (a caption under each row for text models).

The model and diffusion settings come from the checkpoint. The initial noise and every noise draw of sample i
depend only on (seed, i), so a sample is the same for any batch size and any number of GPUs, and two models
given the same seed can be compared image by image (Zhang et al. 2024). Work is cut into shards of
--shard-size samples written as they finish; an interrupted run skips the shards it already has.
"""
import argparse
import glob
import hashlib
import json
import os
import sys

import numpy as np
import torch

from diffusion import T, Diffusion, generate, resolve_sampler
from model import build, latent_decoder, load_model, tokenize
from plumbing import (Interval, check_flags, ckpt_path, class_indices, cli, distributed, load_weights, read_captions,
                      read_file, remove_shards, run_shards, save_grid, save_npz, setup_device, weights_hash)

COUNT = Interval(int, "[1, inf)")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", required=True, help="run folder or ckpt.pt, or a released model (DiT's .pt, a diffusers DiT folder "
                                    "or hub id: docs/released-models.md)")
    # --num-samples under torchrun: its parser rejects --num as an abbreviation of its own --numa-binding
    a("--num", "--num-samples", dest="num", type=COUNT, default=50000, help="number of samples")
    a("--sampler", default="ddim", choices=["ddim", "ddpm", "dpm++", "heun"],
      help="DDIM, DDPM ancestral, DPM-Solver++(2M), EDM's deterministic Heun (see model.py)")
    a("--steps", type=Interval(int, f"[1, {T}]"),
      help="sampling steps (default 50; heun: 18 noise levels, 35 evaluations, as EDM; ddpm always uses all T)")
    a("--ddim-eta", type=Interval(float, "[0, 1]"), default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    a("--spacing", default="time", choices=["time", "logsnr"],
      help="ddim and dpm++: noise levels uniform in t (the paper's DPM-Solver default) or in log-SNR")
    a("--cfg-scale", type=Interval(float, "[0, inf)", many=True), default=[1.0],
      help="classifier-free guidance scale s (1 = off); a list 1.5,2,3: one samples file per scale, -cfg<s>.npz")
    a("--seed", type=Interval(int, "[0, inf)"), default=0)
    a("--labels", help="classes to cycle through, comma-separated indices or names (e.g. 0,3 or 'red disk,blue "
                       "ring'; default: all classes, balanced)")
    a("--prompt", help="text models: one caption for every sample")
    a("--prompts", help="text models: captions to cycle through, one per line (.jsonl: a dataset's captions.jsonl, "
                        "the first caption of each line)")
    a("--prompt-emb", help="models trained on --text-emb: caption embeddings .npy to cycle through")
    a("--vae", help="latent models: where the autoencoder recorded in the checkpoint lives now (its hash is checked)")
    a("--weights", default="ema", choices=["ema", "model"], help="EMA (default) or raw weights")
    a("--batch", type=COUNT, help="per-process batch (default: 500 on a GPU, 32 on the CPU)")
    a("--shard-size", type=COUNT, default=1000, help="samples per resumable shard")
    a("--out", help="output npz (default: samples.npz in the run folder; the preview is the same name .png)")
    a("--overwrite", action="store_true", help="replace an existing --out (and remove the JSON results of it)")
    a("--device", default="auto")
    a("--dist-timeout", type=Interval(float, "(0, inf)"), default=600, help="seconds a rank waits for the others")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    return p


def class_labels(num, num_classes, spec=None, names=()):
    """Label of sample i: cycles through the given classes (indices or names; default all), balanced."""
    names = list(names) or [str(k) for k in range(num_classes)]
    classes = np.array(class_indices(spec, names, "--labels") if spec else range(num_classes), dtype=np.int64)
    return classes[np.arange(num) % len(classes)]


def read_prompts(args, max_len):
    """The captions to cycle through: --prompt, or the lines of --prompts (UTF-8; .jsonl: a dataset's captions)."""
    if args.prompt is not None:
        return [args.prompt]
    if not os.path.isfile(args.prompts):
        raise FileNotFoundError(f"--prompts {args.prompts} does not exist")
    if args.prompts.endswith(".jsonl"):  # a dataset's captions.jsonl, checked as train.py checks it
        return [c[0] for c in read_captions(args.prompts)]
    try:
        with open(args.prompts, encoding="utf-8") as f:
            lines = [l.rstrip("\r\n") for l in f if l.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {args.prompts} is not UTF-8 text, one caption per line "
                         f"({type(e).__name__}): re-encode it") from None
    if not lines:
        raise ValueError(f"--prompts {args.prompts} holds no caption: write one caption per line")
    if any(len(l.encode()) > max_len - 1 for l in lines):
        print(f"note: captions longer than the model's {max_len - 1} bytes are cut, as in training", file=sys.stderr)
    return lines


def conditions(args, cfg, num):
    """What sample i is conditioned on, from the flags: (cond [num, ...], a host tensor; what the npz stores of it;
    inputs(indices) -> the network's other inputs for those samples (an extension's); what the settings record of
    them)."""
    m = cfg["model"]
    if m.get("cond", "class") == "class":
        if args.prompt is not None or args.prompts or args.prompt_emb:
            raise ValueError("this is a class-conditional model: use --labels, not --prompt(s)")
        labels = class_labels(num, m["num_classes"], args.labels, cfg.get("data", {}).get("class_names", []))
        cond, stored = torch.from_numpy(labels), dict(arr_1=labels)
    elif m.get("ext_dim"):
        if not args.prompt_emb:
            raise ValueError("this model reads precomputed caption embeddings: give --prompt-emb FILE.npy")
        emb = read_file(args.prompt_emb, "give caption embeddings as a .npy [N, D] or [N, L, D]", mmap=True)
        emb = emb.reshape(len(emb), -1, emb.shape[-1])
        if emb.shape[1:] != (m["max_len"], m["ext_dim"]):
            raise ValueError(f"--prompt-emb rows are {list(emb.shape[1:])}, the model wants [{m['max_len']}, "
                             f"{m['ext_dim']}]")
        rows = np.arange(num) % len(emb)
        cond, stored = torch.from_numpy(np.asarray(emb[rows], dtype=np.float32)), dict(prompt_rows=rows)
    else:
        if args.prompt is None and not args.prompts:
            raise ValueError("this is a text model: give --prompt TEXT or --prompts FILE")
        prompts = read_prompts(args, m["max_len"])
        captions = [prompts[i % len(prompts)] for i in range(num)]
        cond, stored = tokenize(captions, m["max_len"]), dict(captions=np.array(captions))
    return cond, stored, lambda idx: {}, {}


def main(argv=None):
    args = parse(get_parser(), argv)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        ckpt = load_model(args.ckpt)
        run(args, ckpt, build(ckpt["config"])[0], conditions(args, ckpt["config"], args.num),
            ddp, rank, world, local_rank)


def parse(parser, argv):
    """The flags, checked before any work (eta is for ddim), the default steps filled in."""
    args = check_flags(parser, parser.parse_args(argv))
    args.steps = args.steps or (18 if args.sampler == "heun" else 50)
    resolve_sampler(args.sampler, args.steps, args.ddim_eta, args.spacing)
    return args


def run(args, ckpt, net, conds, ddp, rank, world, local_rank):
    """The samples of net (built from ckpt's config; its weights not yet loaded) under conds (see conditions), one
    samples file per guidance scale. A finished file whose settings key is this run's is kept (a sweep resumes where
    it stopped); one of other weights or settings is refused unless --overwrite."""
    if "source" in ckpt["config"] and not args.out and not ckpt["step"]:
        raise ValueError(f"{args.ckpt} is a released model, not a run folder: give --out FILE.npz")
    out = args.out or os.path.join(os.path.dirname(ckpt_path(args.ckpt)), "samples.npz")
    scales = args.cfg_scale
    # a guidance sweep (Chen et al. Fig. 3): one samples file per scale, samples-cfg2.npz ...
    outs = [out] if len(scales) == 1 else [f"{os.path.splitext(out)[0]}-cfg{s:g}.npz" for s in scales]
    device, use_compile, use_bf16 = setup_device(args.device, local_rank, args.compile, args.bf16)
    cfg, m = ckpt["config"], ckpt["config"]["model"]
    cond, stored, inputs, recorded = conds
    walk = resolve_sampler(args.sampler, args.steps, args.ddim_eta, args.spacing, cfg["diffusion"].get("T", T))
    weights_sha = weights_hash(ckpt[args.weights])  # with an adapter's: its base's weights too
    todo = []
    for scale, out in zip(scales, outs):
        # resumed shards and finished files are keyed by everything that decides their content: the weights' hash,
        # then the settings
        settings = dict(ckpt=os.path.abspath(args.ckpt), step=ckpt["step"], weights=args.weights,
                        weights_sha256=weights_sha, num=args.num, sampler=args.sampler,
                        steps=walk["steps"], ddim_eta=args.ddim_eta, spacing=args.spacing, cfg_scale=scale,
                        seed=args.seed, labels=args.labels,
                        conditions=hashlib.sha256(next(iter(stored.values())).tobytes()).hexdigest()[:16],
                        bf16=use_bf16, config=cfg, **recorded)
        if os.path.exists(out) and not args.overwrite:  # its metrics.json ... would describe other samples
            if settings_key(finished(out)) != settings_key(settings):
                raise ValueError(f"{out} exists, made with other weights or settings: pass --overwrite to replace it "
                                 f"(and the evaluate.py results made from it), or --out another file")
            print(f"{out} is done (the same weights and settings): kept")
            continue
        todo.append((out, settings))

    # The model, the decoder and the walk, from the checkpoint and the flags (once: every scale's)
    if todo:
        diffusion = Diffusion(**cfg["diffusion"]).to(device)
        load_weights(net, ckpt[args.weights], args.ckpt)
        net = net.to(device).eval().requires_grad_(False)
        latent = cfg.get("data", {}).get("latent")  # decoded in each batch by the autoencoder the latents came from
        job = dict(fwd=torch.compile(net) if use_compile else net, diffusion=diffusion, cond=cond, inputs=inputs,
                   shape=(m["channels"], m["resolution"], m["resolution"]), walk=walk, compiled=use_compile,
                   decode=latent_decoder(latent, args.vae, device) if latent else None, device=device,
                   batch=args.batch or (500 if device.type == "cuda" else 32))
    for out, settings in todo:
        sample_shards(out, settings, stored, args, job, ddp, rank, world)


def settings_key(settings):
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def finished(out):
    """The settings a finished samples file was made with ({} for one made before settings were stored)."""
    z = read_file(out, "delete it, or pass --overwrite")
    return json.loads(str(z["settings"])) if "settings" in z else {}


def sample_shards(out, settings, stored, args, job, ddp, rank, world):
    """The samples of one settings (one guidance scale) in resumable shards, each batch padded for a compiled model
    (one batch shape: no recompile), then merged into `out`."""
    key, batch, scale = settings_key(settings), job["batch"], settings["cfg_scale"]

    def make(lo, hi, bar):
        parts = []
        for b in range(lo, hi, batch):
            idx = np.arange(b, min(b + batch, hi))
            padded = np.pad(idx, (0, batch - len(idx)), mode="edge") if job["compiled"] else idx
            parts.append(generate(job["fwd"], job["diffusion"], padded, job["cond"][padded], seed=args.seed,
                                  shape=job["shape"], device=job["device"], bf16=settings["bf16"], **job["walk"],
                                  cfg_scale=scale, decode=job["decode"], inputs=job["inputs"](padded))[:len(idx)])
            bar.update(len(idx))
        return np.concatenate(parts)
    announce = lambda missing, total: print(
        f"{args.num} samples, {args.sampler} {settings['steps']} steps, cfg {scale}, seed {args.seed}, "
        f"{args.weights} weights at step {settings['step']} | {missing} of {total} shards to do on {world} x "
        f"{job['device']} | bf16={settings['bf16']} compile={job['compiled']}")
    shards = run_shards(out, key, args.num, args.shard_size, make, ddp, rank, world, "samples", "sample.py", announce)
    if rank == 0:
        merge_shards(out, shards, settings, stored, settings["config"].get("data", {}))


def merge_shards(out, shards, settings, stored, data_meta):
    """The shards into one ADM-layout npz (JSON results of a file it replaces removed), then the preview."""
    images = np.concatenate([read_file(p, "delete it: sample.py makes it again") for p in shards])
    for f in glob.glob(os.path.join(os.path.dirname(os.path.abspath(out)), "*.json")):  # results of the old file
        try:
            result = read_file(f, "")
        except ValueError:  # not a result of ours
            continue
        if isinstance(result, dict) and result.get("samples") == os.path.abspath(out):
            os.remove(f)
            print(f"removed {f}: it was computed from the samples being replaced")
    save_npz(out, arr_0=images, settings=np.array(json.dumps(settings)), **stored)
    remove_shards(shards)
    kind, names = next(iter(stored)), data_meta.get("class_names")
    name = (lambda k: names[k] if names else f"class {k}") if kind == "arr_1" else \
        str if kind == "captions" else (lambda k: f"embedding row {k}")
    preview = os.path.splitext(out)[0] + ".png"
    save_preview(preview, images, list(stored[kind]), name)
    print(f"wrote {out}: arr_0 {images.shape} uint8, {', '.join(stored)}; and {preview}: one row per condition")


def save_preview(path, images, conditions, name):
    """One row per distinct condition (class, caption or embedding row; 10 at most, in order of first use), its
    first 10 samples, labelled at the row's start with name(condition)."""
    rows = list(dict.fromkeys(conditions))[:10]
    picks = [[i for i, c in enumerate(conditions) if c == r][:10] for r in rows]
    ncol = max(map(len, picks))
    grid = np.zeros((len(rows) * ncol,) + images.shape[1:], np.uint8)
    for r, p in enumerate(picks):
        grid[r * ncol:r * ncol + len(p)] = images[p]
    save_grid(path, grid, nrow=len(rows), labels=[name(r) for r in rows])


if __name__ == "__main__":
    cli(main, "sample.py")
