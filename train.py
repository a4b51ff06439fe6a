"""Pre-train a conditional diffusion model on conditions corrupted at ratio eta (Chen et al., NeurIPS 2024):
class labels flipped, or captions swapped.

One process (CPU or one GPU):   python train.py --data data/shapes/train --preset tiny --steps 2000
Several GPUs (DDP):             torchrun --nproc_per_node=8 train.py --eta 0.05
Text-conditional:               python train.py --data data/shapes/train --preset tiny --cond text --eta 0.1
Continue a killed run:          python train.py --resume runs/NAME
Start from a lower resolution:  python train.py --data data/in64/train --preset in64 --init-from runs/in32

Input: a dataset folder from prepare_data.py. Output: a run folder (config.json, corruption.npz, log.jsonl,
ckpt.pt, grid-<step>.png; see README "File formats").

Everything random in a step (timesteps, noise, label dropout, CEP, flips, dropout masks) is drawn from
generators seeded by (seed, step), for the global batch, before it is split over ranks: the run is the same
for any number of GPUs at the same global batch, and the step number is the whole RNG state for --resume.
"""
import argparse
import contextlib
import copy
import glob
import json
import math
import os
import resource
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import corrupt
from model import (CKPT_FORMAT, PRESETS, Denoiser, Diffusion, guided, init_distributed, load_checkpoint, load_weights,
                   neutral_control, resolve_device, sample_noise, save_atomic, save_grid, save_json, save_npz, to_device,
                   to_uint8, tokenize)

# Flags a resumed run may change; every other flag must match the checkpoint's stored config.
RESUMABLE = {"steps", "log_every", "ckpt_every", "snapshot_every", "compile", "cuda_graphs", "batch_gpu", "device",
             "grid_cfg", "grid_steps", "dist_timeout"}
LABEL_CORRUPTIONS = ("symmetric", "asymmetric")
# Dense bf16 tensor-core peaks (FLOP/s) for MFU, from the vendors' data sheets.
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12,
             "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165.2e12}


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data", default="data/cifar10/train", help="dataset split folder from prepare_data.py")
    a("--out", help="run folder (default runs/<dataset>-<preset>-eta<eta>[-cep<kind>])")
    a("--resume", help="run folder or ckpt.pt of a run to continue with its stored config")
    a("--preset", default="cifar", choices=["tiny", "cifar", "in64"])
    a("--channels", type=int, help="UNet base width over the preset's (Zhang et al.'s UNet-64/128/256)")
    a("--dropout", type=float, help="override the preset's dropout")
    a("--schedule", default="linear", choices=["linear", "cosine"], help="noise schedule (paper: linear)")
    a("--prediction", default="eps", choices=["eps", "v"])
    a("--cond", default="class", choices=["class", "text"], help="condition on class labels or on captions")
    a("--eta", type=float, default=0.0, help="fraction of corrupted labels (or swapped captions), in [0, 1)")
    a("--corruption", choices=["symmetric", "asymmetric", "swap"],
      help="label flips (default for class) or caption swaps (default for text)")
    a("--corruption-mode", default="fixed", choices=["fixed", "resample"],
      help="fixed once (paper) or drawn anew each epoch (paper App. E.4)")
    a("--corrupt-classes", help="asymmetric: the class subset (indices or names, comma-separated)")
    a("--cep", default="none", choices=["none", "uniform", "gaussian"], help="condition embedding perturbation")
    a("--cep-gamma", type=float, default=1.0)
    a("--label-dropout", type=float, default=0.1, help="probability of the null class or empty caption (CFG)")
    a("--text-dim", type=int, help="text encoder width (default: by preset, 64/256/384)")
    a("--text-layers", type=int, help="text encoder layers (default: by preset, 2/4/6)")
    a("--max-len", type=int, default=64, help="caption length in UTF-8 bytes (longer captions are cut)")
    a("--text-emb", help="precomputed caption embeddings .npy [N, D] or [N, L, D] in images.npy order, in place of "
                         "the built-in encoder")
    a("--replicate-pad", action=argparse.BooleanOptionalAction, default=True,
      help="noisy replicate padding of the caption tokens (Berrada et al. 2024)")
    a("--pad-noise", type=float, default=0.1, help="std of the replicate-padding noise (training only)")
    a("--control", default="none", choices=["none", "phased", "sum"],
      help="control metadata (crop, size, flip): phased in over the noise level (Berrada et al.) or summed into c_vec")
    a("--crop-scale", type=float, default=1.0, help="random crops of side in [crop-scale, 1] of the image (1: off)")
    a("--init-from", help="run folder to start from (its EMA weights) at this dataset's resolution")
    a("--schedule-shift", type=float, help="divide the SNR by shift^2 (default 1; --init-from: new/old resolution)")
    a("--subset", type=int, help="train on a seeded subset of this many images (Zhang et al. 2024)")
    a("--hflip", action=argparse.BooleanOptionalAction, default=True, help="random horizontal flips")
    a("--batch-size", type=int, default=128, help="global batch over all ranks and accumulation steps")
    a("--batch-gpu", type=int, help="per-rank micro-batch (default: batch-size / world size)")
    a("--lr", type=float, default=2e-4)
    a("--warmup", type=int, default=5000, help="linear lr warm-up steps")
    a("--weight-decay", type=float, default=0.0)
    a("--grad-clip", type=float, default=1.0)
    a("--ema-halflife-kimg", type=float, default=500.0, help="EMA half-life in thousands of images")
    a("--ema-rampup", type=float, default=0.05, help="half-life is at most this fraction of images seen (0: off)")
    a("--steps", type=int, default=800_000)
    a("--seed", type=int, default=0, help="training randomness")
    a("--data-seed", type=int, default=0, help="corruption and subset")
    a("--log-every", type=int, default=100)
    a("--ckpt-every", type=int, default=5000, help="save ckpt.pt and a sample grid every N steps")
    a("--snapshot-every", type=int, default=0, help="also keep ckpt-<step>.pt every N steps (0: never)")
    a("--grid-cfg", type=float, default=1.0, help="guidance scale of the sample grid")
    a("--grid-steps", type=int, default=50, help="DDIM steps of the sample grid")
    a("--device", default="auto", help="auto, cpu or cuda")
    a("--dist-timeout", type=float, default=600, help="seconds a rank waits for the others before it gives up")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile (default: on CUDA)")
    a("--bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on CUDA)")
    a("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
      help="CUDA graphs for the compiled step (torch.compile mode reduce-overhead; default: on with --compile on CUDA)")
    a("--channels-last", action="store_true", help="NHWC weights and inputs (measured 8%% slower than NCHW on an H100 "
                                                   "with CUDA graphs: see README; fixed for a run)")
    a("--bench", type=int, default=0, help="time N steps after warm-up, print images/s, memory, MFU, and exit")
    a("--bench-wait", action="store_true", help="bench: after compiling, wait for a line on stdin (bench.py times "
                                                "variants one at a time that compiled in parallel)")
    return p


def parse_args(argv=None):
    p = get_parser()
    args = p.parse_args(argv)
    p.set_defaults(**{k: None for k in vars(args)})
    args.given = sorted(k for k, v in vars(p.parse_args(argv)).items() if v is not None)
    return args


def check_args(a):
    corrupt.check_eta(a.eta)
    a.corruption = a.corruption or ("swap" if a.cond == "text" else "symmetric")
    if (a.corruption == "swap") != (a.cond == "text"):
        raise ValueError(f"--corruption {a.corruption} does not go with --cond {a.cond}: labels are flipped "
                         f"(symmetric, asymmetric), captions swapped (swap)")
    if a.text_emb and a.cond != "text":
        raise ValueError("--text-emb needs --cond text")
    if not 0 < a.crop_scale <= 1 or a.pad_noise < 0 or a.max_len < 2:
        raise ValueError("--crop-scale must be in (0, 1], --pad-noise >= 0 and --max-len >= 2")
    for k in ("batch_size", "steps", "log_every", "ckpt_every"):
        if getattr(a, k) < 1:
            raise ValueError(f"--{k.replace('_', '-')} must be at least 1")
    if not 0 <= a.label_dropout < 1:
        raise ValueError("--label-dropout must be in [0, 1)")
    if a.cep_gamma < 0 or a.lr <= 0 or a.warmup < 0 or a.ema_halflife_kimg < 0:
        raise ValueError("--cep-gamma, --warmup and --ema-halflife-kimg must be >= 0 and --lr > 0")
    if a.corruption == "asymmetric" and not a.corrupt_classes:
        raise ValueError("--corruption asymmetric needs --corrupt-classes")


def seed_of(*key):
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


# ----------------------------------------------------------------------------- data

def load_dataset(path, subset, data_seed):
    for f in ("images.npy", "labels.npy", "meta.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"{path}/{f} missing: build the dataset with prepare_data.py "
                                    f"(e.g. python prepare_data.py --dataset shapes)")
    try:
        meta = json.load(open(os.path.join(path, "meta.json")))
        num_classes, names = int(meta["num_classes"]), list(meta["class_names"])
        images = np.load(os.path.join(path, "images.npy"), mmap_mode="r")
        labels = np.load(os.path.join(path, "labels.npy"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read meta.json (with num_classes, class_names), images.npy or labels.npy "
                         f"({type(e).__name__}: {str(e)[:80]}); rebuild the dataset with prepare_data.py") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(labels) or labels.ndim != 1:
        raise ValueError(f"{path}: images.npy must be uint8 [N, H, W, C] and labels.npy [N], found {images.dtype} "
                         f"{list(images.shape)} and {list(labels.shape)}; rebuild the dataset with prepare_data.py")
    if len(names) != num_classes or images.shape[1] != images.shape[2] or meta.get("resolution") != images.shape[1] \
            or not len(labels) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{path}: meta.json does not describe its arrays (num_classes, class_names, resolution, "
                         f"labels in [0, num_classes)); rebuild the dataset with prepare_data.py")
    index = np.arange(len(labels))
    if subset:
        if not 1 <= subset <= len(labels):
            raise ValueError(f"--subset must be in [1, {len(labels)}]")
        index = np.sort(np.random.default_rng([data_seed, 1]).choice(len(labels), subset, replace=False))
        labels = labels[index]
    return images, labels.astype(np.int64), index, meta


def load_text(args, path, count):
    """(captions, embeddings): the dataset's captions.jsonl, or --text-emb [N, L, D] (memory-mapped)."""
    if not args.text_emb:
        return corrupt.read_captions(path, count), None
    try:
        emb = np.load(args.text_emb, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read --text-emb {args.text_emb} as .npy ({type(e).__name__})") from None
    if emb.ndim not in (2, 3) or len(emb) != count or not np.issubdtype(emb.dtype, np.floating):
        raise ValueError(f"--text-emb {args.text_emb} is {emb.dtype} {list(emb.shape)}: want float [{count}, D] or "
                         f"[{count}, L, D], one row per image in images.npy order")
    return None, emb.reshape(count, -1, emb.shape[-1])


class Batches:
    """Global batch i = positions [i*B, (i+1)*B) of a stream of seeded per-epoch permutations (resumable by step)."""

    def __init__(self, images, labels, index, device, seed, label_fn, in_memory):
        self.n, self.seed, self.device, self.label_fn = len(labels), seed, device, label_fn
        self.index = index
        self.images = images
        if in_memory:  # small sets (CIFAR) live on the device: no loader workers needed
            self.images = torch.from_numpy(np.ascontiguousarray(images[index])).to(device)
            self.index = None
        self._epoch, self._perm, self._labels = None, None, None

    def _epoch_data(self, e):
        if e != self._epoch:
            self._epoch, self._perm = e, np.random.default_rng([self.seed, 2, e]).permutation(self.n)
            self._labels = torch.from_numpy(self.label_fn(e))
        return self._perm, self._labels

    def indices(self, step, batch):
        """Positions in the (subset) dataset and their (possibly corrupted) labels for global batch `step`."""
        idx, lab = [], []
        pos = step * batch
        while len(idx) < batch:
            e, off = divmod(pos, self.n)
            perm, labels = self._epoch_data(e)
            take = perm[off:off + batch - len(idx)]
            idx.extend(take)
            lab.append(labels[take])
            pos += len(take)
        return np.array(idx), torch.cat(lab)

    def images_at(self, idx):
        """uint8 [b, H, W, C] on the device (made float in the compiled step)."""
        if self.index is None:
            return self.images[to_device(torch.from_numpy(idx), self.device)]
        rows = self.index[idx]
        order = np.argsort(rows)  # sorted reads from the mmap, then back to batch order
        x = np.empty((len(rows),) + self.images.shape[1:], np.uint8)
        x[order] = self.images[rows[order]]
        return to_device(torch.from_numpy(x), self.device)


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


def make_label_fn(args, labels, num_classes, class_names):
    """epoch -> training labels (captions: the image whose caption each image gets); fixed corruption is computed
    once, resample mode per epoch (App. E.4)."""
    if args.corruption == "swap":
        fixed, mask = corrupt.corrupt_captions(len(labels), args.eta, args.data_seed)
        if args.corruption_mode == "fixed":
            return (lambda e: fixed), fixed, mask
        return (lambda e: corrupt.corrupt_captions(len(labels), args.eta, args.data_seed, epoch=e)[0]), fixed, mask
    classes = corrupt.parse_classes(args.corrupt_classes, class_names) if args.corruption == "asymmetric" else None
    fixed, mask = corrupt.corrupt_labels(labels, args.eta, num_classes, args.data_seed, classes)
    if args.corruption_mode == "fixed":
        return (lambda e: fixed), fixed, mask
    return (lambda e: corrupt.corrupt_labels(labels, args.eta, num_classes, args.data_seed, classes, epoch=e)[0]), \
        fixed, mask


def make_cond(args, y, index, captions, text_emb, step):
    """Host-side condition of a global batch: class labels, byte tokens of one caption per image (which one is
    drawn by (seed, step)), or precomputed caption embeddings. For captions y holds the (swapped) caption's image."""
    if args.cond == "class":
        return y
    rows = index[y.numpy()]
    if text_emb is not None:
        return torch.from_numpy(np.asarray(text_emb[rows], dtype=np.float32))
    rng = np.random.default_rng([args.seed, step, 4])
    return tokenize([captions[r][rng.integers(len(captions[r]))] for r in rows], args.max_len)


def random_crop(x, top, left, side):
    """Crop the box (top, left, side x side, fractions of the image) of each image and resize it to full size."""
    zero = torch.zeros_like(side)
    theta = torch.stack([torch.stack([side, zero, 2 * left + side - 1], 1),
                         torch.stack([zero, side, 2 * top + side - 1], 1)], 1)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


# ----------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def peers(rank):
    """Around a collective: another rank's death (gloo: a RuntimeError; NCCL: an error or the --dist-timeout)
    ends the run with one line instead of a traceback."""
    try:
        yield
    except RuntimeError as e:
        raise OSError(f"rank {rank} lost the other ranks ({str(e).splitlines()[0][:150]}): the run stops; continue "
                      f"it with --resume") from None


def average_gradients(params, world):
    """Gradients averaged over the ranks in one all-reduce of all of them, flattened, after the backward pass. No
    DistributedDataParallel: its per-bucket hooks split the compiled graph and keep CUDA graphs out, and at world
    size 1 it cost 14% (issue 9); the price is no overlap of the all-reduce with the backward pass."""
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    torch._foreach_copy_(grads, [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)])


def ema_beta(args, nimg, batch):
    """Per-step EMA decay for a half-life in images, ramped up over the first images as in EDM."""
    halflife = args.ema_halflife_kimg * 1000
    if args.ema_rampup:
        halflife = min(halflife, nimg * args.ema_rampup)
    return 0.5 ** (batch / max(halflife, 1e-8))


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def train_flops_per_image(net, diffusion, shape, c, device):
    """Forward+backward FLOPs of one image, counted by torch.utils.flop_counter on a batch of 2 (conditions c)."""
    from torch.utils.flop_counter import FlopCounterMode
    x = torch.randn(2, *shape, device=device)
    t = torch.tensor([10, 500], device=device)
    with FlopCounterMode(display=False) as fc:
        diffusion.loss(net, x, c[:2].to(device), t, torch.randn_like(x)).mean().backward()
    net.zero_grad(set_to_none=True)
    return fc.get_total_flops() / 2


def grid_rows(args, num_classes, captions, text_emb):
    """(condition of each row, captions to print under them): up to 16 classes evenly spaced, or the (first)
    captions of the dataset's first 8 images."""
    if args.cond == "class":
        classes = np.unique(np.linspace(0, num_classes - 1, min(num_classes, 16)).round().astype(np.int64))
        return torch.from_numpy(classes), None
    if text_emb is not None:
        return torch.from_numpy(np.array(text_emb[:8], dtype=np.float32)), None
    prompts = [c[0] for c in captions[:8]]
    return tokenize(prompts, args.max_len), prompts


def draw_grid(ema, diffusion, rows, captions, ctrl_size, shape, device, cfg_scale, steps, path, ncol=8):
    """ncol samples per row condition, fixed noise, DDIM from the EMA weights, no crop and no flip."""
    c = rows.repeat_interleave(ncol, 0).to(device)
    x = sample_noise(0, range(len(c)), shape).to(device)
    ctrl = neutral_control(len(c), shape[-1], ctrl_size, device) if ema.control_mode else None
    with torch.no_grad():
        x = diffusion.sample(guided(ema, c, cfg_scale, ctrl), x, "ddim", steps)
    save_grid(path, to_uint8(x), nrow=len(rows), captions=captions)


def init_from(args, model_cfg, diff_cfg):
    """Resolution transfer (Berrada et al. 2024): the checkpoint of a run at a lower resolution. Every weight of the
    UNet is independent of the image size, so all carry over: attention stays at the same levels (attn_res scaled by
    new / old resolution) and the SNR is divided by (new / old)^2 unless --schedule-shift says otherwise."""
    src = load_checkpoint(args.init_from)
    old = src["config"]["model"]
    ratio = model_cfg["resolution"] / old["resolution"]
    model_cfg["attn_res"] = [round(r * ratio) for r in old.get("attn_res", PRESETS[old["preset"]]["attn_res"])]
    if args.schedule_shift is None:
        diff_cfg["shift"] = src["config"]["diffusion"].get("shift", 1.0) * ratio
    args.schedule_shift = diff_cfg["shift"]  # stored resolved
    return src


def trim_log(path, step):
    """Drop log lines past the checkpoint a resumed run restarts from."""
    if os.path.exists(path):
        keep = [l for l in open(path) if l.strip() and json.loads(l)["step"] <= step]
        save_atomic(path, lambda f: f.write("".join(keep).encode()))


# ----------------------------------------------------------------------------- main

def main(argv=None):
    args = parse_args(argv)
    ddp = "RANK" in os.environ
    rank, world = init_distributed(args.device, args.dist_timeout) if ddp else (0, 1)
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if ddp else 0
    try:
        return run(args, rank, world, local_rank, ddp)
    finally:
        if ddp:
            dist.destroy_process_group()


def resolve_resume(args):
    ckpt = load_checkpoint(args.resume)
    stored = ckpt["config"]["train"]
    for k in args.given:
        if k not in RESUMABLE | {"resume", "out"} and getattr(args, k) != stored.get(k):
            raise ValueError(f"--{k.replace('_', '-')} differs from the checkpoint's stored value "
                             f"{stored.get(k)!r}; a resumed run keeps its config (only {', '.join(sorted(RESUMABLE))} "
                             f"may change)")
    new = {k: getattr(args, k) for k in args.given if k in RESUMABLE}
    resume, given = args.resume, args.given
    for k, v in stored.items():
        setattr(args, k, v)
    for k, v in new.items():
        setattr(args, k, v)
    args.resume, args.given = resume, given
    args.out = args.out if "out" in given else os.path.dirname(os.path.join(resume, "ckpt.pt")
                                                                 if os.path.isdir(resume) else resume)
    return ckpt


def run(args, rank, world, local_rank, ddp):
    master = rank == 0
    ckpt = resolve_resume(args) if args.resume else None
    check_args(args)
    device = resolve_device(args.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # a run's convolution shapes never change: pick the fastest once
    elif ddp:  # several CPU ranks on one machine share its cores
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))
    use_compile = args.compile if args.compile is not None else device.type == "cuda"
    use_bf16 = (args.bf16 if args.bf16 is not None else True) and device.type == "cuda"
    use_graphs = use_compile and device.type == "cuda" and args.cuda_graphs is not False

    # global batch = world x batch_gpu x accumulation
    batch_gpu = args.batch_gpu or args.batch_size // world
    if args.batch_size % world or batch_gpu < 1 or (args.batch_size // world) % batch_gpu:
        raise ValueError(f"--batch-size {args.batch_size} must split into {world} ranks x --batch-gpu {batch_gpu} "
                         f"x a whole number of accumulation steps")
    accum = args.batch_size // world // batch_gpu

    images, clean_labels, index, meta = load_dataset(args.data, args.subset, args.data_seed)
    num_classes, res, ch = meta["num_classes"], images.shape[1], images.shape[3]
    captions, text_emb = load_text(args, args.data, len(images)) if args.cond == "text" else (None, None)
    sizes_path = os.path.join(args.data, "sizes.npy")
    sizes = np.load(sizes_path) if args.control != "none" and os.path.isfile(sizes_path) else None
    label_fn, fixed_labels, mask = make_label_fn(args, clean_labels, num_classes, meta["class_names"])
    in_memory = len(index) * int(np.prod(images.shape[1:])) < 8 << 30
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    data = Batches(images, clean_labels, index, device, args.seed, label_fn, in_memory)

    src = None
    if ckpt is not None:  # the model and schedule a run started with, --init-from included
        model_cfg, diff_cfg = ckpt["config"]["model"], ckpt["config"]["diffusion"]
    else:
        model_cfg = dict(num_classes=num_classes, resolution=res, channels=ch, preset=args.preset, cond=args.cond)
        if args.dropout is not None:
            model_cfg["dropout"] = args.dropout
        if args.channels:
            model_cfg["ch"] = args.channels
        if args.cond == "text":
            model_cfg.update(text_dim=args.text_dim, text_layers=args.text_layers, replicate_pad=args.replicate_pad,
                             pad_noise=args.pad_noise, max_len=args.max_len if text_emb is None else text_emb.shape[1],
                             ext_dim=None if text_emb is None else text_emb.shape[2])
        if args.control != "none":
            model_cfg["control"] = args.control
        diff_cfg = dict(schedule=args.schedule, T=1000, prediction=args.prediction, shift=args.schedule_shift or 1.0)
        src = init_from(args, model_cfg, diff_cfg) if args.init_from else None
    train_cfg = {k: v for k, v in vars(args).items() if k not in ("resume", "given")}
    train_cfg.update(batch_gpu=batch_gpu, world_size=world, accum=accum)
    control_size = np.median(sizes, 0).round().astype(int).tolist() if sizes is not None else [res, res]
    config = dict(model=model_cfg, diffusion=diff_cfg, train=train_cfg,
                  data=dict(path=os.path.abspath(args.data), control_size=control_size,
                            checksum=meta.get("source_checksum"),
                            **{k: meta[k] for k in ("num_classes", "class_names", "resolution", "count")}))
    if args.out is None:
        dataset = os.path.basename(os.path.dirname(os.path.abspath(args.data)))
        cep = "" if args.cep == "none" else f"-cep{args.cep}"
        text = "-text" if args.cond == "text" else ""
        args.out = os.path.join("runs", f"{dataset}-{args.preset}{text}-eta{args.eta:g}{cep}")
    torch.manual_seed(args.seed)
    net = Denoiser(**model_cfg).to(device, memory_format=memory_format)
    diffusion = Diffusion(**diff_cfg).to(device)
    step = 0
    conds = dict(labels=fixed_labels, clean_labels=clean_labels) if args.cond == "class" else dict(source=fixed_labels)
    if ckpt is not None:
        check_same_run(args.out, config["data"], ckpt["config"]["data"], mask=mask, index=index, **conds)
        load_weights(net, ckpt["model"], args.resume)
    elif src is not None:
        try:
            net.load_state_dict(src["ema"])
        except RuntimeError as e:
            detail = [l.strip() for l in str(e).splitlines()[1:2]]
            raise ValueError(f"--init-from {args.init_from}: its weights do not fit this model ({'; '.join(detail)}); "
                             f"give the --preset, --cond and text/control flags of that run") from None
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                            fused=device.type == "cuda")
    if ckpt is not None:
        load_weights(ema, ckpt["ema"], args.resume)
        opt.load_state_dict(ckpt["opt"])
        step = ckpt["step"]
    elif not args.bench and os.path.exists(os.path.join(args.out, "ckpt.pt")):
        raise ValueError(f"{args.out} already holds a run: continue it with --resume {args.out} or pick another --out")

    grid_c, grid_captions = grid_rows(args, num_classes, captions, text_emb)
    peak = peak_flops(device)
    flops_img = train_flops_per_image(net, diffusion, (ch, res, res), grid_c.repeat_interleave(2, 0), device) \
        if peak or args.bench else None
    mfu = lambda images_per_s: flops_img * images_per_s / (peak * world) if peak else None
    if ddp:  # every rank starts from rank 0's weights (they are equal already: same seed or checkpoint)
        for p in net.parameters():
            dist.broadcast(p.data, 0)

    def micro_loss(x, flip, crop, c, t, noise, delta, ctrl):
        """Per-sample loss of one micro-batch: uint8 NHWC images to [-1, 1] in the run's layout, crop, flip."""
        x = (x.permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous(memory_format=memory_format)
        if crop is not None:
            x = random_crop(x, *crop)
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return diffusion.loss(net, x, c, t, noise, delta, ctrl)
    # one compiled graph per micro-batch; with CUDA graphs its hundreds of kernels are one launch (the step was bound
    # by the host launching them). Checkpoints are saved from `net`: no _orig_mod. keys.
    loss_fn = torch.compile(micro_loss, mode="reduce-overhead" if use_graphs else None) if use_compile else micro_loss
    if master:
        n_params = sum(p.numel() for p in net.parameters())
        if args.cond == "class":
            what = "labels corrupted"
        elif captions is None:
            what = "caption embeddings swapped"
        else:  # a swap between two identical captions changes nothing
            changed = sum(captions[index[i]] != captions[index[j]] for i, j in enumerate(fixed_labels))
            what = f"captions swapped, {changed} changed"
        print(f"{n_params / 1e6:.2f}M parameters | {len(index)} images, {num_classes} classes, cond {args.cond} | "
              f"eta {args.eta} ({int(mask.sum())} {what}, {args.corruption}/{args.corruption_mode}) | cep {args.cep} | "
              f"batch {args.batch_size} = {world} x {batch_gpu} x {accum} | {device} compile={use_compile} "
              f"bf16={use_bf16} cuda_graphs={use_graphs} channels_last={args.channels_last} | {args.out}")
        if not args.bench:
            os.makedirs(args.out, exist_ok=True)
            for f in glob.glob(os.path.join(args.out, "*.tmp*")):  # left by a process killed while writing
                os.remove(f)
            save_json(os.path.join(args.out, "config.json"), config)
            save_npz(os.path.join(args.out, "corruption.npz"), mask=mask, index=index, seed=args.data_seed,
                     eta=args.eta, kind=args.corruption, mode=args.corruption_mode, **conds)
            trim_log(os.path.join(args.out, "log.jsonl"), step)

    def save(step):
        if not all(torch.isfinite(p).all() for p in params):
            raise FloatingPointError(f"non-finite weights at step {step}: stopped; {args.out}/ckpt.pt keeps the last "
                                     f"good state (try a lower --lr, then --resume)")
        state = dict(format=CKPT_FORMAT, model=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                     step=step, nimg=step * args.batch_size, config=config)
        save_atomic(os.path.join(args.out, "ckpt.pt"), lambda f: torch.save(state, f))
        if args.snapshot_every and step % args.snapshot_every == 0:
            save_atomic(os.path.join(args.out, f"ckpt-{step:07d}.pt"), lambda f: torch.save(state, f))
        draw_grid(ema, diffusion, grid_c, grid_captions, control_size, (ch, res, res), device, args.grid_cfg,
                  args.grid_steps, os.path.join(args.out, f"grid-{step:07d}.png"))

    gen = torch.Generator(device=device)
    T, B = diffusion.T, args.batch_size
    loss_sum = torch.zeros(4, device=device, dtype=torch.float64)  # per timestep quartile
    loss_cnt = torch.zeros(4, device=device, dtype=torch.float64)
    params, ema_params = list(net.parameters()), list(ema.parameters())
    warmup = min(10, args.bench)  # compile, graph capture, cudnn's search: none of it is timed
    end = step + warmup + args.bench if args.bench else args.steps
    bar = tqdm(total=end, initial=step, disable=not master, dynamic_ncols=True, unit="step")
    t_log, n_log, bench_t0 = time.perf_counter(), 0, None
    net.train()
    while step < end:
        if args.bench_wait and step == end - args.bench - warmup + 1:  # compiled (first step): bench.py says go on
            print("bench: compiled, waiting", flush=True)
            sys.stdin.readline()
        if args.bench and step == end - args.bench:  # warm-up over: start the clock
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            bench_t0 = time.perf_counter()
        idx, y = data.indices(step, B)
        gen.manual_seed(seed_of(args.seed, step))
        t = torch.randint(0, T, (B,), generator=gen, device=device)
        noise = torch.randn(B, ch, res, res, generator=gen, device=device)
        c = to_device(make_cond(args, y, index, captions, text_emb, step), device)
        drop = torch.rand(B, generator=gen, device=device) < args.label_dropout
        c = torch.where(drop.view(-1, *[1] * (c.dim() - 1)), net.null_cond(c), c)
        flip = (torch.rand(B, generator=gen, device=device) < 0.5) & args.hflip
        delta = net.cond_noise(c, args.cep, args.cep_gamma, gen)  # CEP, and the replicate-padding noise
        top, left, side = torch.zeros(B, device=device), torch.zeros(B, device=device), torch.ones(B, device=device)
        if args.crop_scale < 1:
            side = args.crop_scale + (1 - args.crop_scale) * torch.rand(B, generator=gen, device=device)
            top, left = (torch.rand(2, B, generator=gen, device=device) * (1 - side)).unbind()
        ctrl = None
        if args.control != "none":  # what was done to each image: the crop box, its original size, the flip
            hw = to_device(torch.from_numpy(sizes[index[idx]]), device).float() if sizes is not None else \
                torch.full((B, 2), float(res), device=device)
            ctrl = torch.cat([torch.stack([top, left, side, side], 1), hw, flip[:, None].float()], 1)
        torch.manual_seed(seed_of(args.seed, step, rank, 3))  # dropout masks
        lr = args.lr * min(1.0, (step + 1) / max(args.warmup, 1))
        for g in opt.param_groups:
            g["lr"] = lr
        for m in range(accum):
            sl = slice(rank * B // world + m * batch_gpu, rank * B // world + (m + 1) * batch_gpu)
            if use_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(device.type, torch.bfloat16, enabled=use_bf16):
                losses = loss_fn(data.images_at(idx[sl]), flip[sl], None if args.crop_scale == 1 else
                                 (top[sl], left[sl], side[sl]), c[sl], t[sl], noise[sl],
                                 None if delta is None else delta[sl], None if ctrl is None else ctrl[sl])
                (losses.mean() / accum).backward()
            q = t[sl] * 4 // T
            loss_sum.index_add_(0, q, losses.detach().double())
            loss_cnt.index_add_(0, q, torch.ones_like(q, dtype=torch.float64))
        if ddp:
            with peers(rank):
                average_gradients(params, world)
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1 - ema_beta(args, step * B, B))
        bar.update(1)
        n_log += B

        if args.bench:
            continue
        last = step == end
        if step % args.log_every == 0 or step % args.ckpt_every == 0 or last:  # the only host syncs of the loop
            if ddp:
                with peers(rank):
                    dist.all_reduce(loss_sum)
                    dist.all_reduce(loss_cnt)
            s, c = loss_sum.tolist(), loss_cnt.tolist()
            loss = sum(s) / max(sum(c), 1)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}: stopped; {args.out}/ckpt.pt keeps the last "
                                         f"good state (try a lower --lr or --bf16 off, then --resume)")
            dt = time.perf_counter() - t_log
            rec = dict(step=step, loss=loss, loss_q=[a / b if b else None for a, b in zip(s, c)], lr=lr,
                       img_per_s=n_log / dt, mfu=mfu(n_log / dt),
                       nimg=step * B)
            if master:
                with open(os.path.join(args.out, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rec['img_per_s']:.0f}",
                                **({"mfu": f"{rec['mfu']:.1%}"} if peak else {}))
            loss_sum.zero_()
            loss_cnt.zero_()
            t_log, n_log = time.perf_counter(), 0
        if step % args.ckpt_every == 0 or last:
            if master:
                save(step)
            if ddp:
                with peers(rank):
                    dist.barrier()
    bar.close()

    if args.bench:
        if device.type == "cuda":
            torch.cuda.synchronize()
            mem = torch.cuda.max_memory_allocated() / 2 ** 30
        else:
            mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        dt = (time.perf_counter() - bench_t0) / args.bench
        r = dict(images_per_s=args.batch_size / dt, step_ms=dt * 1000, peak_mem_gib=mem,
                 gflop_per_image=flops_img / 1e9, mfu=mfu(args.batch_size / dt))
        if master:
            print(f"bench {args.preset} batch {args.batch_size} on {world}x "
                  f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'} compile={use_compile} "
                  f"bf16={use_bf16}: {r['images_per_s']:.1f} images/s, {r['step_ms']:.1f} ms/step, peak memory "
                  f"{mem:.2f} GiB, {r['gflop_per_image']:.2f} GFLOP/image (fwd+bwd), MFU "
                  + (f"{r['mfu']:.1%} of bf16 dense peak" if peak else "n/a (peak unknown)"))
        return r


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, FloatingPointError) as e:
        sys.exit(f"train.py: error: {e}")
    except KeyboardInterrupt:
        sys.exit("train.py: interrupted; the last checkpoint is complete: continue with --resume")
