"""The paper's other measures (Chen et al. Fig. 3, Fig. 4, App. B.7), run as evaluate.py commands:

    python evaluate.py diversity --samples S.npz --ref runs/NAME [--features clip:ID] [--vq VQMODEL]
    python evaluate.py classify --samples S.npz --ref data/shapes/train   # does each sample show its condition?
    python evaluate.py clipscore --samples S.npz --clip openai/clip-vit-base-patch16

  Features       L2-normalised features of images: our Inception's pool, CLIP (transformers), a TorchScript network
                 (SSCD), or pixels; the reproducibility study (study.py) uses them too
  diversity      top-1% relative Mahalanobis distance and its density, top-5 nearest-neighbour L2, memorization
                 ratio, TopPR F1, and with a VQ autoencoder the sample entropy (diversity.json)
  classify       conditioning accuracy by a small CNN fit to the reference set (classify.json)
  clipscore      CLIP score of text samples against their captions (clipscore.json)
"""
import argparse
import math
import os
import re

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from evaluate import (WEIGHTS_SHA_PREFIX, check_size, image_folder, inception_features, inception_flags,
                      load_inception, load_samples, reference, save_result, sq_dists)
from model import load_autoencoder
from plumbing import Interval, check_labels, hub_offline, optional, read_file, resolve_device, to_float


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
            x = to_float(images[i:i + self.batch], self.device, unit=True)
            x = F.interpolate(x.expand(-1, 3, -1, -1), size=(self.size, self.size), mode="bilinear",
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


def training_rows(ref):
    """(dataset folder, rows or None) of --ref: a dataset folder (every image), or a run folder (the images it
    trained on: its data path and the index of --subset in its corruption.npz)."""
    if not os.path.isfile(os.path.join(ref, "config.json")):
        return ref, None
    folder = read_file(os.path.join(ref, "config.json"), "train.py writes it: a run folder without one is no run")
    corruption = read_file(os.path.join(ref, "corruption.npz"), "resume the run (train.py --resume) to write it again")
    if "index" not in corruption:
        raise ValueError(f"--ref {ref}: its corruption.npz has no index of the training rows: resume the run to write it")
    return folder["data"]["path"], corruption["index"]


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
        x = to_float(images[i:i + batch], device)
        codes.append(ae.quantize(ae.encode(x.expand(-1, 3, -1, -1)).latents)[2][2].reshape(-1).cpu())
    return torch.cat(codes).numpy(), ae.quantize.n_e


CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def load_clip(spec, device):
    """CLIP through transformers (what diffusers users have already: Stable Diffusion's pipelines need it), from a
    folder in its format or a hub id given explicitly, e.g. clip:openai/clip-vit-base-patch16 (the paper's ViT-B/16):
    nothing is fetched unasked. -> (model, its tokenizer or None)."""
    transformers = optional("transformers", "CLIP", "requirements-clip.txt")
    offline = None if os.path.exists(spec) else hub_offline(spec, "clip:")
    try:
        net = transformers.CLIPModel.from_pretrained(spec).to(device).eval().requires_grad_(False)
    except Exception as e:  # no such folder, no network, another model
        raise ValueError(offline or f"cannot load CLIP {spec} ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0][:120]}): give a CLIPModel folder in transformers' format or "
                         f"a hub id reachable from here") from None
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
        x = to_float(images[i:i + batch], device, unit=True)
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
    check_size(images, ref_images, folder)
    check_labels(conditions, meta["num_classes"], a.samples, f"score samples of {folder}'s classes")
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
    prep = lambda x: to_float(x, device)
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
    check_size(images, ref, f"--ref {a.ref}")
    if conditions.dtype.kind != "U":
        check_labels(conditions, meta["num_classes"], a.samples, "judge them against a dataset of their classes")
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


# ----------------------------------------------------------------------------- the commands' flags

def feature_flags(p):
    """The flags of every command that compares images by their features (diversity, repro, memorization)."""
    inception_flags(p)
    p.add_argument("--features", help="TorchScript feature model (e.g. SSCD), clip:FOLDER_OR_HUB_ID (CLIP image "
                                      "features, requirements-clip.txt) or `pixels`; default: Inception pool")
    p.add_argument("--feat-size", type=Interval(int, "[1, inf)"), default=320, help="input size of --features")
    p.add_argument("--feat-norm", default="imagenet", choices=["imagenet", "none", "minus1_1"])
    p.add_argument("--threshold", type=Interval(float, "[-1, 1]"), default=0.6,
                   help="cosine similarity threshold (paper: 0.6)")
    p.add_argument("--out", help="JSON file for the result (default: beside the samples)")


EVALUATE = dict(diversity=cmd_diversity, classify=cmd_classify, clipscore=cmd_clipscore)  # evaluate.py's commands


def parser(command):
    p = argparse.ArgumentParser(prog=f"evaluate.py {command}", description=EVALUATE[command].__doc__)
    p.add_argument("--samples", required=True, help="samples npz from sample.py")
    if command == "diversity":
        p.add_argument("--ref", required=True, help="the training set (labelled dataset folder, or the run folder)")
        p.add_argument("--vq", help="VQModel for the sample entropy (default: the run's, if it trained on VQ latents)")
        p.add_argument("--l2-threshold", type=Interval(float, "[0, inf)"), default=0.12,
                       help="memorization: nearest L2 below this (paper: 0.12, CLIP features)")
        feature_flags(p)
    elif command == "classify":
        p.add_argument("--ref", required=True, help="a labelled dataset folder at the samples' resolution")
        p.add_argument("--epochs", type=Interval(int, "[1, inf)"), default=3, help="epochs of the classifier over --ref")
    else:
        p.add_argument("--clip", required=True, help="CLIPModel folder or hub id (requirements-clip.txt)")
    if command != "diversity":
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument("--out", help="JSON file for the result (default: beside the samples)")
    return p
