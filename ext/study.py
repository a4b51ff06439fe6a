"""The reproducibility study (Zhang et al., ICML 2024), run as evaluate.py commands: models trained on --subset
sizes and seeds, sampled with the same seed, compared image by image and against their training images.

    python evaluate.py repro A.npz B.npz [--features sscd.torchscript.pt --feat-size 320 --feat-norm imagenet]
    python evaluate.py memorization --samples S.npz --ref runs/NAME   # only the images that run trained on

repro.json, memorization.json; evaluate.py report tabulates and plots the study (report-study.png).
"""
import argparse
import os

import numpy as np
import torch

from evaluate import check_size, load_samples, save_result
from ext.measures import Features, feature_flags, image_folder, training_rows
from model import PRESETS
from plumbing import read_file, resolve_device


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


def cmd_memorization(a):
    """Highest similarity of each sample to any training image; memorized fraction above the threshold."""
    images, _, _ = load_samples(a.samples)
    folder, rows = training_rows(a.ref)
    check_size(images, image_folder(folder)[0], folder)
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


def study_rows(run_dirs):
    """The study's row of each run folder with a memorization.json (and a repro.json: its seed pair's score)."""
    rows = []
    for d in run_dirs:
        has = lambda f: os.path.isfile(os.path.join(d, f))
        if has("memorization.json") and has("config.json"):
            m, cfg = (read_file(os.path.join(d, f), "score the run again with evaluate.py memorization") for f in
                      ("memorization.json", "config.json"))
            n = cfg["train"].get("subset") or cfg["data"]["count"]
            rp = read_file(os.path.join(d, "repro.json"), "score the pair again with evaluate.py repro --out")[
                "rp_score"] if has("repro.json") else None
            rows.append(dict(run=os.path.basename(os.path.normpath(d)), images=n, log2n=float(np.log2(n)),
                             seed=cfg["train"]["seed"], rp=rp, gl=m["generalization_score"], features=m["features"],
                             width=cfg["model"].get("ch", PRESETS[cfg["model"]["preset"]].get("unet", {}).get("ch"))))
    return sorted(rows, key=lambda r: (r["width"], r["images"], r["seed"]))


EVALUATE = dict(repro=cmd_repro, memorization=cmd_memorization)  # evaluate.py's commands


def parser(command):
    p = argparse.ArgumentParser(prog=f"evaluate.py {command}", description=EVALUATE[command].__doc__)
    if command == "repro":
        p.add_argument("samples", nargs="+", help="two or more samples.npz of the same seed and conditions")
    else:
        p.add_argument("--samples", required=True)
        p.add_argument("--ref", required=True, help="the training set's dataset folder, or the run folder (only "
                                                    "the images that run trained on, e.g. its --subset)")
    feature_flags(p)
    return p
