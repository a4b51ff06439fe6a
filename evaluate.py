"""Evaluate samples: FID, sFID, Inception Score, precision/recall; reproducibility, memorization; the eta report.

    python evaluate.py --samples runs/NAME/samples.npz --ref data/cifar10/train [--inception-weights PATH]
    python evaluate.py repro A.npz B.npz [--features sscd.torchscript.pt --feat-size 320 --feat-norm imagenet]
    python evaluate.py memorization --samples S.npz --ref data/cifar10/train
    python evaluate.py classify --samples S.npz --ref data/shapes/train   # does each sample show its condition?
    python evaluate.py diversity --samples S.npz --ref runs/NAME [--vq VQMODEL]   # RMD, NN L2, entropy (Chen et al.)
    python evaluate.py gmm [--dims 4,16,64]   # Chen et al. Sec. 4 simulated: entropy and W2 gains on a Gaussian mixture
    python evaluate.py report runs/* [--out report]

Input: samples.npz from sample.py, a reference dataset folder (or statistics npz). Output: metrics.json (or
repro.json, memorization.json, classify.json, diversity.json) beside the samples; report.md and report.png for
`report`; gmm.json and gmm.png for `gmm`.

The Inception network is the FID variant of Inception-v3 (TensorFlow's inception-2015-12-05 as ported by
pytorch-fid), written out here so that its published weights load with strict=True. One pass gives the pool
features (FID, precision/recall), the logits without bias (IS) and the Mixed_6d spatial features (sFID), as in
the ADM evaluation suite.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import re
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

from model import PRESETS, load_autoencoder
from plumbing import (Interval, check_flags, cli, download, file_hash, read_dataset, resolve_device, save_atomic,
                      save_json, save_npz)

WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
WEIGHTS_NAME = os.path.basename(WEIGHTS_URL)
WEIGHTS_SHA_PREFIX = "6726825d"
MIN_FID_SAMPLES = 2048


# ----------------------------------------------------------------------------- Inception-v3, FID variant

class BasicConv(nn.Module):
    def __init__(self, cin, cout, kernel_size, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):  # TensorFlow's average pool leaves the zero padding out of the mean
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv(cin, 48, 1), BasicConv(48, 64, 5, padding=2)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv(cin, 64, 1), BasicConv(64, 96, 3, padding=1)
        self.branch3x3dbl_3, self.branch_pool = BasicConv(96, 96, 3, padding=1), BasicConv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3, self.branch3x3dbl_1 = BasicConv(cin, 384, 3, stride=2), BasicConv(cin, 64, 1)
        self.branch3x3dbl_2, self.branch3x3dbl_3 = BasicConv(64, 96, 3, padding=1), BasicConv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1, self.branch_pool = BasicConv(cin, 192, 1), BasicConv(cin, 192, 1)
        self.branch7x7_1, self.branch7x7_2 = BasicConv(cin, c7, 1), BasicConv(c7, c7, **row)
        self.branch7x7_3, self.branch7x7dbl_1 = BasicConv(c7, 192, **col), BasicConv(cin, c7, 1)
        self.branch7x7dbl_2, self.branch7x7dbl_3 = BasicConv(c7, c7, **col), BasicConv(c7, c7, **row)
        self.branch7x7dbl_4, self.branch7x7dbl_5 = BasicConv(c7, c7, **col), BasicConv(c7, 192, **row)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv(cin, 192, 1), BasicConv(192, 320, 3, stride=2)
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_1, self.branch7x7x3_2 = BasicConv(cin, 192, 1), BasicConv(192, 192, **row)
        self.branch7x7x3_3, self.branch7x7x3_4 = BasicConv(192, 192, **col), BasicConv(192, 192, 3, stride=2)

    def forward(self, x):
        d = x
        for i in range(1, 5):
            d = getattr(self, f"branch7x7x3_{i}")(d)
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), d, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, pool):
        super().__init__()
        self.pool = pool  # "avg" in Mixed_7b; the FID graph has a 3x3 max pool in Mixed_7c
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1, self.branch3x3_1, self.branch_pool = BasicConv(cin, 320, 1), BasicConv(cin, 384, 1), \
            BasicConv(cin, 192, 1)
        self.branch3x3_2a, self.branch3x3_2b = BasicConv(384, 384, **row), BasicConv(384, 384, **col)
        self.branch3x3dbl_1, self.branch3x3dbl_2 = BasicConv(cin, 448, 1), BasicConv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a, self.branch3x3dbl_3b = BasicConv(384, 384, **row), BasicConv(384, 384, **col)

    def forward(self, x):
        b = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        p = avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b), self.branch3x3_2b(b),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(p)], 1)


class FIDInception(nn.Module):
    """uint8 [B, H, W, C] -> (pool [B, 2048], logits without bias [B, 1008], spatial [B, 2023])."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = BasicConv(3, 32, 3, stride=2), BasicConv(32, 32, 3)
        self.Conv2d_2b_3x3, self.Conv2d_3b_1x1 = BasicConv(32, 64, 3, padding=1), BasicConv(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, "avg"), InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() / 255
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        x = F.max_pool2d(self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x))), 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c"):
            x = getattr(self, f"Mixed_{name}")(x)
        # sFID (ADM): the first 7 channels of "mixed_6/conv", Mixed_6d's 1x1 branch, flattened as (h, w, c)
        spatial = self.Mixed_6d.branch1x1(x)[:, :7].permute(0, 2, 3, 1).flatten(1)
        for name in ("6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean((2, 3))
        return pool, F.linear(pool, self.fc.weight), spatial


def weights_path(path=None):
    """--inception-weights, else the cache (downloaded on first use, checked against the sha256 in its name)."""
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception-weights {path} does not exist")
        return path
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "slightdiff")
    dest = os.path.join(cache, WEIGHTS_NAME)
    if not os.path.isfile(dest):
        download(WEIGHTS_URL, dest, "sha256", WEIGHTS_SHA_PREFIX,
                 f"put {WEIGHTS_NAME} from {WEIGHTS_URL} at {dest} or pass --inception-weights PATH")
    return dest


def load_inception(path, device):
    """(network, sha256 of the weights file)."""
    path = weights_path(path)
    sha = file_hash(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        with torch.device("meta"):  # no random initialisation: every tensor comes from the file
            net = FIDInception()
        net.load_state_dict(state, strict=True, assign=True)
    except Exception as e:
        raise ValueError(f"{path} is not the FID Inception weight file ({type(e).__name__}); get {WEIGHTS_URL}") \
            from None
    return net.to(device).eval().requires_grad_(False), sha


@contextlib.contextmanager
def no_tf32():
    """Full float32 in convolutions and matmuls: FID accuracy comes first."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@torch.no_grad()
def inception_features(net, images, batch=500, desc="features"):
    """Pool, logits and spatial features (float64 numpy) of uint8 [N, H, W, C] images in one pass."""
    device = next(net.parameters()).device
    outs = [[], [], []]
    t0 = time.perf_counter()
    with no_tf32():
        for i in tqdm(range(0, len(images), batch), desc=desc, unit="batch", leave=False):
            x = torch.from_numpy(np.array(images[i:i + batch])).to(device, non_blocking=True)
            for o, f in zip(outs, net(x)):
                o.append(f.cpu())
    feats = [torch.cat(o).double().numpy() for o in outs]
    dt = time.perf_counter() - t0
    print(f"{desc}: {len(images)} images in {dt:.1f} s, {len(images) / dt:.1f} images/s on {device}")
    return dict(pool=feats[0], logits=feats[1], spatial=feats[2])


# ----------------------------------------------------------------------------- metrics

def mean_cov(feats):
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(0), np.cov(feats, rowvar=False)


def psd_clip(w):
    """Eigenvalues of a PSD matrix below its round-off level (n * eps * max) are noise: set them to 0."""
    return np.where(w > len(w) * np.finfo(np.float64).eps * max(w.max(), 0), w, 0.0)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1-mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2) in float64.

    tr((S1 S2)^1/2) is the sum of the square roots of the eigenvalues of S1^1/2 S2 S1^1/2, a symmetric PSD
    matrix: two eigh calls instead of scipy's sqrtm (whose `disp` argument is gone in scipy 1.18 and which gave
    spurious imaginary parts in 1.11-1.12). Round-off eigenvalues are zeroed, the counterpart of pytorch-fid
    keeping the real part of a sqrtm with negligible imaginary parts.
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(psd_clip(w))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(psd_clip(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def inception_score(logits, splits=10):
    """exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive parts; (mean, std)."""
    logits = torch.as_tensor(logits, dtype=torch.float64)
    p, logp = F.softmax(logits, 1), F.log_softmax(logits, 1)
    scores = []
    for part_p, part_logp in zip(p.chunk(splits), logp.chunk(splits)):
        log_py = part_p.mean(0).log()
        scores.append((part_p * (part_logp - log_py)).sum(1).mean().exp().item())
    return float(np.mean(scores)), float(np.std(scores))


def sq_dists(a, b):
    """Squared Euclidean distances [len(a), len(b)], as the ADM evaluator computes them."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min(0)


def knn_radii(feats, k=3, batch=10000):
    """Squared distance from each point to its k-th nearest other point."""
    return torch.cat([torch.kthvalue(sq_dists(feats[i:i + batch], feats), k + 1, dim=1).values  # +1: the point
                      for i in range(0, len(feats), batch)])


def coverage(query, ref, radii, batch=10000):
    """Fraction of query points inside at least one ref point's k-NN ball."""
    inside = [(sq_dists(query[i:i + batch], ref) <= radii[None]).any(1) for i in range(0, len(query), batch)]
    return torch.cat(inside).double().mean().item()


def precision_recall(real, fake, k=3, device=None):
    """Improved precision and recall (Kynkaanniemi et al. 2019) on pool features, k = 3, as in ADM."""
    device = resolve_device(device or "auto")
    with no_tf32():
        real = torch.as_tensor(real, dtype=torch.float32, device=device)
        fake = torch.as_tensor(fake, dtype=torch.float32, device=device)
        return coverage(fake, real, knn_radii(real, k)), coverage(real, fake, knn_radii(fake, k))


# ----------------------------------------------------------------------------- inputs

def load_samples(path):
    """(uint8 [N, H, W, C], labels or captions or None, settings dict) from a samples npz; bad files: ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: make it with sample.py")
    try:
        z = np.load(path, allow_pickle=False)
        images = z["arr_0"]
        labels = z["arr_1"] if "arr_1" in z.files else z["captions"] if "captions" in z.files else None
        settings = json.loads(str(z["settings"])) if "settings" in z.files else {}
    except Exception as e:
        raise ValueError(f"cannot read {path} as a samples npz with arr_0 ({type(e).__name__}: {e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, C] with C 1 or 3, got {images.dtype} "
                         f"{list(images.shape)}")
    if not len(images):
        raise ValueError(f"{path} holds 0 samples: make it again with sample.py --num N")
    return images, labels, settings


def image_folder(path, need_labels=False):
    """(images, meta, labels) of a dataset folder of images (not latents)."""
    d = read_dataset(path, need_labels)
    if d.latent:
        raise ValueError(f"{path} holds latents: give the dataset folder of the images they were encoded from")
    return d.images, d.meta, d.labels


def reference(ref, net, sha, resolution):
    """Reference statistics and pool features of a dataset folder or an npz, cached beside it. The cache is keyed by
    the Inception weights' sha256 and by the version of the images it was computed from (their file's size and
    modification time, and a dataset's count and source checksum): a rebuilt dataset is never read through the old
    features, they are computed again."""
    source, meta = os.path.join(ref, "images.npy"), {}
    if os.path.isdir(ref):
        (images, meta, _), cache = image_folder(ref), os.path.join(ref, f"inception-{sha[:16]}.npz")
    elif os.path.isfile(ref):
        try:
            z = np.load(ref, allow_pickle=False)
            files = z.files
        except Exception as e:
            raise ValueError(f"cannot read --ref {ref} as npz ({type(e).__name__})") from None
        if "arr_0" not in files:
            if "mu" in files and "sigma" in files:  # pytorch-fid statistics: FID only
                return dict(mu=z["mu"], sigma=z["sigma"], count=None)
            raise ValueError(f"--ref {ref} has neither images (arr_0) nor statistics (mu, sigma)")
        images, source = z["arr_0"], ref  # an ADM reference batch: its images are run through our network
        cache = f"{ref}.inception-{sha[:16]}.npz"
    else:
        raise FileNotFoundError(f"--ref {ref} not found: give a dataset folder or an npz")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"--ref {ref}: images must be uint8 [N, H, W, C]")
    if resolution is not None and images.shape[1:3] != resolution:
        raise ValueError(f"--ref {ref} is {images.shape[1]}x{images.shape[2]} but the samples are "
                         f"{resolution[0]}x{resolution[1]}: compare against a reference of the same resolution")
    st = os.stat(source)
    key = json.dumps(dict(inception=sha, size=st.st_size, mtime_ns=st.st_mtime_ns, count=meta.get("count"),
                          checksum=meta.get("source_checksum")), sort_keys=True)
    if os.path.isfile(cache):
        c = np.load(cache)
        if "key" in c.files and str(c["key"]) == key:
            return {k: c[k] for k in c.files if k != "key"}
        print(f"{cache} was computed from another version of {ref}: computing it again", file=sys.stderr)
    f = inception_features(net, images, desc="reference features")
    mu, sigma = mean_cov(f["pool"])
    mu_s, sigma_s = mean_cov(f["spatial"])
    out = dict(mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s, pool=f["pool"].astype(np.float32),
               count=len(images))
    save_npz(cache, **out, key=np.array(key))
    return out


# ----------------------------------------------------------------------------- commands

def cmd_metrics(a):
    """Each --samples file against one reference (a guidance sweep: a file per scale), each result beside it."""
    if len(a.samples) > 1 and (a.out or a.save_features):
        raise ValueError("--out and --save-features name one file: give one --samples with them, or leave them out")
    net, sha, ref, device = None, None, None, resolve_device(a.device)
    results = []
    for path in a.samples:
        images, labels, settings = load_samples(path)
        if len(images) < MIN_FID_SAMPLES and not a.allow_small:
            raise ValueError(f"{path}: {len(images)} samples: FID needs at least {MIN_FID_SAMPLES} (50,000 to compare "
                             f"with published numbers); pass --allow-small to compute it anyway")
        if net is None:
            net, sha = load_inception(a.inception_weights, device)
            ref = reference(a.ref, net, sha, images.shape[1:3])
        results.append(score(a, path, images, labels, settings, net, sha, ref, device))
    return results[0] if len(results) == 1 else results


def score(a, path, images, labels, settings, net, sha, ref, device):
    small = len(images) < MIN_FID_SAMPLES
    f = inception_features(net, images, a.batch, desc="sample features")
    if a.save_features:
        save_npz(a.save_features, pool=f["pool"].astype(np.float32),
                 conditions=labels if labels is not None else np.zeros(0))
    mu, sigma = mean_cov(f["pool"])
    m = dict(fid=frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
    if "mu_s" in ref:
        m["sfid"] = frechet_distance(*mean_cov(f["spatial"]), ref["mu_s"], ref["sigma_s"])
    m["is_mean"], m["is_std"] = inception_score(f["logits"])
    if "pool" in ref:
        m["precision"], m["recall"] = precision_recall(ref["pool"], f["pool"], device=device)
    standard = sha.startswith(WEIGHTS_SHA_PREFIX)
    m.update(num_samples=len(images), num_ref=None if ref.get("count") is None else int(ref["count"]),
             samples=os.path.abspath(path), ref=os.path.abspath(a.ref), inception_sha256=sha,
             standard_weights=standard, small=small, settings=settings)
    out = save_result(m, a.out, path, "metrics.json")
    fmt = lambda k, p=".4f": f"{m[k]:{p}}" if k in m else "n/a"
    print(f"FID {m['fid']:.3f} | sFID {fmt('sfid', '.3f')} | IS {m['is_mean']:.3f} +- {m['is_std']:.3f} | "
          f"precision {fmt('precision')} | recall {fmt('recall')} | {len(images)} samples vs {a.ref}"
          + (f" | ONLY {len(images)} SAMPLES (--allow-small): not comparable" if small else "")
          + ("" if standard else " | NON-STANDARD Inception weights: not comparable") + f" | wrote {out}")
    return m


def save_result(result, out, samples, name):
    """Write a result JSON to --out, by default `name` beside the samples (sample.py --overwrite removes it); the
    samples of a guidance sweep, samples-cfg2.npz, get metrics-cfg2.json."""
    stem = os.path.splitext(os.path.basename(samples or ""))[0]
    name = name.replace(".json", stem[len("samples"):] + ".json") if stem.startswith("samples-") else name
    path = out or os.path.join(os.path.dirname(os.path.abspath(samples)), name)
    save_json(path, result)
    return path


class Features:
    """L2-normalised features of uint8 images, for repro and memorization: our Inception's pool features (a dataset's
    from its cached reference features), a TorchScript model (--features, e.g. SSCD), or `pixels`: each image's
    pixels minus their mean (a crude stand-in where no trained feature network is at hand)."""

    def __init__(self, a, device):
        self.kind, self.batch, self.device = a.features or "inception", a.batch, device
        if not a.features:
            self.net, self.sha = load_inception(a.inception_weights, device)
            standard = self.sha.startswith(WEIGHTS_SHA_PREFIX)
            self.name = "inception-pool" + ("" if standard else " (NON-STANDARD weights)")
        elif a.features == "pixels":
            self.name = "pixels"
        elif a.features.startswith("clip:"):  # the paper's features for RMD, NN L2 and memorization (App. B.7)
            self.kind, self.name, self.net = "clip", a.features, load_clip(a.features[5:], device)[0]
        elif not os.path.isfile(a.features):
            raise FileNotFoundError(f"--features {a.features} does not exist (a TorchScript file, or: pixels)")
        else:
            self.kind, self.name, self.size = "torchscript", os.path.basename(a.features), a.feat_size
            self.net = torch.jit.load(a.features, map_location=device).eval()
            mean, std = {"imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]), "none": ([0, 0, 0], [1, 1, 1]),
                         "minus1_1": ([0.5] * 3, [0.5] * 3)}[a.feat_norm]
            self.mean, self.std = (torch.tensor(v, device=device)[:, None, None] for v in (mean, std))

    @torch.no_grad()
    def __call__(self, images):
        if self.kind == "inception":
            return F.normalize(torch.from_numpy(inception_features(self.net, images, self.batch)["pool"]), dim=1)
        if self.kind == "clip":
            return clip_features(self.net, images, self.device, self.batch)
        if self.kind == "pixels":
            x = torch.from_numpy(np.array(images, dtype=np.float64)).flatten(1)
            return F.normalize(x - x.mean(1, keepdim=True), dim=1)
        out = []
        for i in range(0, len(images), self.batch):
            x = torch.from_numpy(np.array(images[i:i + self.batch])).to(self.device).permute(0, 3, 1, 2) / 255
            x = F.interpolate(x.float().expand(-1, 3, -1, -1), size=(self.size, self.size), mode="bilinear",
                              align_corners=False, antialias=True)
            out.append(self.net((x - self.mean) / self.std).float().cpu())
        return F.normalize(torch.cat(out).double(), dim=1)

    def of_dataset(self, folder, rows=None):
        """The same for a dataset folder's images (rows: those of a --subset); Inception's from the cache."""
        if self.kind == "inception":
            pool = reference(folder, self.net, self.sha, None)["pool"]
            return F.normalize(torch.from_numpy(np.asarray(pool if rows is None else pool[rows], np.float64)), dim=1)
        images = image_folder(folder)[0]
        return self(images if rows is None else images[np.sort(rows)])


def cmd_repro(a):
    """Reproducibility score (Zhang et al. 2024): the fraction of index-matched pairs (same noise, same condition)
    with cosine similarity > threshold, for every pair of the given sample sets."""
    if len(a.samples) < 2:
        raise ValueError("repro compares sample sets: give at least two samples.npz")
    sets = [load_samples(p)[0] for p in a.samples]
    for p, s in zip(a.samples[1:], sets[1:]):
        if len(s) != len(sets[0]):
            raise ValueError(f"{a.samples[0]} has {len(sets[0])} samples and {p} {len(s)}: repro compares sample i "
                             f"with sample i")
    features = Features(a, resolve_device(a.device))
    feats, name = [features(s) for s in sets], features.name
    k = len(sets)
    rp, mean_sim = np.ones((k, k)), np.ones((k, k))
    for i in range(k):
        for j in range(i + 1, k):
            sim = (feats[i] * feats[j]).sum(1)
            rp[i, j] = rp[j, i] = (sim > a.threshold).double().mean().item()
            mean_sim[i, j] = mean_sim[j, i] = sim.mean().item()
    r = dict(rp_matrix=rp.tolist(), mean_similarity_matrix=mean_sim.tolist(), samples=[os.path.abspath(p) for p in
             a.samples], threshold=a.threshold, num=len(sets[0]), features=name,
             rp_score=rp[0, 1], mean_similarity=mean_sim[0, 1])  # the first pair (the only one for two sets)
    if k == 2:
        print(f"reproducibility {rp[0, 1]:.4f} (cosine > {a.threshold}), mean similarity {mean_sim[0, 1]:.4f}, "
              f"{len(sets[0])} pairs | features: {name}")
    else:
        print(f"reproducibility (cosine > {a.threshold}, {len(sets[0])} pairs each; features: {name}):")
        for i, p in enumerate(a.samples):
            print(f"  [{i}] " + " ".join(f"{v:.3f}" for v in rp[i]) + f"  {p}")
    if a.out:
        print(f"wrote {save_result(r, a.out, None, None)}")
    return r


def training_rows(ref):
    """(dataset folder, rows or None) of --ref: a dataset folder (every image), or a run folder (the images it
    trained on: its data path and the index of --subset in its corruption.npz)."""
    if not os.path.isfile(os.path.join(ref, "config.json")):
        return ref, None
    folder = json.load(open(os.path.join(ref, "config.json")))["data"]["path"]
    try:
        return folder, np.load(os.path.join(ref, "corruption.npz"))["index"]
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"--ref {ref}: cannot read the training rows from its corruption.npz ({type(e).__name__})") \
            from None


def cmd_memorization(a):
    """Highest similarity of each sample to any training image; memorized fraction above the threshold."""
    images, _, _ = load_samples(a.samples)
    folder, rows = training_rows(a.ref)
    if image_folder(folder)[0].shape[1:] != images.shape[1:]:
        raise ValueError(f"{folder} holds images of another shape than {a.samples}")
    device = resolve_device(a.device)
    features = Features(a, device)
    s, r = features(images).float().to(device), features.of_dataset(folder, rows).float().to(device)
    best = torch.cat([(s[i:i + 4096] @ r.T).max(1).values for i in range(0, len(s), 4096)]).cpu()
    mem = (best > a.threshold).double().mean().item()
    out = dict(memorized_fraction=mem, generalization_score=1 - mem, threshold=a.threshold,
               mean_max_similarity=best.mean().item(), num_samples=len(images), num_train=len(r),
               features=features.name, samples=os.path.abspath(a.samples))
    path = save_result(out, a.out, a.samples, "memorization.json")
    print(f"memorized {mem:.4f}, generalization score {1 - mem:.4f} (max cosine to {len(r)} training images "
          f"> {a.threshold}) | features: {features.name} | wrote {path}")
    return out


# ----------------------------------------------------------------------------- Chen et al.'s diversity measures

def relative_mahalanobis(feats, labels, ref, ref_labels):
    """RMD (Ren et al. 2021; Chen et al. Fig. 4) of each sample: its Mahalanobis distance to the mean of the class it
    was generated for, under the within-class covariance shared by all classes, minus its distance to the mean of
    all reference features under their covariance. Pseudo-inverses: fewer references than dimensions is allowed."""
    ref, feats = np.asarray(ref, np.float64), np.asarray(feats, np.float64)
    classes = np.unique(ref_labels)
    means = np.stack([ref[ref_labels == k].mean(0) for k in classes])
    centred = ref - means[np.searchsorted(classes, ref_labels)]
    within, mu0 = np.linalg.pinv(centred.T @ centred / len(ref), hermitian=True), ref.mean(0)
    agnostic = np.linalg.pinv((ref - mu0).T @ (ref - mu0) / len(ref), hermitian=True)
    md = lambda x, P: np.einsum("nd,de,ne->n", x, P, x)
    return md(feats - means[np.searchsorted(classes, labels)], within) - md(feats - mu0, agnostic)


def code_entropy(indices, n_codes):
    """Sample entropy (Wu et al.; Chen et al. Fig. 4): entropy (nats) of the VQ codebook usage over every position of
    every sample's code map."""
    p = np.bincount(np.asarray(indices).ravel(), minlength=n_codes) / np.asarray(indices).size
    return float(-(p[p > 0] * np.log(p[p > 0])).sum())


def nearest_l2(feats, ref, k=5, batch=4096):
    """L2 distances of each sample to its k nearest reference features [n, k], ascending (App. B.7)."""
    out = [torch.topk(sq_dists(feats[i:i + batch], ref), k, dim=1, largest=False).values.sqrt()
           for i in range(0, len(feats), batch)]
    return torch.cat(out)


def cosine_kde(data, at, h, weights=None, batch=1024):
    """Cosine-kernel density of `data` (rows weighted by `weights` [n, B], default 1) at the points `at`:
    (1/n) (pi / 4h)^d sum over |x - y| <= h of cos(pi |x - y| / 2h), as TopP&R estimates supports. -> [len(at), B]
    in float64 (the factor overflows float32 for small h)."""
    n, d = data.shape
    weights = torch.ones(n, 1) if weights is None else weights.float()
    out = []
    for i in range(0, len(at), batch):
        dist = sq_dists(at[i:i + batch], data).sqrt()
        out.append(torch.where(dist <= h, torch.cos(math.pi / 2 * dist / h), 0) @ weights)
    return torch.cat(out).double() * (math.pi / (4 * h)) ** d / n


def balloon_bandwidth(feats, k, batch=1024):
    """TopP&R's bandwidth: the median, over points i < n - k, of the distance from i to its k-th nearest among the
    points after it (their balloon estimate, kept as written for comparable numbers)."""
    n, out = len(feats), []
    for i in range(0, n - k, batch):
        dist = sq_dists(feats[i:min(i + batch, n - k)], feats).sqrt()
        rows = torch.arange(i, i + len(dist))[:, None]
        dist[torch.arange(n)[None] <= rows] = float("inf")
        out.append(dist.kthvalue(k, dim=1).values)
    return torch.sort(torch.cat(out)).values[int((n - k) * 0.5) - 1].item()


def top_pr(real, fake, alpha=0.1, repeat=10):
    """TopP&R (Kim et al. 2023; Chen et al. App. B.7's TopPR F1), the authors' recipe for features of more than 3
    dimensions: a fixed projection to 32 (xavier-normal, seed 99), per set a cosine KDE with the balloon bandwidth
    (k = 5 x dims) and a bootstrap confidence level c (quantile 1 - alpha of sup |p - p*|, `repeat` resamples from one
    RandomState(42)); a point is significant where its set's density exceeds c, and precision (recall) is the
    fraction of significant fakes (reals) the other set's density also holds above its c. -> (precision, recall, F1)."""
    real, fake = torch.as_tensor(real, dtype=torch.float32), torch.as_tensor(fake, dtype=torch.float32)
    if real.shape[1] > 32:
        proj = torch.empty(32, real.shape[1]).normal_(0, math.sqrt(2 / (real.shape[1] + 32)),
                                                      generator=torch.Generator().manual_seed(99))
        real, fake = real @ proj.T, fake @ proj.T
    k, rng, sets = 5 * real.shape[1], np.random.RandomState(42), []
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"TopP&R needs more than {k} samples and references (5 x {real.shape[1]} feature dims)")
    for x in (real, fake):
        h = balloon_bandwidth(x, k)
        counts = [np.bincount(rng.choice(len(x), len(x)), minlength=len(x)) for _ in range(repeat)]
        p = cosine_kde(x, x, h, torch.from_numpy(np.stack([np.ones(len(x))] + counts, 1)))
        theta = math.sqrt(len(x)) * (p[:, 1:] - p[:, :1]).abs().amax(0)
        sets.append((x, h, p[:, 0], np.quantile(theta.numpy(), 1 - alpha) / math.sqrt(len(x))))
    (r, h_r, p_rr, c_r), (f, h_f, p_ff, c_f) = sets
    recall = ((p_rr > c_r) & (cosine_kde(f, r, h_f)[:, 0] > c_f)).sum().item() / max(1, (p_rr > c_r).sum().item())
    precision = ((p_ff > c_f) & (cosine_kde(r, f, h_r)[:, 0] > c_r)).sum().item() / max(1, (p_ff > c_f).sum().item())
    return precision, recall, (2 / (1 / precision + 1 / recall) if min(precision, recall) > 1e-4 else 0.0)


@torch.no_grad()
def vq_codes(vq, images, device, batch=64):
    """The codebook indices of images (uint8) under a diffusers VQModel: its encoder, then its quantizer."""
    ae = load_autoencoder(vq, device)[0]
    if not hasattr(ae, "quantize"):
        raise ValueError(f"--vq {vq} is not a VQModel: sample entropy counts a VQ codebook's entries")
    codes = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i:i + batch])).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
        codes.append(ae.quantize(ae.encode(x.expand(-1, 3, -1, -1)).latents)[2][2].reshape(-1).cpu())
    return torch.cat(codes).numpy(), ae.quantize.n_e



CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_clip(spec, device):
    """CLIP through transformers (what diffusers users have already: Stable Diffusion's pipelines need it), from a
    folder in its format or a hub id given explicitly, e.g. clip:openai/clip-vit-base-patch16 (the paper's ViT-B/16):
    nothing is fetched unasked. -> (model, its tokenizer or None)."""
    try:
        import transformers
    except ImportError:
        raise ValueError("CLIP needs transformers: pip install -r requirements-clip.txt") from None
    try:
        net = transformers.CLIPModel.from_pretrained(spec).to(device).eval().requires_grad_(False)
    except Exception as e:  # no such folder, no network, another model
        raise ValueError(f"cannot load CLIP {spec} ({type(e).__name__}: {str(e).strip().splitlines()[0][:120]}): give "
                         f"a CLIPModel folder in transformers' format or a hub id reachable from here") from None
    try:
        return net, transformers.AutoTokenizer.from_pretrained(spec)
    except Exception:  # image features need no tokenizer
        return net, None


def embeds(out):  # transformers 4 returns the projected embeddings, 5 an output whose pooler_output they are
    return (out if torch.is_tensor(out) else out.pooler_output).float()


@torch.no_grad()
def clip_features(net, images, device, batch=64):
    """L2-normalised CLIP image embeddings of uint8 images: resized (bicubic) to the model's input, CLIP's mean/std."""
    size, out = net.config.vision_config.image_size, []
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in (CLIP_MEAN, CLIP_STD))
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.array(images[i:i + batch])).to(device).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x.expand(-1, 3, -1, -1), size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True).clamp(0, 1)
        out.append(embeds(net.get_image_features(pixel_values=(x - mean) / std)).cpu())
    return F.normalize(torch.cat(out).double(), dim=1)


@torch.no_grad()
def clip_score(net, tokenizer, images, captions, device, batch=64):
    """CLIP score of each sample against its caption: 100 max(cos(image, text), 0), as torchmetrics computes it
    (Hessel et al. 2021 with weight 100; Chen et al. Fig. 3c)."""
    img, txt = clip_features(net, images, device, batch), []
    for i in range(0, len(captions), batch):
        t = tokenizer(list(captions[i:i + batch]), padding=True, truncation=True, return_tensors="pt",
                      max_length=net.config.text_config.max_position_embeddings).to(device)
        txt.append(embeds(net.get_text_features(**t)).cpu())
    return 100 * (img * F.normalize(torch.cat(txt).double(), dim=1)).sum(1).clamp_min(0)


def cmd_clipscore(a):
    """The mean CLIP score of text samples against the captions they were generated for (clipscore.json)."""
    images, captions, settings = load_samples(a.samples)
    if captions is None or captions.dtype.kind != "U":
        raise ValueError(f"{a.samples} holds no captions: the CLIP score is for samples of a text model")
    device = resolve_device(a.device)
    net, tokenizer = load_clip(a.clip, device)
    if tokenizer is None:
        raise ValueError(f"--clip {a.clip} has no tokenizer files: the CLIP score needs the text side too")
    s = clip_score(net, tokenizer, images, captions, device)
    out = dict(clip_score=s.mean().item(), clip=a.clip, num_samples=len(images), samples=os.path.abspath(a.samples),
               settings=settings)
    print(f"CLIP score {out['clip_score']:.3f} ({a.clip}, {len(images)} samples) | wrote "
          f"{save_result(out, a.out, a.samples, 'clipscore.json')}")
    return out

def cmd_diversity(a):
    """Chen et al.'s diversity and memorization measures of one samples file (Fig. 4, App. B.7): top-1% RMD and the
    RMD density, the top-5 nearest-neighbour L2 to the training set, the memorization ratio (nearest L2 below
    --l2-threshold; 0.12 is the paper's, for CLIP features), and with --vq (or a VQ latent run) the sample entropy."""
    images, conditions, settings = load_samples(a.samples)
    folder, rows = training_rows(a.ref)
    ref_images, meta, ref_labels = image_folder(folder, need_labels=True)
    if conditions is None or conditions.dtype.kind == "U":
        raise ValueError(f"{a.samples} holds no class labels: RMD measures a sample against the class it was made for")
    device = resolve_device(a.device)
    features = Features(a, device)
    f, r = features(images).double(), features.of_dataset(folder, rows).double()
    ref_labels = ref_labels if rows is None else ref_labels[np.sort(rows)]
    score = relative_mahalanobis(f.numpy(), conditions.astype(np.int64), r.numpy(), ref_labels)
    top = np.sort(score)[-max(1, len(score) // 100):]
    density, edges = np.histogram(score, bins=20, density=True)
    nn = nearest_l2(f.float().to(device), r.float().to(device)).cpu()
    out = dict(rmd_top1=float(top.mean()), rmd_mean=float(score.mean()), rmd_density=density.tolist(),
               rmd_edges=edges.tolist(), nn5_l2=nn.mean().item(), l2_threshold=a.l2_threshold,
               memorization_ratio=(nn[:, 0] < a.l2_threshold).double().mean().item(), features=features.name,
               num_samples=len(images), samples=os.path.abspath(a.samples), settings=settings)
    k = 5 * min(32, f.shape[1])
    if min(len(f), len(r)) > k:
        out.update(zip(("toppr_precision", "toppr_recall", "toppr_f1"), top_pr(r.float(), f.float())))
    else:
        print(f"no TopPR F1: it needs more than {k} samples and references (5 x the projected feature dims)")
    latent = settings.get("config", {}).get("data", {}).get("latent") or {}
    vq = a.vq or (latent.get("vae") if latent.get("kind") == "vq" else None)
    if vq:
        codes, n_codes = vq_codes(vq, images, device)
        out.update(entropy=code_entropy(codes, n_codes), vq=vq)
    path = save_result(out, a.out, a.samples, "diversity.json")
    print(f"top-1% RMD {out['rmd_top1']:.3f} | top-5 NN L2 {out['nn5_l2']:.4f} | memorization ratio "
          f"{out['memorization_ratio']:.4f} (L2 < {a.l2_threshold}) | TopPR F1 {out.get('toppr_f1', float('nan')):.3f}"
          f" | entropy "
          f"{out.get('entropy', float('nan')):.3f} | features: {features.name} | wrote {path}")
    return out


def intended_classes(conditions, class_names):
    """The class each sample was asked for: its label, or the one class whose name's words all appear in its
    caption ("a small red disk on the left" -> "red disk"); -1 where no class or several match."""
    if conditions.dtype.kind != "U":
        return conditions.astype(np.int64)
    names = [set(n.lower().split()) for n in class_names]
    out = []
    for caption in conditions:
        words = set(re.findall(r"[a-z0-9]+", caption.lower()))
        hits = [k for k, n in enumerate(names) if n <= words]
        out.append(hits[0] if len(hits) == 1 else -1)
    return np.array(out, dtype=np.int64)


def fit_classifier(images, labels, num_classes, epochs, device, batch=128):
    """A small CNN fit (seeded) to 90% of a labelled dataset; returns (predict(uint8 images) -> classes, accuracy on
    the other 10%). It judges which class a sample shows; its own accuracy bounds what it can tell."""
    torch.manual_seed(0)
    conv = lambda i, o, s: [nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.SiLU()]
    net = nn.Sequential(*conv(images.shape[-1], 32, 1), *conv(32, 64, 2), *conv(64, 128, 2), *conv(128, 128, 2),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)).to(device)
    prep = lambda x: torch.from_numpy(np.asarray(x)).to(device).permute(0, 3, 1, 2).float() / 127.5 - 1
    perm = np.random.default_rng(0).permutation(len(labels))
    held, fit = perm[:len(perm) // 10], perm[len(perm) // 10:]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for _ in tqdm(range(epochs), desc="fitting the classifier", unit="epoch", leave=False):
        for i in range(0, len(fit), batch):
            rows = np.sort(fit[i:i + batch])
            loss = F.cross_entropy(net(prep(images[rows])), torch.from_numpy(labels[rows]).to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    @torch.no_grad()
    def predict(x):
        return np.concatenate([net(prep(x[i:i + 500])).argmax(1).cpu().numpy() for i in range(0, len(x), 500)])
    return predict, float((predict(images[np.sort(held)]) == labels[np.sort(held)]).mean())


def cmd_classify(a):
    """Conditioning accuracy: the fraction of samples that a classifier fit to the reference set reads as the
    class (or the class named in the caption) they were generated for."""
    images, conditions, _ = load_samples(a.samples)
    ref, meta, ref_labels = image_folder(a.ref, need_labels=True)
    if conditions is None:
        raise ValueError(f"{a.samples} stores no labels or captions: sample it with sample.py")
    if ref.shape[1:] != images.shape[1:]:
        raise ValueError(f"--ref {a.ref} holds {list(ref.shape[1:])} images, the samples are {list(images.shape[1:])}")
    want = intended_classes(conditions, meta["class_names"])
    known = want >= 0
    if not known.any():
        raise ValueError("no sample's condition names exactly one class of --ref (check its class_names)")
    predict, held_acc = fit_classifier(ref, ref_labels, meta["num_classes"], a.epochs, resolve_device(a.device))
    got = predict(images[known])
    r = dict(accuracy=float((got == want[known]).mean()), judged=int(known.sum()), num_samples=len(images),
             classifier_heldout_accuracy=held_acc, epochs=a.epochs, samples=os.path.abspath(a.samples),
             ref=os.path.abspath(a.ref))
    path = save_result(r, a.out, a.samples, "classify.json")
    print(f"conditioning accuracy {r['accuracy']:.3f}: {int((got == want[known]).sum())} of {r['judged']} samples "
          f"read as the class they were asked for ({len(images) - r['judged']} named no single class) | classifier "
          f"held-out accuracy {held_acc:.3f} on {a.ref} | wrote {path}")
    return r


def edge_f1(edges, ref, tolerance=1):
    """Control fidelity of edge maps (bool [N, H, W]): precision = the share of the samples' edge pixels within
    `tolerance` pixels (a square window) of an edge of their control, recall = the share of the controls' edge
    pixels within it of a sample edge, both over all pixels of the set; F1 their harmonic mean (BSDS-style
    matching with a tolerance, without its one-to-one assignment). -> (precision, recall, F1)."""
    grow = lambda e: F.max_pool2d(torch.from_numpy(e).float()[:, None], 2 * tolerance + 1, 1, tolerance)[:, 0] > 0
    p = (edges & grow(ref).numpy()).sum() / max(edges.sum(), 1)
    r = (ref & grow(edges).numpy()).sum() / max(ref.sum(), 1)
    return float(p), float(r), float(2 * p * r / (p + r)) if p + r else 0.0


def cmd_control(a):
    """Edge F1 of an adapter's samples against the Canny controls they were made from (sample.py --controls): the
    samples' Canny edges with the thresholds the controls were made with (control.json)."""
    from prepare_data import canny
    images, _, settings = load_samples(a.samples)
    src = settings.get("controls")
    if not src:
        raise ValueError(f"{a.samples} was not sampled from control images: sample an adapter with --controls DATASET")
    meta, path = json.load(open(os.path.join(src["path"], "meta.json"))), os.path.join(src["path"], "controls.npy")
    made = meta.get("control", {})
    if made.get("kind") != "canny":
        raise ValueError(f"the controls of {src['path']} are not Canny edges ({made.get('kind')}): edge F1 compares "
                         f"Canny edges")
    if not os.path.isfile(path) or file_hash(path) != src["sha256"]:
        raise ValueError(f"{path} is not the file {a.samples} was sampled with (missing or changed): sample again")
    rows = np.load(a.samples)["control_rows"]
    ref = np.load(path, mmap_mode="r")[rows][..., 0] > 0
    p, r, f1 = edge_f1(canny(images, made["low"], made["high"])[..., 0] > 0, ref, a.tolerance)
    out = dict(edge_precision=p, edge_recall=r, edge_f1=f1, tolerance=a.tolerance, canny=[made["low"], made["high"]],
               num_samples=len(images), samples=os.path.abspath(a.samples), settings=settings)
    print(f"edge F1 {f1:.3f} (precision {p:.3f}, recall {r:.3f}; tolerance {a.tolerance} px, Canny {made['low']}/"
          f"{made['high']}) | wrote {save_result(out, a.out, a.samples, 'control.json')}")
    return out


# ----------------------------------------------------------------------------- report

def collect(run_dirs):
    """(eta rows from metrics*.json and diversity*.json, one per samples file, e.g. per guidance scale; study rows
    from memorization.json [+ repro.json]) of the run folders."""
    rows, study = [], []
    for d in run_dirs:
        run, has = os.path.basename(os.path.normpath(d)), lambda f: os.path.isfile(os.path.join(d, f))
        # one row per samples file scored: metrics-X.json, diversity-X.json ... (X: a sweep's -cfg2, or none)
        kinds = ("metrics", "diversity", "control", "classify")
        for x in sorted({re.sub(r"^(metrics|diversity|control|classify)", "", os.path.basename(p)) for k in kinds
                         for p in glob.glob(os.path.join(d, f"{k}*.json"))}):
            m, div, ctl, acc = ({**json.load(open(p))} if os.path.isfile(p) else {}
                                for p in (os.path.join(d, k + x) for k in kinds))
            if not (m or div or ctl):
                continue
            settings = m.get("settings") or div.get("settings") or ctl.get("settings") or {}
            config = settings.get("config") or json.load(open(os.path.join(d, "config.json")))
            # an adapter's row: the corruption its frozen base was pre-trained with (Chen et al. Table 2)
            t = dict(config["train"], **config.get("base", {}))
            rows.append(dict(run=run, cond=t.get("cond", "class"), eta=t["eta"], corruption=t["corruption"],
                             mode=t["corruption_mode"], cep=t["cep"], ip=t.get("ip_gamma") or 0.0,
                             gamma=t["cep_gamma"] if t["cep"] != "none" else None, cfg=settings.get("cfg_scale"),
                             n=m.get("num_samples", div.get("num_samples", ctl.get("num_samples"))),
                             adapter=config["train"].get("adapter"), edge_f1=ctl.get("edge_f1"),
                             accuracy=acc.get("accuracy"),
                             **{k: m.get(k) for k in ("fid", "sfid", "is_mean", "precision", "recall")},
                             **{k: div.get(k) for k in ("rmd_top1", "nn5_l2", "memorization_ratio", "toppr_f1",
                                                        "entropy", "rmd_density", "rmd_edges")}))
        if has("memorization.json") and has("config.json"):  # the reproducibility study (Zhang et al.)
            m, cfg = (json.load(open(os.path.join(d, f))) for f in ("memorization.json", "config.json"))
            n = cfg["train"].get("subset") or cfg["data"]["count"]
            rp = json.load(open(os.path.join(d, "repro.json")))["rp_score"] if has("repro.json") else None
            study.append(dict(run=run, images=n, log2n=float(np.log2(n)), seed=cfg["train"]["seed"], rp=rp,
                              width=cfg["model"].get("ch", PRESETS[cfg["model"]["preset"]].get("unet", {}).get("ch")),
                              gl=m["generalization_score"], features=m["features"]))
        if not any(glob.glob(os.path.join(d, f"{k}*.json")) for k in ("metrics", "diversity", "control")) \
                and not has("memorization.json"):
            print(f"skipping {d}: no metrics.json or memorization.json", file=sys.stderr)
    if not rows and not study:
        raise ValueError("no run folder with a metrics.json (or memorization.json): run sample.py and evaluate.py "
                         "first")
    return (sorted(rows, key=lambda r: (r["adapter"] or "", r["cond"], r["cep"], r["gamma"] or 0, r["ip"],
                                        r["corruption"], r["mode"],
                                        r["eta"] if r["eta"] is not None else -1)),
            sorted(study, key=lambda r: (r["width"], r["images"], r["seed"])))


def markdown(columns, rows):
    """A markdown table: columns is [(title, row -> cell text)]."""
    lines = ["| " + " | ".join(title for title, _ in columns) + " |", "|" + "---|" * len(columns)]
    return "\n".join(lines + ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]) + "\n"


num = lambda key, spec: lambda r: "-" if r[key] is None else f"{r[key]:{spec}}"
ETA_COLUMNS = [("run", lambda r: r["run"]), ("cond", lambda r: r["cond"]), ("adapter", lambda r: r["adapter"] or "-"),
               ("eta (%)", lambda r: "-" if r["eta"] is None else f"{r['eta'] * 100:g}"),
               ("corruption", lambda r: f"{r['corruption']}/{r['mode']}"),
               ("CEP", lambda r: r["cep"] if r["cep"] == "none" else f"{r['cep']} (gamma {r['gamma']:g})"),
               ("IP gamma", lambda r: f"{r['ip']:g}" if r["ip"] else "-"),
               ("cfg", num("cfg", "g")), ("samples", lambda r: str(r["n"])), ("FID", num("fid", ".2f")),
               ("sFID", num("sfid", ".2f")), ("IS", num("is_mean", ".2f")), ("precision", num("precision", ".3f")),
               ("recall", num("recall", ".3f")), ("top-1% RMD", num("rmd_top1", ".3f")),
               ("NN L2", num("nn5_l2", ".3f")), ("mem. ratio", num("memorization_ratio", ".3f")),
               ("TopPR F1", num("toppr_f1", ".3f")), ("entropy", num("entropy", ".3f")),
               ("edge F1", num("edge_f1", ".3f")), ("accuracy", num("accuracy", ".3f"))]
STUDY_COLUMNS = [("run", lambda r: r["run"]), ("training images", lambda r: str(r["images"])),
                 ("width", lambda r: str(r["width"])), ("seed", lambda r: str(r["seed"])),
                 ("reproducibility", num("rp", ".3f")), ("generalization", num("gl", ".3f")),
                 ("features", lambda r: r["features"])]
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75)]


def plot(rows, path, x, xlabel, panels, series_of, order=None, w=420, h=300):
    """One panel per (key, title, y label[, x key, x label]) of `panels` against row[x], a line per series_of(row)
    through the mean of its points at each x, or (order) through its points in the order of row[order]: the FID-IS
    curve of a guidance sweep. Drawn with pillow."""
    series = {}
    for r in rows:
        series.setdefault(series_of(r), []).append(r)
    nrow = -(-len(panels) // 2)
    img = Image.new("RGB", (2 * w, nrow * h + 24 * (len(series) // 2 + 1)), "white")
    d = ImageDraw.Draw(img)
    for p, (key, title, ylabel, *px) in enumerate(panels):
        ox, oy, (px, pxlabel) = (p % 2) * w, (p // 2) * h, px or (x, xlabel)
        left, top, right, bottom = ox + 55, oy + 42, ox + w - 15, oy + h - 35
        pts = [(r[px], r[key]) for r in rows if r[key] is not None and r[px] is not None]
        d.text((ox + w // 2 - 3 * len(title), oy + 4), title, fill="black")
        d.text((ox + 4, oy + 22), ylabel, fill="black")
        d.rectangle([left, top, right, bottom], outline="black")
        d.text((left + (right - left) // 2 - 3 * len(pxlabel), bottom + 20), pxlabel, fill="black")
        if not pts:
            d.text((left + (right - left) // 2 - 21, (top + bottom) // 2 - 6), "no data", fill="black")
            continue
        (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*pts)]
        xpad, pad = (x1 - x0) * 0.06 or 1.0, (y1 - y0) * 0.1 or abs(y0) * 0.1 or 1.0  # no point on the frame
        xs, (x0, x1), (y0, y1) = [v for v, _ in pts], (x0 - xpad, x1 + xpad), (y0 - pad, y1 + pad)
        X = lambda v: left + (v - x0) / (x1 - x0) * (right - left)
        Y = lambda v: bottom - (v - y0) / (y1 - y0) * (bottom - top)
        whole = all(float(v).is_integer() for v in xs)  # e.g. log2 of subset sizes: a tick at each integer
        xticks = sorted(set(int(v) for v in xs)) if whole else [min(xs) + (max(xs) - min(xs)) * i / 4 for i in range(5)]
        for i in range(5):
            yv = y0 + (y1 - y0) * i / 4
            d.line([left - 4, Y(yv), left, Y(yv)], fill="black")
            d.text((ox + 4, Y(yv) - 6), f"{yv:.3g}", fill="black")
        for xv in xticks:
            d.line([X(xv), bottom, X(xv), bottom + 4], fill="black")
            d.text((X(xv) - 8, bottom + 6), f"{xv:.3g}", fill="black")
        for s, (name, rs) in enumerate(series.items()):
            c = COLOURS[s % len(COLOURS)]
            at = {v: [r[key] for r in rs if r[px] == v and r[key] is not None] for v in sorted({r[px] for r in rs})
                  if v is not None}
            xy = [(X(v), Y(float(np.mean(ys)))) for v, ys in at.items() if ys] if order is None else \
                [(X(r[px]), Y(r[key])) for r in sorted(rs, key=lambda r: r[order]) if None not in (r[px], r[key])]
            if len(xy) > 1:
                d.line(xy, fill=c, width=2)
            for u, v in xy:
                (d.ellipse if s % 2 == 0 else d.rectangle)([u - 4, v - 4, u + 4, v + 4], fill=c)
    for s, name in enumerate(series):
        u, v = 20 + (s % 2) * w, nrow * h + 6 + (s // 2) * 24
        c = COLOURS[s % len(COLOURS)]
        (d.ellipse if s % 2 == 0 else d.rectangle)([u, v, u + 8, v + 8], fill=c)
        d.text((u + 14, v - 2), name, fill="black")
    save_atomic(path, lambda f: img.save(f, "PNG"))


def diversity_plots(rows, out, series_of):
    """Chen et al. Fig. 4 from the diversity.json beside the metrics: the RMD density per eta (OUT-rmd.png) and the
    sample entropy against guidance (OUT-entropy.png). -> the files written."""
    dens = [dict(r, rmd=(lo + hi) / 2, density=v) for r in rows if r["rmd_density"]
            for lo, hi, v in zip(r["rmd_edges"], r["rmd_edges"][1:], r["rmd_density"])]
    wrote = []
    if dens:
        plot(dens, out + "-rmd.png", "rmd", "relative Mahalanobis distance", [("density", "RMD density", "density")],
             lambda r: series_of(r) + f", cfg {r['cfg']}", order="rmd")
        wrote.append(out + "-rmd.png")
    if any(r["entropy"] is not None for r in rows):
        plot(rows, out + "-entropy.png", "cfg", "guidance scale", [("entropy", "sample entropy", "nats")], series_of)
        wrote.append(out + "-entropy.png")
    return wrote


def cmd_report(a):
    """OUT.md: the eta table and the reproducibility-study table; OUT.png and OUT-study.png: their plots."""
    dirs = [d for pattern in a.runs for d in (sorted(glob.glob(pattern)) or [pattern]) if os.path.isdir(d)]
    rows, study = collect(dirs)
    a.out = a.out or os.path.join(os.path.commonpath([os.path.dirname(os.path.abspath(d)) for d in dirs]), "report")
    table, wrote = "", []
    if rows:
        table += markdown(ETA_COLUMNS, rows)
        cep = lambda r: ("no CEP" if r["cep"] == "none" else f"CEP-{r['cep'][0].upper()} gamma {r['gamma']:g}") + \
            (f", IP {r['ip']:g}" if r["ip"] else "")
        rows = [dict(r, eta_pct=r["eta"] * 100) for r in rows if r["eta"] is not None]
        sweep = len({r["cfg"] for r in rows}) > 1
        extra = [(k, title, title) for k, title in (("edge_f1", "edge F1"), ("accuracy", "conditioning accuracy"))
                 if any(r[k] is not None for r in rows)]  # an adapter's control fidelity (Fig. 6 with Table 2)
        plot(rows, a.out + ".png", "eta_pct", "eta (%)", [("fid", "FID", "FID"), ("is_mean", "IS", "IS"),
             ("precision", "precision", "precision"), ("recall", "recall", "recall")] + extra,
             lambda r: f"{r['adapter'] + ', ' if r['adapter'] else ''}{r['cond']}, {cep(r)}, {r['corruption']}/"
                       f"{r['mode']}" + (f", cfg {r['cfg']}" if sweep else ""))
        wrote.append(a.out + ".png")
        wrote += diversity_plots(rows, a.out, lambda r: f"eta {r['eta_pct']:g}%, {cep(r)}")
        if sweep:  # Chen et al. Fig. 3: a curve per eta through its guidance scales
            plot(rows, a.out + "-guidance.png", None, None, [("fid", "FID against IS", "FID", "is_mean", "IS"),
                 ("precision", "precision against recall", "precision", "recall", "recall")],
                 lambda r: f"eta {r['eta_pct']:g}%, {r['cond']}, {cep(r)}", order="cfg")
            wrote.append(a.out + "-guidance.png")
    if study:
        table += ("\n" if table else "") + markdown(STUDY_COLUMNS, study)
        plot(study, a.out + "-study.png", "log2n", "log2 training images",
             [("rp", "reproducibility (between seeds)", "pairs with cosine > threshold"),
              ("gl", "generalization", "1 - memorized fraction")], lambda r: f"width {r['width']}")
        wrote.append(a.out + "-study.png")
    save_atomic(a.out + ".md", lambda f: f.write(table.encode()))
    print(table + f"wrote {a.out}.md, {' and '.join(wrote)}")
    return rows + study


# ----------------------------------------------------------------------------- Chen et al. Sec. 4: the Gaussian mixture

def sqrtm_psd(c):
    w, v = np.linalg.eigh((c + c.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def w2_gaussian(m1, c1, m2, c2):
    """Squared 2-Wasserstein distance between N(m1, c1) and N(m2, c2) (Givens and Shortt 1984)."""
    r = sqrtm_psd(c1)
    return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(sqrtm_psd(r @ c2 @ r)))


def gaussian_entropy(c):
    return 0.5 * np.linalg.slogdet(2 * np.pi * np.e * c)[1]


def fit_denoiser(x0, a, gamma):
    """Least squares x0 ~ W x_t + v c over one class's n_k images x0 at each OU time's a = e^-t, with the noise
    integrated out (training draws fresh noise every step): x_t = a x0 + sqrt(1 - a^2) eps, c = 1 + gamma xi is the
    class's own one-hot coordinate, corrupted as in Sec. 4 (gamma 0: clean). Solves the normal equations of
    E|x0 - W x_t - v c|^2 at every time at once: -> (W [T, d, d], v [T, d])."""
    n, d = x0.shape
    m, second, a = x0.mean(0), x0.T @ x0 / n, a[:, None, None]
    gram = np.zeros((len(a), d + 1, d + 1))
    gram[:, :d, :d] = a * a * second + (1 - a * a) * np.eye(d)
    gram[:, :d, d] = gram[:, d, :d] = a[:, 0] * m
    gram[:, d, d] = 1 + gamma ** 2
    rhs = np.concatenate([a * second, np.broadcast_to(m, (len(a), 1, d))], 1)
    b = np.linalg.solve(gram, rhs)  # [T, d + 1, d]: x0_hat^T = [x_t^T, c] b
    return b[:, :d].transpose(0, 2, 1), b[:, d]


def generated_gaussian(w, v, times):
    """What the DDIM ODE (eta 0) of the OU process makes from N(0, I) with the fitted denoisers (W, v at each of
    `times`, falling) and the clean condition c = 1. Each step is affine, so the Gaussian is carried exactly:
    -> (mean, covariance)."""
    d = v.shape[1]
    mean, cov = np.zeros(d), np.eye(d)
    for wt, vt, t, t_next in zip(w, v, times, list(times[1:]) + [0.0]):
        a, a_next = np.exp(-t), np.exp(-t_next)
        s, s_next = np.sqrt(1 - a * a), np.sqrt(1 - a_next * a_next)
        k = a_next - s_next * a / s  # x_next = a_next x0_hat + s_next eps_hat, eps_hat = (x - a x0_hat) / s
        step = k * wt + (s_next / s) * np.eye(d)
        mean, cov = step @ mean + k * vt, step @ cov @ step.T
    return mean, cov


def gmm_forms(m, s, gamma):
    """Closed forms of the corruptly trained model's class Gaussian from the class's empirical mean m and
    covariance s: (the least-squares fit's exact one, App. A Lemma 4 as the paper writes it). The fit's: the noise
    on c puts a ridge gamma^2 |v|^2 on v, so the model is the posterior mean of N(m/(1+g^2), s + g^2/(1+g^2) m m^T);
    Lemma 4 has |m|^2 I where the fit has m m^T: equal along m, d times the fit's in total."""
    lam, mean = gamma ** 2 / (1 + gamma ** 2), m / (1 + gamma ** 2)
    return (mean, s + lam * np.outer(m, m)), (mean, s + lam * (m @ m) * np.eye(len(m)))


def gmm_class(x0, mu, gammas, times):
    """One class's gains over clean training at each gamma: entropy gain (Thm 1) and W2^2 gain towards the truth
    N(mu, I) (Thm 2), measured on the simulated model and from the two closed forms. -> {gamma: 6 gains}."""
    fit = lambda g: generated_gaussian(*fit_denoiser(x0, np.exp(-times), g), times)
    truth, clean = (mu, np.eye(len(mu))), fit(0.0)
    m, s = x0.mean(0), np.cov(x0.T, bias=True)
    gains = lambda q, ref: (gaussian_entropy(q[1]) - gaussian_entropy(ref[1]), w2_gaussian(*truth, *ref) -
                            w2_gaussian(*truth, *q))
    out = {}
    for g in gammas:
        exact, lemma = gmm_forms(m, s, g)
        out[g] = gains(fit(g), clean) + gains(exact, (m, s)) + gains(lemma, (m, s))
    return out


def cmd_gmm(a):
    """Chen et al. Sec. 4 simulated: per class, a linear denoiser W_t x_t + v_t c fit by least squares on n_k
    draws of N(mu_k, I) (mu_k ~ N(0, I_d)) with and without gamma xi on the condition, sampled by the DDIM ODE;
    entropy and W2 gains against clean training, measured and predicted, averaged over classes and trials."""
    rng, times = np.random.default_rng(a.seed), np.geomspace(a.t_max, 1e-3, a.steps)
    gammas, rows = [g for g in a.gammas if g > 0], []
    for d in a.dims:
        gains = {g: [] for g in gammas}
        for _ in range(a.trials):
            for mu in rng.standard_normal((a.classes, d)):
                res = gmm_class(mu + rng.standard_normal((a.n_k, d)), mu, gammas, times)
                for g in gammas:
                    gains[g].append(res[g])
        for g in gammas:
            v = np.mean(gains[g], 0)
            rows.append(dict(d=d, n_k=a.n_k, gamma=g, entropy_gain=v[0], w2_gain=v[1], entropy_gain_fit=v[2],
                             w2_gain_fit=v[3], entropy_gain_lemma4=v[4], w2_gain_lemma4=v[5]))
    cols = [("d", lambda r: str(r["d"])), ("n_k", lambda r: str(r["n_k"])), ("gamma", lambda r: f"{r['gamma']:g}")]
    cols += [(k.replace("_", " "), lambda r, k=k: f"{r[k]:.4g}") for k in rows[0] if k not in ("d", "n_k", "gamma")]
    table = markdown(cols, rows)
    out = a.out or "gmm"
    plot(rows, out + ".png", "gamma", "gamma", [("entropy_gain", "entropy gain (measured)", "nats"),
         ("w2_gain", "W2^2 gain (measured)", "W2^2"), ("entropy_gain_fit", "entropy gain (fit's closed form)", "nats"),
         ("w2_gain_fit", "W2^2 gain (fit's closed form)", "W2^2")], lambda r: f"d {r['d']}, n_k {r['n_k']}")
    for d in a.dims:  # Thm 2 holds for gamma = O(1/sqrt(n_k)): where does the W2 gain turn into a loss?
        for key, what in (("w2_gain", "measured"), ("w2_gain_fit", "fit's closed form")):
            loss = [r["gamma"] for r in rows if r["d"] == d and r[key] < 0]
            table += f"d {d}: W2 gain ({what}) " + (f"is a loss from gamma {loss[0]:g} on\n" if loss else
                                                     "stays a gain over the gammas run\n")
    save_json(out + ".json", dict(rows=rows, args={k: v for k, v in vars(a).items() if k != "cmd"}))
    print(table + f"wrote {out}.json and {out}.png")
    return rows


# ----------------------------------------------------------------------------- main

def get_parser():
    """One sub-command per result; `metrics` is the default and needs no name. -> (parser, {command: its parser})."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    cmd = lambda name, about: sub.add_parser(name, help=about, description=about)
    count, out = Interval(int, "[1, inf)"), "JSON file for the result (default: beside the samples)"
    m = cmd("metrics", "FID, sFID, IS, precision/recall of samples against a reference (the default command)")
    m.add_argument("--samples", required=True, nargs="+", help="samples npz (arr_0 uint8 [N, H, W, C]); several: "
                                                                "each scored (a guidance sweep's files)")
    m.add_argument("--ref", required=True, help="dataset folder, pytorch-fid stats npz or ADM reference npz")
    m.add_argument("--allow-small", action="store_true", help=f"allow FID on fewer than {MIN_FID_SAMPLES}")
    m.add_argument("--save-features", help="write the samples' pool features to this npz")
    r = cmd("repro", "reproducibility: index-matched pairs of two or more sample sets (Zhang et al.)")
    r.add_argument("samples", nargs="+", help="two or more samples.npz of the same seed and conditions")
    mem = cmd("memorization", "highest similarity of each sample to the training set; memorized fraction")
    mem.add_argument("--samples", required=True)
    mem.add_argument("--ref", required=True, help="the training set's dataset folder, or the run folder (only "
                                                  "the images that run trained on, e.g. its --subset)")
    c = cmd("classify", "conditioning accuracy: does each sample show the class it was asked for?")
    c.add_argument("--samples", required=True)
    c.add_argument("--ref", required=True, help="a labelled dataset folder at the samples' resolution")
    c.add_argument("--epochs", type=count, default=3, help="epochs of the classifier over --ref")
    div = cmd("diversity", "Chen et al.'s RMD, nearest-neighbour L2, memorization ratio and sample entropy")
    div.add_argument("--samples", required=True, help="samples npz with class labels (arr_1)")
    div.add_argument("--ref", required=True, help="the training set (labelled dataset folder, or the run folder)")
    div.add_argument("--vq", help="VQModel for the sample entropy (default: the run's, if it trained on VQ latents)")
    div.add_argument("--l2-threshold", type=Interval(float, "[0, inf)"), default=0.12,
                     help="memorization: nearest L2 below this (paper: 0.12, CLIP features)")
    for q in (m, r, mem, div):
        q.add_argument("--inception-weights", help=f"path to {WEIGHTS_NAME} (default: cached download)")
        q.add_argument("--batch", type=count, default=500)
    for q in (r, mem, div):
        q.add_argument("--features", help="TorchScript feature model (e.g. SSCD), clip:FOLDER_OR_HUB_ID (CLIP image "
                                          "features, requirements-clip.txt) or `pixels`; default: Inception pool")
        q.add_argument("--feat-size", type=count, default=320, help="input size of --features")
        q.add_argument("--feat-norm", default="imagenet", choices=["imagenet", "none", "minus1_1"])
        q.add_argument("--threshold", type=Interval(float, "[-1, 1]"), default=0.6,
                       help="cosine similarity threshold (paper: 0.6)")
    ctl = cmd("control", "edge F1 of an adapter's samples against their Canny controls (control fidelity)")
    ctl.add_argument("--samples", required=True, help="samples npz of an adapter model, sampled with --controls")
    ctl.add_argument("--tolerance", type=Interval(int, "[0, 16]"), default=1, help="edge matching distance (pixels)")
    cs = cmd("clipscore", "CLIP score of text samples against their captions (Chen et al. Fig. 3c)")
    cs.add_argument("--samples", required=True, help="samples npz of a text model (captions)")
    cs.add_argument("--clip", required=True, help="CLIPModel folder or hub id (requirements-clip.txt)")
    for q in (m, r, mem, c, div, cs, ctl):
        q.add_argument("--device", default="auto")
        q.add_argument("--out", help=out)
    g = cmd("gmm", "Chen et al. Sec. 4 on a Gaussian mixture: entropy and W2 gains of corrupted conditions")
    g.add_argument("--dims", type=Interval(int, "[1, 512]", many=True), default=[4, 16, 64], help="data dimensions d")
    g.add_argument("--n-k", type=Interval(int, "[2, inf)"), default=100, help="training images per class")
    g.add_argument("--gammas", type=Interval(float, "[0, inf)", many=True), default=[0.05, 0.1, 0.15, 0.2, 0.3, 0.5],
                   help="condition noise levels (0 is the clean run every gain is measured against)")
    g.add_argument("--classes", type=count, default=2)
    g.add_argument("--trials", type=count, default=4, help="training sets drawn per d (Thm 2 is an expectation)")
    g.add_argument("--steps", type=Interval(int, "[2, inf)"), default=400, help="DDIM steps (and fitted times)")
    g.add_argument("--t-max", type=Interval(float, "(0, inf)"), default=8.0, help="OU time the ODE starts from")
    g.add_argument("--seed", type=Interval(int, "[0, inf)"), default=0)
    g.add_argument("--out", help="writes OUT.json and OUT.png (default: gmm.json, gmm.png here)")
    rep = cmd("report", "the eta table and plots of run folders (and the reproducibility study's)")
    rep.add_argument("runs", nargs="+", help="run folders holding metrics.json")
    rep.add_argument("--out", help="writes OUT.md and OUT.png (default: report.md and report.png in the run "
                                   "folders' parent, e.g. runs/)")
    return p, sub.choices


COMMANDS = dict(metrics=cmd_metrics, repro=cmd_repro, memorization=cmd_memorization, classify=cmd_classify,
                diversity=cmd_diversity, clipscore=cmd_clipscore, gmm=cmd_gmm, control=cmd_control,
                report=cmd_report)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        argv = ["metrics"] + argv
    p, commands = get_parser()
    a = p.parse_args(argv)
    return COMMANDS[a.cmd](check_flags(commands[a.cmd], a))


if __name__ == "__main__":
    cli(main, "evaluate.py")
