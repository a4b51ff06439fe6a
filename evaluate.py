"""Evaluate samples: FID, sFID, Inception Score, precision/recall; and the commands of ext/, the eta report among them.

    python evaluate.py --samples runs/NAME/samples.npz --ref data/cifar10/train [--inception-weights PATH]
    python evaluate.py report runs/* [--out report]   # the eta table (ext/plots.py)
    python evaluate.py COMMAND --help      # the paper's other measures, the study, the simulation: see below

Input: samples.npz from sample.py, a reference dataset folder (or statistics npz). Output: metrics.json beside the
samples. The other commands (report: the eta table and figures of run folders, from their metrics.json; diversity,
classify, clipscore, repro, memorization, gmm, control) live in ext/ and are run through this script (EXTENSIONS, the
second lazy seam): `python evaluate.py --help` lists them all.

The Inception network is the FID variant of Inception-v3 (TensorFlow's inception-2015-12-05 as ported by
pytorch-fid), written out here so that its published weights load with strict=True. One pass gives the pool
features (FID, precision/recall), the logits without bias (IS) and the Mixed_6d spatial features (sFID), as in
the ADM evaluation suite.
"""
import argparse
import contextlib
import importlib
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from plumbing import (Interval, check_flags, cli, download, file_hash, read_dataset, read_file, resolve_device,
                      save_json, save_npz, to_float)

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
        x = to_float(images, unit=True).expand(-1, 3, -1, -1)
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


def check_size(images, ref, where, channels=True):
    """The one check that samples and reference images are comparable: the same size (and channel count)."""
    n, size = 3 if channels else 2, lambda a: "x".join(map(str, a.shape[1:4 if channels else 3]))
    if tuple(images.shape[1:1 + n]) != tuple(ref.shape[1:1 + n]):
        raise ValueError(f"{where} holds {size(ref)} images but the samples are {size(images)}: compare against a "
                         f"reference of the same size")


def reference(ref, net, sha, like=None):
    """Reference statistics and pool features of a dataset folder or an npz, cached beside it. The cache is keyed by
    the Inception weights' sha256 and by the version of the images it was computed from (their file's size and
    modification time, and a dataset's count and source checksum): a rebuilt dataset is never read through the old
    features, they are computed again."""
    source, meta = os.path.join(ref, "images.npy"), {}
    if os.path.isdir(ref):
        (images, meta, _), cache = image_folder(ref), os.path.join(ref, f"inception-{sha[:16]}.npz")
    elif os.path.isfile(ref):
        z = read_file(ref, "give a dataset folder, an ADM reference batch (arr_0) or pytorch-fid statistics")
        if "arr_0" not in z:
            if "mu" in z and "sigma" in z:  # pytorch-fid statistics: FID only
                return dict(mu=z["mu"], sigma=z["sigma"], count=None)
            raise ValueError(f"--ref {ref} has neither images (arr_0) nor statistics (mu, sigma)")
        images, source = z["arr_0"], ref  # an ADM reference batch: its images are run through our network
        cache = f"{ref}.inception-{sha[:16]}.npz"
    else:
        raise FileNotFoundError(f"--ref {ref} not found: give a dataset folder or an npz")
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"--ref {ref}: images must be uint8 [N, H, W, C]")
    if like is not None:
        check_size(like, images, f"--ref {ref}", channels=False)  # grey samples are read as RGB, as the reference
    st = os.stat(source)
    key = json.dumps(dict(inception=sha, size=st.st_size, mtime_ns=st.st_mtime_ns, count=meta.get("count"),
                          checksum=meta.get("source_checksum")), sort_keys=True)
    try:
        c = read_file(cache, "") if os.path.isfile(cache) else {}
    except ValueError:  # a cache cut short: computed again, as a stale one is
        c = {}
    if str(c.get("key")) == key:
        return {k: v for k, v in c.items() if k != "key"}
    if c or os.path.isfile(cache):
        print(f"{cache} was computed from another version of {ref} (or is damaged): computing it again", file=sys.stderr)
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
            ref = reference(a.ref, net, sha, images)
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


# ----------------------------------------------------------------------------- main

# The commands of ext/, imported only when run: the second lazy seam (README "Layout"). name: (module, what it does)
EXTENSIONS = {
    "report": ("plots", "the eta table and figures of run folders (and the reproducibility study's)"),
    "diversity": ("measures", "Chen et al.'s RMD, nearest-neighbour L2, memorization ratio, TopPR F1, VQ entropy"),
    "classify": ("measures", "conditioning accuracy: does each sample show the class it was asked for?"),
    "clipscore": ("measures", "CLIP score of text samples against their captions (Chen et al. Fig. 3c)"),
    "repro": ("study", "reproducibility: index-matched pairs of two or more sample sets (Zhang et al.)"),
    "memorization": ("study", "highest similarity of each sample to the training set; memorized fraction"),
    "gmm": ("gmm", "Chen et al. Sec. 4 on a Gaussian mixture: entropy and W2 gains of corrupted conditions"),
    "control": ("adapters", "edge F1 of an adapter's samples against their Canny controls (control fidelity)"),
}


def extension(module):
    """The second lazy seam: an ext/ module, imported when its command runs; None in a checkout without ext/."""
    try:
        return importlib.import_module(f"ext.{module}")
    except ModuleNotFoundError as e:
        if e.name not in ("ext", f"ext.{module}"):  # ext/ is there; something it imports is not
            raise
        return None


def get_parser():
    """metrics (the default: no name needed); the commands of EXTENSIONS are listed, their flags are their
    modules'. -> (parser, {command: its parser})."""
    p = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    m = sub.add_parser("metrics", help="FID, sFID, IS, precision/recall of samples against a reference (the default)")
    m.add_argument("--samples", required=True, nargs="+", help="samples npz (arr_0 uint8 [N, H, W, C]); several: "
                                                                "each scored (a guidance sweep's files)")
    m.add_argument("--ref", required=True, help="dataset folder, pytorch-fid stats npz or ADM reference npz")
    m.add_argument("--allow-small", action="store_true", help=f"allow FID on fewer than {MIN_FID_SAMPLES}")
    m.add_argument("--save-features", help="write the samples' pool features to this npz")
    inception_flags(m)
    m.add_argument("--out", help="JSON file for the result (default: metrics.json beside the samples)")
    for name, (module, about) in EXTENSIONS.items():
        sub.add_parser(name, help=f"{about} (ext/{module}.py)", add_help=False)
    return p, sub.choices


def inception_flags(p):
    """The flags of every command that runs the Inception network."""
    p.add_argument("--inception-weights", help=f"path to {WEIGHTS_NAME} (default: cached download)")
    p.add_argument("--batch", type=Interval(int, "[1, inf)"), default=500)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        return get_parser()[0].parse_args(argv)  # every command, with a line each
    name = argv[0] if argv and not argv[0].startswith("-") else "metrics"
    if name in EXTENSIONS:
        module = extension(EXTENSIONS[name][0])  # its parser(name) and EVALUATE[name], the command
        if module is None:
            raise ValueError(f"{name} is a command of ext/{EXTENSIONS[name][0]}.py, which this checkout does not have")
        p = module.parser(name)
        return module.EVALUATE[name](check_flags(p, p.parse_args(argv[1:])))
    if name != "metrics":
        raise ValueError(f"unknown command {name!r}: the commands are metrics (the default), "
                         f"{', '.join(EXTENSIONS)} (python evaluate.py --help)")
    p, commands = get_parser()
    a = p.parse_args(argv if argv and argv[0] == name else [name] + argv)
    return cmd_metrics(check_flags(commands[a.cmd], a))


if __name__ == "__main__":
    cli(main, "evaluate.py")
