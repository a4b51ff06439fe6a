"""Pre-train a conditional diffusion model on conditions corrupted at ratio eta (Chen et al., NeurIPS 2024):
class labels flipped, or captions swapped.

    python train.py --data data/shapes/train --preset tiny --steps 2000 [--cond text] [--eta 0.1] [--cep uniform]
    torchrun --nproc_per_node=8 train.py --eta 0.05        # several GPUs; --resume runs/NAME continues a run

Input: a dataset folder from prepare_data.py. Output: a run folder (config.json, corruption.npz, log.jsonl,
ckpt.pt, grid-<step>.png; docs/file-formats.md). Everything random in a step is drawn from (seed, step) for the
global batch before it is split over ranks: a run is the same for any number of GPUs, and --resume is exact.
"""
import argparse
import copy
import dataclasses
import functools
import glob
import json
import math
import os
import time
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import corrupt
from diffusion import T, Diffusion, generate
from model import PRESETS, Denoiser, cep_delta, latent_decoder, load_model, tokenize
from plumbing import (CKPT_FORMAT, Interval, barrier, check_flags, ckpt_path, cli, distributed, flag_adder,
                      load_checkpoint, load_weights, mfu, peak_flops, peers, read_captions, read_dataset,
                      resumable_flags, save_atomic, save_grid, save_json, save_npz, seed_of, setup_device, to_device,
                      to_float)

# How this process runs: device, ranks, the speed switches of --compile, --bf16, --cuda-graphs, --channels-last.
Runtime = namedtuple("Runtime", "device rank world ddp compile bf16 graphs memory_format")
COUNT, FRACTION, NONNEG = Interval(int, "[1, inf)"), Interval(float, "[0, 1)"), Interval(float, "[0, inf)")


def get_parser():
    """The flags; resumable=True marks those a resumed run may change (the others come from its checkpoint)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = flag_adder(p)
    a("--data", default="data/cifar10/train", help="dataset split folder from prepare_data.py")
    a("--out", help="run folder (default runs/<dataset>-<preset>[-text]-eta<eta>[-cep<kind>])")
    a("--resume", help="run folder or ckpt.pt of a run to continue with its stored config")
    a("--preset", default="cifar", choices=list(PRESETS),
      help="UNets: tiny (CPU), cifar (DDPM), in64 (ADM), ldm4 (LDM-4 on 64x64x3 latents); DiTs: dit-tiny (CPU), "
           "dit-s2, dit-b2, dit-l2, dit-xl2 (DiT-S/2 ... DiT-XL/2)")
    a("--channels", type=COUNT, help="UNet base width over the preset's (Zhang et al.'s UNet-64/128/256)")
    a("--dropout", type=FRACTION, help="override the preset's dropout")
    a("--schedule", choices=["linear", "scaled_linear", "cosine"], help="noise schedule (default: the preset's)")
    a("--class-ctx", type=Interval(int, "[0, inf)"), help="width of the class embedding read by cross-attention "
      "(ldm4: 512, as LDM; 0: through the time embedding, as the other presets)")
    a("--prediction", default="eps", choices=["eps", "v"])
    a("--cond", default="class", choices=["class", "text"], help="condition on class labels or on captions")
    a("--eta", type=FRACTION, default=0.0, help="fraction of corrupted labels (or swapped captions), in [0, 1)")
    a("--corruption", choices=["symmetric", "asymmetric", "swap"], help="label flips (class) or caption swaps (text)")
    a("--corruption-mode", default="fixed", choices=["fixed", "resample"],
      help="fixed once (paper) or drawn anew each epoch (paper App. E.4)")
    a("--corrupt-classes", help="asymmetric: the class subset (indices or names, comma-separated)")
    a("--cep", default="none", choices=["none", "uniform", "gaussian"], help="condition embedding perturbation")
    a("--cep-gamma", type=NONNEG, default=1.0)
    a("--ip-gamma", type=NONNEG, default=0.0, help="input perturbation, the paper's baseline (Ning et al. 2023): x_t "
      "built from noise + gamma xi, the target the noise (0: off; theirs: 0.1)")
    a("--label-dropout", type=FRACTION, default=0.1, help="probability of the null class or empty caption (CFG)")
    a("--text-dim", type=COUNT, help="text encoder width (default: by preset, 64/256/384)")
    a("--text-layers", type=COUNT, help="text encoder layers (default: by preset, 2/4/6)")
    a("--max-len", type=Interval(int, "[2, inf)"), default=64, help="caption length in UTF-8 bytes (longer: cut)")
    a("--text-emb", help="caption embeddings .npy [N, D] or [N, L, D] made elsewhere, in place of the text encoder")
    a("--replicate-pad", action=argparse.BooleanOptionalAction, default=True, help="noisy replicate padding (Berrada)")
    a("--pad-noise", type=NONNEG, default=0.1, help="std of the replicate-padding noise (training only)")
    a("--crop-scale", type=Interval(float, "(0, 1]"), default=1.0, help="random crops of side in [crop-scale, 1]")
    a("--init-from", help="start from these EMA weights at this dataset's resolution: a run folder or ckpt.pt, or a "
      "released model (DiT's .pt, a diffusers DiT folder or hub id: docs/released-models.md)")
    a("--schedule-shift", type=Interval(float, "(0, inf)"), help="divide the SNR by shift^2 (--init-from: new/old res)")
    a("--subset", type=COUNT, help="train on a seeded subset of this many images (Zhang et al. 2024)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    a("--batch-size", type=COUNT, default=128, help="global batch over all ranks and accumulation steps")
    a("--batch-gpu", type=COUNT, resumable=True, help="per-rank micro-batch (default: batch-size / world size)")
    a("--lr", type=Interval(float, "(0, inf)"), default=2e-4)
    a("--warmup", type=Interval(int, "[0, inf)"), default=5000, help="linear lr warm-up steps")
    a("--weight-decay", type=NONNEG, default=0.0)
    a("--grad-clip", type=NONNEG, default=1.0)
    a("--ema-halflife-kimg", type=NONNEG, default=500.0, help="EMA half-life in thousands of images")
    a("--ema-rampup", type=NONNEG, default=0.05, help="half-life is at most this fraction of images seen (0: off)")
    add_run_flags(a)
    return p


def add_run_flags(a):
    """How long, how logged and on what hardware: mostly flags a resumed run may change."""
    a("--steps", type=COUNT, default=800_000, resumable=True)
    a("--seed", type=Interval(int, "[0, inf)"), default=0, help="training randomness")
    a("--data-seed", type=Interval(int, "[0, inf)"), default=0, help="corruption and subset")
    a("--log-every", type=COUNT, default=100, resumable=True)
    a("--ckpt-every", type=COUNT, default=5000, resumable=True, help="save ckpt.pt and a sample grid every N steps")
    a("--snapshot-every", type=Interval(int, "[0, inf)"), default=0, resumable=True, help="keep ckpt-<step>.pt (0: no)")
    a("--grid-cfg", type=NONNEG, default=1.0, resumable=True, help="guidance scale of the sample grid")
    a("--grid-steps", type=Interval(int, f"[1, {T}]"), default=50, resumable=True, help="DDIM steps of the grid")
    a("--device", default="auto", resumable=True, help="auto, cpu or cuda")
    a("--dist-timeout", type=Interval(float, "(0, inf)"), default=600, resumable=True, help="seconds to wait for ranks")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, resumable=True, help="default: on CUDA")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None, resumable=True,
      help="CUDA graphs for the compiled step (default: on with --compile)")
    a("--channels-last", action="store_true", help="NHWC weights and inputs (measured slower: docs/performance.md)")


def parse_args(argv=None, parser=None):
    """The flags (of get_parser, or of a parser built on it), checked, and args.given: those on the command line, from
    a second parse with every default None (a given flag may equal its default)."""
    p = parser or get_parser()
    args = check_flags(p, p.parse_args(argv))
    p.set_defaults(**{k: None for k in vars(args)})
    args.given = sorted(k for k, v in vars(p.parse_args(argv)).items() if v is not None)
    return args


# ----------------------------------------------------------------------------- configuration

def resolve_config(args, world, ckpt=None):
    """Flags -> the run's config, a read-only named tuple: a resumed run's (ckpt) as stored but for the resumable
    flags, with the defaults that depend on other flags filled in, all checked before any work starts."""
    flags, resumable = {k: v for k, v in vars(args).items() if k != "given"}, resumable_flags(get_parser())
    if ckpt is not None:
        stored = ckpt["config"]["train"]
        for k in args.given:
            if k not in resumable | {"resume", "out"} and flags[k] != stored.get(k):
                raise ValueError(f"--{k.replace('_', '-')} differs from the checkpoint's stored value "
                                 f"{stored.get(k)!r}; a resumed run keeps its config (only "
                                 f"{', '.join(sorted(resumable))} may change)")
        flags.update({k: v for k, v in stored.items() if k in flags},
                     **{k: flags[k] for k in args.given if k in resumable})
        flags["out"] = args.out if "out" in args.given else os.path.dirname(ckpt_path(args.resume))
    flags["corruption"] = flags["corruption"] or ("swap" if flags["cond"] == "text" else "symmetric")
    flags["schedule"] = flags["schedule"] or PRESETS[flags["preset"]].get("schedule", "linear")
    if flags["out"] is None:
        dataset = os.path.basename(os.path.dirname(os.path.abspath(flags["data"])))
        text = "-text" if flags["cond"] == "text" else ""
        flags["out"] = os.path.join("runs", f"{dataset}-{flags['preset']}{text}-eta{flags['eta']:g}{perturbed(flags)}")
    check_args(**flags)
    # global batch = world x batch_gpu x accumulation
    batch_gpu = flags["batch_gpu"] or flags["batch_size"] // world
    if flags["batch_size"] % world or batch_gpu < 1 or (flags["batch_size"] // world) % batch_gpu:
        raise ValueError(f"--batch-size {flags['batch_size']} must split into {world} ranks x --batch-gpu "
                         f"{batch_gpu} x a whole number of accumulation steps")
    flags.update(batch_gpu=batch_gpu, world_size=world, accum=flags["batch_size"] // world // batch_gpu)
    cfg = namedtuple("Config", flags)(**flags)
    if not cfg.resume and os.path.exists(os.path.join(cfg.out, "ckpt.pt")):
        raise ValueError(f"{cfg.out} already holds a run: continue it with --resume {cfg.out} or pick another --out")
    return cfg


def perturbed(flags):
    """The run folder's suffix for CEP and input perturbation: -cepuniform, -ip0.1."""
    return ("" if flags["cep"] == "none" else f"-cep{flags['cep']}") + \
        (f"-ip{flags['ip_gamma']:g}" if flags["ip_gamma"] else "")


def check_args(corruption, cond, text_emb, text_dim, text_layers, corrupt_classes, preset, channels, dropout, **_):
    if (corruption == "swap") != (cond == "text"):
        raise ValueError(f"--corruption {corruption} does not go with --cond {cond}: labels are flipped "
                         f"(symmetric, asymmetric), captions swapped (swap)")
    if cond != "text" and (text_emb or text_dim or text_layers):
        raise ValueError("--text-emb, --text-dim and --text-layers are for --cond text; this is a class model")
    if corruption == "asymmetric" and not corrupt_classes:
        raise ValueError("--corruption asymmetric needs --corrupt-classes")
    if "dit" in PRESETS[preset] and (channels or dropout is not None):
        raise ValueError("--channels and --dropout set a UNet; a DiT preset takes neither")


# ----------------------------------------------------------------------------- data

def load_dataset(path, subset, data_seed):
    """(images or latents, labels, rows used, meta) of a dataset folder, cut to a seeded --subset."""
    d = read_dataset(path)
    index, labels = np.arange(len(d.labels)), d.labels
    if subset:
        if not 1 <= subset <= len(labels):
            raise ValueError(f"--subset must be in [1, {len(labels)}]")
        index = np.sort(np.random.default_rng([data_seed, 1]).choice(len(labels), subset, replace=False))
        labels = labels[index]
    return d.images, labels, index, d.meta


def load_text(path, count, text_emb=None):
    """(captions, embeddings): the dataset's captions.jsonl, or --text-emb [N, L, D] (memory-mapped)."""
    if not text_emb:
        return read_captions(os.path.join(path, "captions.jsonl"), count), None
    try:
        emb = np.load(text_emb, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --text-emb {text_emb} as .npy ({type(e).__name__})") from None
    if emb.ndim not in (2, 3) or len(emb) != count or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"--text-emb {text_emb} is {emb.dtype} {list(emb.shape)}: want float [{count}, D] or "
                         f"[{count}, L, D], one row per image in images.npy order")
    return None, emb.reshape(count, -1, emb.shape[-1])


class Batches:
    """Global batch i = positions [i*B, (i+1)*B) of a stream of seeded per-epoch permutations (resumable by step)."""

    def __init__(self, images, index, device, seed, label_fn, in_memory, path):
        self.n, self.seed, self.device, self.label_fn = len(index), seed, device, label_fn
        self.index, self.images, self.path = index, images, path
        if in_memory:  # small sets (CIFAR) live on the device: no loader workers needed
            x = np.ascontiguousarray(images[index])
            check_finite(x, index, path)
            self.images, self.index = torch.from_numpy(x).to(device), None
        self._epoch, self._perm, self._cond_ids = None, None, None

    def _epoch_data(self, e):
        if e != self._epoch:
            self._epoch, self._perm = e, np.random.default_rng([self.seed, 2, e]).permutation(self.n)
            self._cond_ids = torch.from_numpy(self.label_fn(e))
        return self._perm, self._cond_ids

    def indices(self, step, batch):
        """Positions in the (subset) dataset of global batch `step`, and their condition ids (see make_label_fn)."""
        idx, ids = [], []
        pos = step * batch
        while len(idx) < batch:
            e, off = divmod(pos, self.n)
            perm, cond_ids = self._epoch_data(e)
            take = perm[off:off + batch - len(idx)]
            idx.extend(take)
            ids.append(cond_ids[take])
            pos += len(take)
        return np.array(idx), torch.cat(ids)

    def images_at(self, idx):
        """uint8 [b, H, W, C] on the device (made float in the compiled step)."""
        if self.index is None:
            return self.images[to_device(torch.from_numpy(idx), self.device)]
        rows = self.index[idx]
        order = np.argsort(rows)  # sorted reads from the mmap, then back to batch order
        x = np.empty((len(rows),) + self.images.shape[1:], self.images.dtype)
        x[order] = self.images[rows[order]]
        check_finite(x, rows, self.path)
        return to_device(torch.from_numpy(x), self.device)


def check_finite(x, rows, path):
    """Latents that are nan or inf train a nan loss far from the cause: name the first such dataset row."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(1) if x.dtype.kind == "f" else np.zeros(len(x), bool)
    if bad.any():
        raise ValueError(f"{path}: row {rows[np.argmax(bad)]} of latents.npy is not finite (nan or inf): encode the "
                         f"dataset again (prepare_data.py --dataset latents), or rebuild it without that image")


def make_label_fn(kind, mode, eta, data_seed, labels, num_classes, class_names, corrupt_classes=None):
    """(epoch -> condition ids, the fixed ids, the corruption mask). A condition id is the (possibly flipped) class
    label, or for captions the image whose caption each image gets. Fixed corruption is computed once, resample
    mode per epoch (App. E.4)."""
    if kind == "swap":
        draw = lambda e=None: corrupt.corrupt_captions(len(labels), eta, data_seed, epoch=e)
    else:
        classes = corrupt.parse_classes(corrupt_classes, class_names, "--corrupt-classes") if kind == "asymmetric" else None
        draw = lambda e=None: corrupt.corrupt_labels(labels, eta, num_classes, data_seed, classes, epoch=e)
    fixed, mask = draw()
    return ((lambda e: fixed) if mode == "fixed" else (lambda e: draw(e)[0])), fixed, mask


def make_cond(cond, cond_ids, index, captions, text_emb, seed, step, max_len, tokens=None):
    """Host-side condition of a global batch: class labels, byte tokens (or tokens(captions), an extension's
    tokenizer's) of one caption per image (which one is drawn by (seed, step)), or precomputed caption embeddings."""
    if cond == "class":
        return cond_ids
    rows = index[cond_ids.numpy()]
    if text_emb is not None:
        return torch.from_numpy(np.asarray(text_emb[rows], dtype=np.float32))
    rng = np.random.default_rng([seed, step, 4])
    picked = [captions[r][rng.integers(len(captions[r]))] for r in rows]
    return tokenize(picked, max_len) if tokens is None else tokens(picked)


@dataclasses.dataclass
class Data:
    """A dataset folder as a run sees it; a position is a row of the rows it trains on (all, or a --subset)."""
    meta: dict  # meta.json
    index: np.ndarray  # the dataset row of each position
    res: int  # the model's input resolution and channels (a latent folder's latents)
    ch: int
    image_res: int  # the images' resolution (a latent folder's source images)
    latent: dict  # meta.json's record of the autoencoder of a latent folder, or None
    corruption: dict  # what corruption.npz stores: the mask, the index, (clean) labels or each caption's source
    fixed_ids: np.ndarray  # each position's condition id under the fixed corruption (make_label_fn)
    captions: list  # captions.jsonl, a list of captions per dataset row (text models), or None
    text_emb: np.ndarray  # --text-emb, one row per dataset row, or None
    batches: object  # Batches: the global batch of each step
    cond_of: object  # (condition ids, step) -> the host condition of a batch (make_cond)
    decode: object  # latents -> images for rank 0's grids, or None


def load_data(cfg, device, rank=0, grids=True):
    """The dataset, its (corrupted) conditions and the batch stream; decode (rank 0, grids): by the autoencoder the
    latents were made with (its hash checked)."""
    images, clean_labels, index, meta = load_dataset(cfg.data, cfg.subset, cfg.data_seed)
    captions, text_emb = load_text(cfg.data, len(images), cfg.text_emb) if cfg.cond == "text" else (None, None)
    label_fn, fixed_ids, mask = make_label_fn(cfg.corruption, cfg.corruption_mode, cfg.eta, cfg.data_seed, clean_labels,
                                              meta["num_classes"], meta["class_names"], cfg.corrupt_classes)
    in_memory = len(index) * images[0].nbytes < 8 << 30
    conds = dict(labels=fixed_ids, clean_labels=clean_labels) if cfg.cond == "class" else dict(source=fixed_ids)
    latent = meta.get("latent")
    if latent and cfg.crop_scale < 1:
        raise ValueError("--crop-scale does not apply to precomputed latents (the latent of a crop is not a crop of "
                         "the latent): leave it at 1; flips still apply")
    image_res = latent["image_resolution"] if latent else meta["resolution"]
    return Data(
        meta=meta, index=index, res=meta["resolution"], ch=images.shape[3], image_res=image_res, latent=latent,
        corruption=dict(mask=mask, index=index, **conds), fixed_ids=fixed_ids, captions=captions, text_emb=text_emb,
        batches=Batches(images, index, device, cfg.seed, label_fn, in_memory, cfg.data),
        cond_of=functools.partial(make_cond, cfg.cond, index=index, captions=captions, text_emb=text_emb,
                                  seed=cfg.seed, max_len=cfg.max_len),
        decode=latent_decoder(latent, None, device) if latent and rank == 0 and grids else None)


def random_crop(x, top, left, side):
    """Crop the box (top, left, side x side, fractions of the image) of each image and resize it to full size."""
    zero = torch.zeros_like(side)
    theta = torch.stack([torch.stack([side, zero, 2 * left + side - 1], 1),
                         torch.stack([zero, side, 2 * top + side - 1], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- model and state

def model_config(cfg, data, src=None):
    """(model config, diffusion config) of a new run, from the flags and the dataset; src: the --init-from
    checkpoint, whose network this one continues at this dataset's resolution."""
    model_cfg = dict(num_classes=data.meta["num_classes"], resolution=data.res, channels=data.ch, preset=cfg.preset,
                     cond=cfg.cond)
    if cfg.dropout is not None:
        model_cfg["dropout"] = cfg.dropout
    if cfg.channels:
        model_cfg["ch"] = cfg.channels
    if cfg.cond == "text":
        emb = data.text_emb
        model_cfg.update(text_dim=cfg.text_dim, text_layers=cfg.text_layers, replicate_pad=cfg.replicate_pad,
                         pad_noise=cfg.pad_noise, max_len=cfg.max_len if emb is None else emb.shape[1],
                         ext_dim=None if emb is None else emb.shape[2])
    if cfg.class_ctx is not None:
        model_cfg["class_ctx"] = cfg.class_ctx
    if "transformer" in PRESETS[cfg.preset].get("unet", {}):  # recorded: an ldm4 config without it is the old block
        model_cfg["transformer"] = PRESETS[cfg.preset]["unet"]["transformer"]
    diff_cfg = dict(schedule=cfg.schedule, T=T, prediction=cfg.prediction, shift=cfg.schedule_shift or 1.0,
                    **({"clip": False} if data.latent else {}))  # latents have no [-1, 1] range to clip x0 to
    if src is not None:  # resolution transfer (Berrada et al. 2024) from a run at a lower resolution: every weight
        # is independent of the image size (a DiT's fixed sin-cos positions are recomputed for the new grid); a UNet's
        # attention stays at the same levels (attn_res scaled by new / old resolution); the SNR is divided by
        # (new / old)^2 unless --schedule-shift says otherwise
        old = src["config"]["model"]
        ratio, kind = model_cfg["resolution"] / old["resolution"], "unet" if "unet" in PRESETS[old["preset"]] else "dit"
        if kind not in PRESETS[cfg.preset]:
            raise ValueError(f"--init-from {cfg.init_from} is a {kind.upper()} ({old['preset']}) and --preset "
                             f"{cfg.preset} is not: start from a run of the same backbone, with its --preset")
        shape = ("depth", "dim", "heads", "patch", "freq_shift", "mlp_eps") if kind == "dit" else \
            ("ch", "ch_mult", "num_res_blocks", "head_ch", "transformer", "ff")
        model_cfg.update({k: v for k, v in old.items() if k in shape or k == "class_ctx" and cfg.class_ctx is None})
        if kind == "unet":  # the shape as stored (a released model's among it); attention at the same levels
            model_cfg["attn_res"] = [round(r * ratio) for r in old.get("attn_res", PRESETS[old["preset"]]["unet"]
                                                                         ["attn_res"])]
        if cfg.schedule_shift is None:
            diff_cfg["shift"] = src["config"]["diffusion"].get("shift", 1.0) * ratio
    return model_cfg, diff_cfg


def run_config(cfg, data, model_cfg, diff_cfg, source=None):
    """What config.json and every checkpoint store: the model, the diffusion, the flags as resolved, the dataset (and
    a released model's id and hash, if the run started from one)."""
    config = dict(model=model_cfg, diffusion=diff_cfg, train={k: v for k, v in cfg._asdict().items() if k != "resume"},
                  data=dict(path=os.path.abspath(cfg.data), checksum=data.meta.get("source_checksum"),
                            **{k: data.meta[k] for k in ("num_classes", "class_names", "resolution", "count")},
                            **({"latent": data.latent} if data.latent else {})))
    return dict(config, source=source) if source else config


def init_model(cfg, model_cfg, src, device, memory_format, make=Denoiser):
    """The network, seeded by --seed (make: its class), with --init-from's EMA weights (src) if given."""
    torch.manual_seed(cfg.seed)
    net = make(**model_cfg).to(device, memory_format=memory_format)
    if src is not None:
        load_weights(net, src["ema"], f"--init-from {cfg.init_from}", "this model",
                     "give the --preset, --cond and text flags of that run")
    return net


@dataclasses.dataclass
class State:
    """What the loop changes and a checkpoint holds."""
    net: torch.nn.Module
    ema: torch.nn.Module  # the EMA of net's weights, in eval mode, what grids and sample.py use
    opt: torch.optim.Optimizer
    diffusion: Diffusion
    step: int
    params: list  # the trained parameters (an adapter's only, on a frozen base)
    meter: "LossMeter"
    saved: set = None  # the state-dict entries a checkpoint holds (an adapter's own), or None: all


def build_state(cfg, net, diff_cfg, ckpt, rt, saved=None):
    """EMA, optimizer and step of the network: fresh, or --resume's checkpoint. Every rank starts from rank 0's
    weights."""
    params = [p for p in net.parameters() if p.requires_grad]
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=rt.device.type == "cuda")
    if ckpt is not None:
        load_weights(net, ckpt["model"], cfg.resume)
        load_weights(ema, ckpt["ema"], cfg.resume)
        opt.load_state_dict(ckpt["opt"])
    if rt.ddp:  # equal already (same seed or checkpoint); the broadcast makes sure
        for p in net.parameters():
            dist.broadcast(p.data, 0)
    return State(net, ema, opt, Diffusion(**diff_cfg).to(rt.device), 0 if ckpt is None else ckpt["step"], params,
                 LossMeter(rt.device), saved)


def prepare_run_folder(out, config, corruption, step):
    """config.json, corruption.npz, and log.jsonl cut back to the step the run (re)starts from."""
    os.makedirs(out, exist_ok=True)
    for f in glob.glob(os.path.join(out, "*.tmp*")):  # left by a process killed while writing
        os.remove(f)
    save_json(os.path.join(out, "config.json"), config)
    save_npz(os.path.join(out, "corruption.npz"), **corruption)
    path = os.path.join(out, "log.jsonl")
    if os.path.exists(path):  # a half-written last line (a kill mid-write) is dropped with the lines past the step
        keep = [l for l in open(path, errors="replace") if logged_step(l) <= step]
        save_atomic(path, lambda f: f.write("".join(keep).encode()))


def logged_step(line):
    """The step of a log.jsonl line; infinite for a line that is not a whole record (half-written, garbled)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else math.inf
    except (ValueError, KeyError, TypeError):
        return math.inf


def check_same_run(out, config, stored, **corruption):
    """A resumed run must see the dataset and the corruption it started with, or it would silently train on
    other data: compare the dataset's count and checksum, and the run folder's corruption.npz."""
    for k in ("count", "checksum"):
        if k in stored and stored[k] != config[k]:
            raise ValueError(f"{config['path']} is not the dataset this run started with ({k} {config[k]} vs "
                             f"{stored[k]}): rebuild it as it was, or start a new run")
    path = os.path.join(out, "corruption.npz")
    try:
        old = np.load(path) if os.path.isfile(path) else {}
        changed = [k for k, v in corruption.items() if k in old and not np.array_equal(old[k], v)]
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}): delete it and --resume again") from None
    if changed:
        raise ValueError(f"{path} does not match what this dataset and --data-seed give ({', '.join(changed)}): the "
                         f"dataset changed since the run started; rebuild it as it was, or start a new run")


# ----------------------------------------------------------------------------- one training step

@dataclasses.dataclass
class Draw:
    """Everything random in a step, per sample: the typed batch that draw_step makes and the step passes on."""
    idx: np.ndarray  # dataset positions
    t: torch.Tensor  # timesteps
    noise: torch.Tensor
    cond: torch.Tensor  # conditions (ids made host tensors by data.cond_of), the null one where label dropout struck
    flip: torch.Tensor  # horizontal flips
    delta: torch.Tensor = None  # CEP's delta and the replicate-padding noise on the condition embedding
    crop: torch.Tensor = None  # crop boxes (top, left, side) as fractions of the image (--crop-scale)
    eps: torch.Tensor = None  # a fresh draw from each KL latent's posterior
    ip: torch.Tensor = None  # input perturbation (--ip-gamma)

    def part(self, lo, hi):
        return Draw(**{k: None if v is None else v[lo:hi] for k, v in vars(self).items()})


def draw_step(step, cfg, data, net, device, rank=0, world=1):
    """Everything random in a step, drawn from (seed, step) for the global batch and then cut to this rank's share:
    the run is the same for any number of ranks at the same global batch, and the step is the whole RNG state."""
    batch, shape, crop_scale = cfg.batch_size, (data.ch, data.res, data.res), cfg.crop_scale
    gen = torch.Generator(device=device).manual_seed(seed_of(cfg.seed, step))
    idx, cond_ids = data.batches.indices(step, batch)
    t = torch.randint(0, T, (batch,), generator=gen, device=device)
    noise = torch.randn(batch, *shape, generator=gen, device=device)
    cond = to_device(data.cond_of(cond_ids, step=step), device)
    drop = torch.rand(batch, generator=gen, device=device) < cfg.label_dropout  # the null condition, for CFG
    cond = torch.where(drop.view(-1, *[1] * (cond.dim() - 1)), net.null_cond(cond), cond)
    flip = (torch.rand(batch, generator=gen, device=device) < 0.5) & cfg.hflip
    d = Draw(idx, t, noise, cond, flip, delta=net.cond_noise(cond, cfg.cep, cfg.cep_gamma, gen))
    if crop_scale < 1:
        side = crop_scale + (1 - crop_scale) * torch.rand(batch, generator=gen, device=device)
        top, left = (torch.rand(2, batch, generator=gen, device=device) * (1 - side)).unbind()
        d.crop = torch.stack([top, left, side], 1)
    if data.latent is not None and data.latent["kind"] == "kl":  # a fresh draw from each latent's posterior
        d.eps = torch.randn(batch, *shape, generator=gen, device=device)
    if cfg.ip_gamma:  # drawn last: the other draws stay those of a run without it
        d.ip = cfg.ip_gamma * torch.randn(batch, *shape, generator=gen, device=device)
    return d.part(rank * batch // world, (rank + 1) * batch // world)


def micro_loss(net, diffusion, memory_format, latent_scale, d, x, **inputs):
    """Per-sample loss of a micro-batch d: uint8 NHWC images x to [-1, 1] in the run's layout, cropped and flipped;
    or latents x [b, 2 (image, mirror), K, C, h, w]: the mirror's for a flip, mean + std * eps for a KL autoencoder (a
    fresh draw each step, as EDM2), times the scaling factor. inputs: the network's other inputs (an extension's: a
    control image cropped and flipped with its image by `augment`, control metadata)."""
    if latent_scale is not None:
        x = x[torch.arange(len(x), device=x.device), d.flip.long()].float()
        x = (x[:, 0] if d.eps is None else x[:, 0] + x[:, 1] * d.eps) * latent_scale
    else:
        x = augment(to_float(x).contiguous(memory_format=memory_format), d)
    return diffusion.loss(net, x, d.cond, d.t, d.noise, ip=d.ip, cond_delta=d.delta, **inputs)


def augment(v, d):
    """Images v [b, C, H, W] cropped (d.crop) and flipped (d.flip) as the micro-batch d says."""
    v = v if d.crop is None else random_crop(v, *d.crop.unbind(1))
    return torch.where(d.flip[:, None, None, None], v.flip(3), v)


def train_step(d, *, lr, dropout_seed, loss_fn, fetch, s, accum, grad_clip, rt):
    """One optimizer step on this rank's share d of the draws: accumulate gradients over the micro-batches (each a
    part of d, its inputs fetch(positions) -> {name: tensor}), average them over the ranks, clip, Adam."""
    torch.manual_seed(dropout_seed)
    for g in s.opt.param_groups:
        g["lr"] = lr
    n = len(d.t) // accum
    for m in range(accum):
        mb = d.part(m * n, (m + 1) * n)
        if rt.graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(rt.device.type, torch.bfloat16, enabled=rt.bf16):
            losses = loss_fn(mb, **fetch(mb.idx))
            (losses.mean() / accum).backward()
        s.meter.add(losses.detach(), mb.t)
    if rt.ddp:
        with peers(rt.rank):
            average_gradients(s.params, rt.world)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(s.params, grad_clip)
    s.opt.step()
    s.opt.zero_grad(set_to_none=True)


def average_gradients(params, world):
    """Gradients averaged over the ranks in one all-reduce of all of them, flattened, after the backward pass. No
    DistributedDataParallel: its per-bucket hooks split the compiled graph and keep CUDA graphs out, and at world
    size 1 it cost 14% (issue 9); the price is no overlap of the all-reduce with the backward pass."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def ema_beta(halflife_kimg, rampup, nimg, batch):
    """Per-step EMA decay for a half-life in images, ramped up over the first images as in EDM."""
    halflife = min(halflife_kimg * 1000, nimg * rampup) if rampup else halflife_kimg * 1000
    return 0.5 ** (batch / max(halflife, 1e-8))


def cond_l2(net, data, cond, cep, gamma, seed, n=4096):
    """Chen et al. Fig. 8a's axis: the mean L2 distance of the condition embeddings a model trains with (the
    corrupted label's, plus CEP's delta) from the clean labels' ones, over n seeded draws of training rows; None for
    captions. Input perturbation leaves it at that of the corruption alone."""
    if cond != "class":
        return None
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(len(data.fixed_ids), (n,), generator=g)
    noisy, clean = torch.as_tensor(data.fixed_ids)[rows], torch.as_tensor(data.corruption["clean_labels"])[rows]
    with torch.no_grad():
        w = net.label_embed.embed.weight.detach().float().cpu()
        delta = 0 if cep == "none" else cep_delta(cep, gamma, (n, w.shape[1]), g)
        return (w[noisy] + delta - w[clean]).norm(dim=1).mean().item()


def make_step_fn(cfg, data, s, rt, loss_fn=None, fetch=None):
    """step -> lr: draw, optimizer step, EMA update; the function the training loop and ext/bench.py call. loss_fn(d,
    **fetch(positions)): a micro-batch's per-sample losses; by default micro_loss of the batch's images."""
    loss_fn = loss_fn or functools.partial(micro_loss, s.net, s.diffusion, rt.memory_format,
                                           data.latent["scale"] if data.latent else None)
    fetch = fetch or (lambda idx: dict(x=data.batches.images_at(idx)))
    # one compiled graph per micro-batch; with CUDA graphs its hundreds of kernels are one launch (the step was bound
    # by the host launching them). Checkpoints are saved from `net`: no _orig_mod. keys.
    loss_fn = torch.compile(loss_fn, mode="reduce-overhead" if rt.graphs else None) if rt.compile else loss_fn
    ema_params = [e for e, p in zip(s.ema.parameters(), s.net.parameters()) if p.requires_grad]

    def step_fn(step):
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
        train_step(draw_step(step, cfg, data, s.net, rt.device, rt.rank, rt.world), lr=lr, loss_fn=loss_fn,
                   fetch=fetch, dropout_seed=seed_of(cfg.seed, step, rt.rank, 3),  # per rank, not a global draw
                   s=s, accum=cfg.accum, grad_clip=cfg.grad_clip, rt=rt)
        with torch.no_grad():
            beta = ema_beta(cfg.ema_halflife_kimg, cfg.ema_rampup, (step + 1) * cfg.batch_size, cfg.batch_size)
            torch._foreach_lerp_(ema_params, s.params, 1 - beta)
        return lr
    return step_fn


# ----------------------------------------------------------------------------- logging, checkpoints, grids

class LossMeter:
    """Per-sample losses summed by timestep quartile on the device; read (the loop's only host sync) at log steps."""

    def __init__(self, device):
        self.acc = torch.zeros(2, 4, device=device, dtype=torch.float64)  # loss sums and counts per quartile
        self.t0, self.images = time.perf_counter(), 0

    def add(self, losses, t):
        losses = losses.double()
        self.acc.index_add_(1, t * 4 // T, torch.stack([losses, torch.ones_like(losses)]))

    def read(self, ddp, rank):
        """(mean loss, mean per quartile, images/s) since the last read, over all ranks; then start again."""
        if ddp:
            with peers(rank):
                dist.all_reduce(self.acc)
        (sums, counts), images_per_s = self.acc.tolist(), self.images / (time.perf_counter() - self.t0)
        self.acc.zero_()
        self.t0, self.images = time.perf_counter(), 0
        return sum(sums) / max(sum(counts), 1), [a / b if b else None for a, b in zip(sums, counts)], images_per_s


def save_checkpoint(out, s, config, step, batch_size, snapshot_every):
    """ckpt.pt (and ckpt-<step>.pt every snapshot_every steps), refused if a weight is not finite."""
    if not all(torch.isfinite(p).all() for p in s.net.parameters()):
        raise FloatingPointError(f"non-finite weights at step {step}: stopped; {out}/ckpt.pt keeps the last "
                                 f"good state (try a lower --lr, then --resume)")
    own = lambda sd: sd if s.saved is None else {k: v for k, v in sd.items() if k in s.saved}
    state = dict(format=CKPT_FORMAT, model=own(s.net.state_dict()), ema=own(s.ema.state_dict()),
                 opt=s.opt.state_dict(), step=step, nimg=step * batch_size, config=config)
    save_atomic(os.path.join(out, "ckpt.pt"), lambda f: torch.save(state, f))
    if snapshot_every and step % snapshot_every == 0:
        save_atomic(os.path.join(out, f"ckpt-{step:07d}.pt"), lambda f: torch.save(state, f))


def grid_rows(cond, class_names, captions, text_emb, max_len):
    """(condition of each row, its label, the rows' other inputs {}): up to 16 classes evenly spaced, or the (first)
    captions of the dataset's first 8 images."""
    if cond == "class":
        classes = np.unique(np.linspace(0, len(class_names) - 1, min(len(class_names), 16)).round().astype(np.int64))
        return torch.from_numpy(classes), [class_names[k] for k in classes], {}
    if text_emb is not None:
        rows = np.array(text_emb[:8], dtype=np.float32)
        return torch.from_numpy(rows), [f"embedding {k}" for k in range(len(rows))], {}
    prompts = [c[0] for c in captions[:8]]
    return tokenize(prompts, max_len), prompts, {}


def draw_grid(ema, diffusion, rows, labels, inputs, shape, device, cfg_scale, steps, path, decode=None, ncol=8):
    """ncol samples per row condition (and its other inputs), fixed noise, DDIM from the EMA weights; latents
    decoded."""
    inputs = {k: v.repeat_interleave(ncol, 0) for k, v in inputs.items()}
    x = generate(ema, diffusion, range(len(rows) * ncol), rows.repeat_interleave(ncol, 0), seed=0, shape=shape,
                 device=device, steps=steps, cfg_scale=cfg_scale, decode=decode, inputs=inputs)
    save_grid(path, x, nrow=len(rows), labels=labels)


def train_flops_per_image(net, diffusion, shape, grid, device):
    """Forward+backward FLOPs of one image, counted by torch.utils.flop_counter on a batch of 2 (the grid's first
    row's inputs)."""
    from torch.utils.flop_counter import FlopCounterMode
    rows, _, inputs = grid
    x = torch.randn(2, *shape, device=device)
    t = torch.tensor([10, 500], device=device)
    two = {k: v[:1].repeat_interleave(2, 0).to(device) for k, v in dict(inputs, c=rows).items()}
    with FlopCounterMode(display=False) as fc:
        diffusion.loss(net, x, two.pop("c"), t, torch.randn_like(x), **two).mean().backward()
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


# ----------------------------------------------------------------------------- the loop

def train(cfg, config, data, s, step_fn, grid, rt):
    """Steps until cfg.steps: log every log_every steps, checkpoint and grid every ckpt_every steps and at the end."""
    master, saved, peak, shape = rt.rank == 0, s.step or None, peak_flops(rt.device), (data.ch, data.res, data.res)
    if s.step >= cfg.steps:
        return print(f"{cfg.out} is at step {s.step} of --steps {cfg.steps} already: raise --steps to train on")
    if master and s.step:
        print(f"resuming {cfg.out} from step {s.step}")
    flops_img = train_flops_per_image(s.net, s.diffusion, shape, grid, rt.device) if peak else None
    bar = tqdm(total=cfg.steps, initial=s.step, disable=not master, dynamic_ncols=True, unit="step")
    s.net.train()
    try:
        while s.step < cfg.steps:
            lr = step_fn(s.step)
            s.step += 1
            s.meter.images += cfg.batch_size
            bar.update(1)
            last = s.step == cfg.steps
            if s.step % cfg.log_every == 0 or s.step % cfg.ckpt_every == 0 or last:
                loss, loss_q, images_per_s = s.meter.read(rt.ddp, rt.rank)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {s.step}: stopped; {cfg.out}/ckpt.pt keeps the "
                                             f"last good state (try a lower --lr or --bf16 off, then --resume)")
                rec = dict(step=s.step, loss=loss, loss_q=loss_q, lr=lr, img_per_s=images_per_s,
                           mfu=mfu(flops_img, images_per_s, peak, rt.world), nimg=s.step * cfg.batch_size,
                           cond_l2=cond_l2(s.net, data, cfg.cond, cfg.cep, cfg.cep_gamma, seed_of(cfg.seed, s.step, 5)))
                if master:
                    with open(os.path.join(cfg.out, "log.jsonl"), "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}",
                                    **({"mfu": f"{rec['mfu']:.1%}"} if rec["mfu"] else {}))
            if s.step % cfg.ckpt_every == 0 or last:
                if master:
                    save_checkpoint(cfg.out, s, config, s.step, cfg.batch_size, cfg.snapshot_every)
                    draw_grid(s.ema, s.diffusion, *grid, shape, rt.device, cfg.grid_cfg,
                              cfg.grid_steps, os.path.join(cfg.out, f"grid-{s.step:07d}.png"), data.decode)
                    saved = s.step
                barrier(rt.ddp, rt.rank, "continue it with --resume")
    except KeyboardInterrupt:  # say what there is to continue from
        raise KeyboardInterrupt(f"{cfg.out}/ckpt.pt holds step {saved}: continue with --resume {cfg.out}" if saved else
                                f"no checkpoint yet (the first is written at step {cfg.ckpt_every}): start again, with "
                                f"a lower --ckpt-every to keep earlier steps") from None
    bar.close()
    if master:
        print(f"trained to step {s.step}: {cfg.out}/ckpt.pt, its grid {cfg.out}/grid-{s.step:07d}.png, the log "
              f"{cfg.out}/log.jsonl")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)  # flags checked before anything, the process group included
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        cfg, config, data, s, rt = setup(args, ddp, rank, world, local_rank)
        step_fn = make_step_fn(cfg, data, s, rt)
        if rank == 0:
            prepare_run_folder(cfg.out, config, corruption_record(cfg, data), s.step)
        grid = grid_rows(cfg.cond, data.meta["class_names"], data.captions, data.text_emb, cfg.max_len)
        train(cfg, config, data, s, step_fn, grid, rt)


def setup(args, ddp, rank, world, local_rank, grids=True, make=Denoiser, model=None):
    """Everything a run needs before its first step, each paragraph once: the config (resolved once, then
    read-only), the runtime, the data, and the model's state (fresh, --resume or --init-from). make, model: the
    network's class and its settings beyond the flags' (an extension's: ext/metadata.py), or a function of the
    --init-from source (None without one) that returns them (ext/released.py)."""
    # Configuration
    ckpt = load_checkpoint(args.resume, ext=make is not Denoiser) if args.resume else None
    cfg = resolve_config(args, world, ckpt)
    rt = runtime(cfg, ddp, rank, world, local_rank)

    # Data, model, optimizer
    data = load_data(cfg, rt.device, rank, grids)
    src = load_model(cfg.init_from, with_vae=False, ext=make is not Denoiser) if cfg.init_from and not ckpt else None
    model_cfg, diff_cfg = (ckpt["config"]["model"], ckpt["config"]["diffusion"]) if ckpt else model_config(cfg, data,
                                                                                                           src)
    model_cfg = model_cfg if ckpt else dict(model_cfg, **(model(src) if callable(model) else model or {}))
    config = run_config(cfg, data, model_cfg, diff_cfg, (ckpt or src or {}).get("config", {}).get("source"))
    if ckpt is not None:
        check_same_run(cfg.out, config["data"], ckpt["config"]["data"], **data.corruption)
    s = build_state(cfg, init_model(cfg, model_cfg, src, rt.device, rt.memory_format, make), diff_cfg, ckpt, rt)
    if rank == 0:
        print(summary(cfg, data, s.net, rt))
    return cfg, config, data, s, rt


def runtime(cfg, ddp, rank, world, local_rank):
    """How this process runs (Runtime): its device, and the speed switches resolved for it."""
    device, use_compile, use_bf16 = setup_device(cfg.device, local_rank, cfg.compile, cfg.bf16, tf32=True)
    if ddp and device.type == "cpu":  # several CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    return Runtime(device, rank, world, ddp, use_compile, use_bf16,
                   graphs=use_compile and device.type == "cuda" and cfg.cuda_graphs is not False,
                   memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)


def corruption_record(cfg, data):
    """What corruption.npz holds: the corruption of every position, and how it was drawn."""
    return dict(**data.corruption, seed=cfg.data_seed, eta=cfg.eta, kind=cfg.corruption, mode=cfg.corruption_mode)


def summary(cfg, data, net, rt):
    """The one line a run starts with: model size, data, corruption, CEP, batch split, device and run folder."""
    what = "labels corrupted" if cfg.cond == "class" else "caption embeddings swapped"
    if data.captions is not None:
        what = f"captions swapped, {corrupt.changed_captions(data.captions, data.fixed_ids, data.index)} changed"
    count = lambda ps: f"{sum(p.numel() for p in ps):,}"  # exact: ldm4 is 400,920,579 + the class embedding
    trained = [p for p in net.parameters() if p.requires_grad]
    frozen = f" ({count(trained)} trained)" if len(trained) < len(list(net.parameters())) else ""
    return (f"{count(net.parameters())} parameters{frozen} | {len(data.index)} images, "
            f"{data.meta['num_classes']} classes, cond {cfg.cond} | eta {cfg.eta} "
            f"({int(data.corruption['mask'].sum())} {what}, {cfg.corruption}/{cfg.corruption_mode}) | cep {cfg.cep} | "
            f"batch {cfg.batch_size} = {cfg.world_size} x {cfg.batch_gpu} x {cfg.accum} | {rt.device} "
            f"compile={rt.compile} bf16={rt.bf16} cuda_graphs={rt.graphs} channels_last={cfg.channels_last} | "
            f"{cfg.out}")


if __name__ == "__main__":
    cli(main, "train.py", (ValueError, OSError, FloatingPointError))
