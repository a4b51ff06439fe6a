"""Condition corruption of Chen et al. (NeurIPS 2024), Sec. 3: flip a fraction eta of the class labels, or swap
the captions of a fraction eta of the images.

    python corrupt.py --data data/cifar10/train --eta 0.05 [--kind symmetric|asymmetric|swap] [--classes 0,1,2]
                      [--seed 0] [--out corruption.npz]

symmetric:  exactly round(eta * N) samples, each relabelled with a class drawn from the class prior restricted
            to the other classes.
asymmetric: only samples whose label lies in --classes are candidates (round(eta * their count) of them), each
            relabelled within --classes, again by the restricted prior (the paper flips within the IN-1K classes
            that overlap CIFAR-100).
swap:       exactly round(eta * N) images, paired at random, each pair swapping its captions (CC3M in the paper);
            with an odd count the last three rotate theirs, so no image keeps its own.
Input: a dataset folder (labels.npy, meta.json; captions.jsonl for swap). Output: a summary on stdout and, with
--out, an npz with the new labels, or the caption source of each image, and the mask of corrupted samples.
Training needs none of this: train.py corrupts by the same rules and writes its own corruption.npz.
The result is fixed by (labels, eta, kind, classes, seed). train.py's `resample` mode draws it anew every epoch
with seed (seed, epoch), the paper's App. E.4 "random data corruption".
"""
import argparse
import os

import numpy as np

from plumbing import Interval, check_flags, class_indices, cli, read_captions, read_dataset, save_npz


ETA = Interval(float, "[0, 1)")


def parse_classes(spec, class_names, flag="--classes"):
    """'0,5,7' or 'cat,dog' -> sorted array of class indices (at least two)."""
    return np.array(sorted(set(class_indices(spec, class_names, flag, at_least=2))), dtype=np.int64)


def flip_labels(labels, eta, num_classes, rng, classes=None):
    """Return (new_labels, mask). classes=None: symmetric over all classes; else flips stay inside `classes`."""
    ETA.check("eta", eta)
    labels = np.asarray(labels, dtype=np.int64)
    allowed = np.arange(num_classes) if classes is None else np.asarray(classes, dtype=np.int64)
    if len(allowed) < 2:
        raise ValueError("label flipping needs at least two classes")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), found {labels.min()}..{labels.max()}")
    candidates = np.flatnonzero(np.isin(labels, allowed))
    n_flip = int(round(eta * len(candidates)))
    chosen = rng.choice(candidates, size=n_flip, replace=False) if n_flip else np.zeros(0, dtype=np.int64)
    prior = np.bincount(labels[candidates], minlength=num_classes).astype(np.float64)[allowed]
    new = labels.copy()
    for j, c in enumerate(allowed):  # one draw per source class: the prior with the true class removed
        idx = chosen[labels[chosen] == c]
        if not len(idx):
            continue
        p = prior.copy()
        p[j] = 0.0
        if p.sum() == 0:
            raise ValueError(f"class {c} has no other class with samples to flip to")
        new[idx] = allowed[rng.choice(len(allowed), size=len(idx), p=p / p.sum())]
    mask = np.zeros(len(labels), dtype=bool)
    mask[chosen] = True
    return new, mask


def corrupt_labels(labels, eta, num_classes, seed, classes=None, epoch=None):
    """Deterministic corruption for (seed[, epoch]); epoch is given only in resample mode."""
    key = [seed] if epoch is None else [seed, epoch]
    return flip_labels(labels, eta, num_classes, np.random.default_rng(key), classes)


def swap_captions(n, eta, rng):
    """Return (source, mask): image i is trained with the caption(s) of image source[i]."""
    ETA.check("eta", eta)
    n_swap = int(round(eta * n))
    if n_swap == 1:
        raise ValueError(f"eta {eta} of {n} images is a single caption, and a swap needs two: use a larger eta or 0")
    source = np.arange(n, dtype=np.int64)
    chosen = rng.permutation(n)[:n_swap]
    pairs = chosen[:n_swap - 3] if n_swap % 2 else chosen
    source[pairs[0::2]], source[pairs[1::2]] = pairs[1::2], pairs[0::2]
    if n_swap % 2:  # an odd count: the last three rotate their captions
        a, b, c = chosen[-3:]
        source[[a, b, c]] = [b, c, a]
    mask = source != np.arange(n)
    return source, mask


def corrupt_captions(n, eta, seed, epoch=None):
    """Deterministic caption swap for (seed[, epoch]), as corrupt_labels."""
    return swap_captions(n, eta, np.random.default_rng([seed] if epoch is None else [seed, epoch]))


def changed_captions(captions, source, rows=None):
    """How many images a swap gives another caption (a swap of two identical captions changes nothing); rows: the
    dataset row of each position (a --subset)."""
    rows = np.arange(len(source)) if rows is None else rows
    return sum(captions[rows[i]] != captions[rows[j]] for i, j in enumerate(source) if i != j)


def summary(clean, noisy, mask, num_classes):
    conf = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(conf, (clean[mask], noisy[mask]), 1)
    lines = [f"corrupted {int(mask.sum())} of {len(clean)} labels ({mask.mean() * 100 if len(clean) else 0:.3f}%)"]
    touched = np.flatnonzero(conf.sum(1) + conf.sum(0))
    for c in touched[:20]:
        lines.append(f"  class {c}: {conf[c].sum()} flipped away, {conf[:, c].sum()} flipped in")
    if len(touched) > 20:
        lines.append(f"  ... and {len(touched) - 20} more classes")
    return "\n".join(lines)


def save(path, **arrays):
    if not path:
        return print("nothing written (--out FILE.npz keeps the corruption)")
    save_npz(path, **arrays)
    print(f"wrote {path}")


def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="dataset split folder (labels.npy, meta.json)")
    p.add_argument("--eta", type=ETA, required=True, help="corruption ratio in [0, 1)")
    p.add_argument("--kind", default="symmetric", choices=["symmetric", "asymmetric", "swap"],
                   help="label flips, or swap: caption swaps (needs captions.jsonl)")
    p.add_argument("--classes", help="asymmetric: comma-separated class indices or names")
    p.add_argument("--seed", type=Interval(int, "[0, inf)"), default=0)
    p.add_argument("--out", help="also write the corruption to this npz (default: print only)")
    return p


def main(argv=None):
    p = get_parser()
    a = check_flags(p, p.parse_args(argv))
    data = read_dataset(a.data)
    meta, labels = data.meta, data.labels
    if a.kind == "swap":
        captions = read_captions(os.path.join(a.data, "captions.jsonl"), len(labels))
        source, mask = corrupt_captions(len(labels), a.eta, a.seed)
        changed = changed_captions(captions, source)
        print(f"swapped the captions of {int(mask.sum())} of {len(labels)} images; {changed} captions changed "
              f"(the rest were swapped with an identical caption)")
        save(a.out, source=source, mask=mask, seed=a.seed, eta=a.eta)
        return
    classes = None
    if a.kind == "asymmetric":
        if not a.classes:
            raise ValueError("--kind asymmetric needs --classes")
        classes = parse_classes(a.classes, meta["class_names"])
    noisy, mask = corrupt_labels(labels, a.eta, meta["num_classes"], a.seed, classes)
    print(summary(labels, noisy, mask, meta["num_classes"]))
    save(a.out, labels=noisy, mask=mask, clean_labels=labels, seed=a.seed, eta=a.eta)


if __name__ == "__main__":
    cli(main, "corrupt.py")
