"""Build a dataset folder: images.npy (uint8 [N, H, W, C], read with mmap), labels.npy (int64 [N]), meta.json,
and where there are captions captions.jsonl (line i: the caption, or a list of captions, of image i).

    python prepare_data.py --dataset shapes                      # synthetic, with captions, no download
    python prepare_data.py --dataset cifar10 [--archive PATH]    # official tarball, md5-checked
    python prepare_data.py --dataset imagefolder --src DIR --resolution 64 --split train   # ImageNet layout
    python prepare_data.py --dataset imagefolder --src DIR --captions captions.tsv --name cc3m   # image-text pairs
    python prepare_data.py --dataset latents --src data/in256/train --vae stabilityai/sd-vae-ft-ema   # latents
    torchrun --nproc_per_node=8 prepare_data.py --dataset latents ...         # encoding sharded over GPUs

A latent dataset folder holds latents.npy (float16 [N, 2, K, C, h, w]: the autoencoder's output for each image and
for its mirror; K = 2, the posterior's mean and std, for an AutoencoderKL, K = 1 for a VQModel) in place of
images.npy, and meta.json records the autoencoder (docs/file-formats.md); the latent path needs diffusers
(requirements-latent.txt). Control images for the adapters: python -m ext.adapters controls.

Output: DIR/NAME/SPLIT/ under --out (default data/), written to a temp folder and renamed when complete.
"""
import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import pickle
import shutil
import sys
import tarfile

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from plumbing import Interval, check_flags, cli, download, file_hash, read_captions, read_dataset

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


# ----------------------------------------------------------------------------- writing a split

def write_split(out_dir, images, labels, meta, captions=None, sizes=None, array="images.npy"):
    """Write images.npy (or latents.npy), labels.npy, meta.json [, captions.jsonl, sizes.npy] atomically (a temp
    folder renamed)."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if isinstance(images, str):  # already a .npy file on disk (imagefolder): move it in
            os.replace(images, os.path.join(tmp, array))
        else:
            np.save(os.path.join(tmp, array), np.ascontiguousarray(images, dtype=np.uint8))
        np.save(os.path.join(tmp, "labels.npy"), np.asarray(labels, dtype=np.int64))
        if captions is not None:
            with open(os.path.join(tmp, "captions.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(c, ensure_ascii=False) + "\n" for c in captions)
        if sizes is not None:  # original (height, width) of each image: control metadata (Berrada et al. 2024)
            np.save(os.path.join(tmp, "sizes.npy"), np.asarray(sizes, dtype=np.int64))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except OSError as e:  # disk full: the previous dataset folder, if any, stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"cannot write {out_dir} ({e.strerror or e}); nothing was changed: free some space and run "
                      f"again") from None
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    print(f"wrote {out_dir}: {meta['count']} {'latents' if 'latent' in meta else 'images'} "
          f"{meta['resolution']}x{meta['resolution']}x{meta['channels']}, "
          f"{meta['num_classes']} classes" + (", captions" if captions is not None else ""))


def make_meta(class_names, resolution, count, source, checksum, skipped=()):
    return dict(num_classes=len(class_names), class_names=list(class_names), resolution=resolution, channels=3,
                count=int(count), source=source, source_checksum=checksum, skipped=list(skipped))


# ----------------------------------------------------------------------------- shapes (synthetic)

SHAPES = ["disk", "square", "triangle", "cross", "ring"]
COLOURS = {"red": (220, 40, 40), "blue": (40, 90, 230)}
SHAPES_CLASSES = [f"{c} {s}" for c in COLOURS for s in SHAPES]


def draw_shape(rng, label, res=32, ss=4):
    """One image of class `label` (colour x shape): random size, position, hue jitter and background, antialiased.
    Returns the image and the shape's centre and radius as fractions of the image side."""
    colour, shape = SHAPES_CLASSES[label].split()
    big = res * ss
    bg = tuple(int(v) for v in rng.integers(0, 90, 3))
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    fg = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in COLOURS[colour])
    r = rng.uniform(0.22, 0.38) * big
    cx, cy = rng.uniform(r + 2, big - r - 2, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "disk":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    elif shape == "cross":
        w = r / 3
        d.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fg)
        d.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fg)
    else:  # ring
        d.ellipse(box, outline=fg, width=max(1, int(r / 3)))
    return np.asarray(img.resize((res, res), Image.BOX)), (cx / big, cy / big, r / big)


def shape_captions(rng, label, cx, cy, r):
    """Two captions of one shapes image: its colour and shape, a size word, and where it is, in varied wording."""
    colour, shape = SHAPES_CLASSES[label].split()
    size = "small " if r < 0.27 else "large " if r > 0.33 else ""
    v, h = ("top" if cy < 0.4 else "bottom" if cy > 0.6 else ""), ("left" if cx < 0.4 else "right" if cx > 0.6 else "")
    where = (f"in the {v} {h} corner" if v and h else f"on the {h}" if h else f"at the {v}" if v else "in the centre")
    first = [f"a {colour} {shape}", f"a {size}{colour} {shape}", f"{colour} {shape}"][rng.integers(3)]
    second = [f"a {size}{colour} {shape} {where}", f"{colour} {shape} {where}",
              f"a {colour} {shape} {where} on a dark background"][rng.integers(3)]
    return [first, second]


def make_shapes(count, seed, res=32):
    """(images, labels, captions); the captions' wording has its own random stream, so images stay as they were."""
    rng, words = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    labels = np.arange(count, dtype=np.int64) % len(SHAPES_CLASSES)
    rng.shuffle(labels)
    drawn = [draw_shape(rng, int(y), res) for y in labels]
    captions = [shape_captions(words, int(y), *where) for y, (_, where) in zip(labels, drawn)]
    return np.stack([img for img, _ in drawn]), labels, captions


def prepare_shapes(out, train_count, test_count, res=32):
    for split, count, seed in [("train", train_count, 0), ("test", test_count, 1)]:
        images, labels, captions = make_shapes(count, seed, res)
        checksum = "sha256:" + hashlib.sha256(images.tobytes()).hexdigest()
        meta = make_meta(SHAPES_CLASSES, res, count, f"shapes (synthetic, seed {seed})", checksum)
        write_split(os.path.join(out, "shapes", split), images, labels, meta, captions)


# ----------------------------------------------------------------------------- CIFAR-10

def fetch(url, dest, md5):
    """Fetch url to dest over HTTPS, checked, unless a file with the right md5 is already there."""
    if os.path.exists(dest) and file_hash(dest, "md5") == md5:
        return dest
    return download(url, dest, "md5", md5, f"with no network, fetch it elsewhere and pass --archive PATH (or put it "
                                           f"at {dest})")


class CifarUnpickler(pickle.Unpickler):
    """The CIFAR batches are Python 2 pickles of a dict of lists, bytes and one numpy array; nothing else may load."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} from a CIFAR batch")
        if name == "_reconstruct":
            return np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's own reconstructor, whatever module it lives in
        return getattr(np, name)


def read_cifar_batch(data):
    d = CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    images = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, np.asarray(d[b"labels"], dtype=np.int64)


def read_cifar10(archive):
    """Return {'train': (images, labels), 'test': (...)} from the python-version tarball."""
    parts = {}
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar.getmembers():
            base = os.path.basename(m.name)
            if m.name.startswith("/") or ".." in m.name.split("/") or not (m.isfile() or m.isdir()):
                raise ValueError(f"{archive} holds {m.name!r}, an absolute path, a path out of the archive or a "
                                 f"link: not the CIFAR-10 tarball (nothing is extracted to disk; refusing anyway)")
            if base.startswith("data_batch_") or base == "test_batch":
                parts[base] = read_cifar_batch(tar.extractfile(m).read())
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if any(n not in parts for n in names + ["test_batch"]):
        raise ValueError(f"{archive} is not the CIFAR-10 python tarball (batches missing)")
    cat = lambda ns: tuple(np.concatenate(x) for x in zip(*(parts[n] for n in ns)))
    return {"train": cat(names), "test": cat(["test_batch"])}


def prepare_cifar10(out, archive=None, expected_md5=CIFAR10_MD5):
    if archive is None:
        archive = fetch(CIFAR10_URL, os.path.join(out, "downloads", "cifar-10-python.tar.gz"), expected_md5)
    if not os.path.isfile(archive):
        raise FileNotFoundError(f"--archive {archive} does not exist")
    got = file_hash(archive, "md5")
    if got != expected_md5:  # checked before the archive is opened
        raise ValueError(f"{archive} has md5 {got}, expected {expected_md5}: re-download cifar-10-python.tar.gz")
    for split, (images, labels) in read_cifar10(archive).items():
        meta = make_meta(CIFAR10_CLASSES, 32, len(labels), CIFAR10_URL, "md5:" + got)
        write_split(os.path.join(out, "cifar10", split), images, labels, meta)


# ----------------------------------------------------------------------------- image folder (ImageNet layout)

def center_crop_arr(img, res):
    """ADM's preprocessing: halve with a box filter while at least twice the target, bicubic resize, centre crop."""
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.asarray(img)
    y, x = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return arr[y:y + res, x:x + res]


def load_image(args):
    """(path, res) -> (uint8 [res, res, 3], original (height, width)), or a string saying why it was skipped."""
    path, res = args
    try:
        with Image.open(path) as img:
            return center_crop_arr(img.convert("RGB"), res), img.size[::-1]
    except Exception as e:  # any undecodable file is skipped and listed, never fatal
        return f"{type(e).__name__}: {e}"


def list_image_folder(src):
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--src {src} is not a folder; give a folder with one sub-folder per class")
    classes = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))
    if not classes:
        raise ValueError(f"--src {src} has no class sub-folders")
    files = []
    for y, c in enumerate(classes):
        for root, _, names in sorted(os.walk(os.path.join(src, c))):
            files += [(os.path.join(root, n), y) for n in sorted(names) if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
    if not files:
        raise ValueError(f"--src {src} holds no images ({', '.join(sorted(IMAGE_EXTS))})")
    return classes, files


def read_caption_file(path, src):
    """A JSONL ({"image"|"path": ..., "caption"|"text": ...} per line) or TSV (path<TAB>caption) file of image-text
    pairs, paths relative to src -> ordered [(image path, [captions])]; repeated paths collect several captions."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions {path} does not exist")
    pairs = {}
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                raise ValueError(f"--captions {path} line {i} is not UTF-8: re-encode the file as UTF-8") from None
            if not line.strip() or (i == 1 and line.split("\t")[0] in ("image", "path", "filepath")):
                continue  # blank lines and a TSV header
            if path.endswith(".jsonl"):
                try:
                    o = json.loads(line)
                    img, cap = o.get("image", o.get("path")), o.get("caption", o.get("text"))
                except (ValueError, AttributeError):
                    img = cap = None
            else:
                img, _, cap = line.partition("\t")
            caps = [cap] if isinstance(cap, str) else cap
            if not img or not isinstance(caps, list) or not all(isinstance(c, str) and c.strip() for c in caps):
                raise ValueError(f"--captions {path} line {i}: want an image path and a non-empty caption "
                                 f"(JSONL keys image/caption, or TSV path<TAB>caption)")
            pairs.setdefault(os.path.join(src, img), []).extend(c.strip() for c in caps)
    if not pairs:
        raise ValueError(f"--captions {path} holds no image-caption pairs")
    return list(pairs.items())


def prepare_imagefolder(src, out, name, split, res, workers, captions_file=None):
    if captions_file:  # image-text pairs (CC3M): the caption file lists the images; no classes
        if not os.path.isdir(src):
            raise FileNotFoundError(f"--src {src} is not a folder")
        pairs = read_caption_file(captions_file, src)
        classes, files, captions = ["image"], [(p, 0) for p, _ in pairs], [c for _, c in pairs]
    else:
        (classes, files), captions = list_image_folder(src), None
    out_dir = os.path.join(out, name, split)
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    tmp_path = out_dir.rstrip("/") + ".images.tmp.npy"
    arr = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.uint8, shape=(len(files), res, res, 3))
    labels, kept, sizes, skipped, n = [], [], [], [], 0
    with mp.get_context("spawn").Pool(workers) as pool:
        results = pool.imap(load_image, [(p, res) for p, _ in files], chunksize=64)
        for k, ((path, y), r) in enumerate(tqdm(zip(files, results), total=len(files), desc=f"{name}/{split}",
                                                unit="img")):
            if isinstance(r, str):
                skipped.append(f"{path}: {r}")
                continue
            arr[n], size = r
            labels.append(y)
            kept.append(k)
            sizes.append(size)
            n += 1
    arr.flush()
    del arr
    if n == 0:  # nothing usable: no dataset folder (training would fail far from the cause)
        os.remove(tmp_path)
        raise ValueError(f"none of the {len(files)} files under {src} decoded as an image (first: {skipped[0]}): "
                         f"point --src at the image folder" if files else f"no image files under {src}")
    if skipped:  # shrink to the images that decoded, copying in chunks so nothing has to fit in memory
        src_arr = np.load(tmp_path, mmap_mode="r")
        final = tmp_path + ".2.npy"
        dst = np.lib.format.open_memmap(final, mode="w+", dtype=np.uint8, shape=(n, res, res, 3))
        for i in range(0, n, 8192):
            dst[i:i + 8192] = src_arr[i:min(i + 8192, n)]
        dst.flush()
        del dst, src_arr
        os.replace(final, tmp_path)
        print(f"skipped {len(skipped)} unreadable files (listed in meta.json)", file=sys.stderr)
    listing = hashlib.sha256("\n".join(f"{p}\t{y}" for p, y in files).encode()).hexdigest()
    meta = make_meta(classes, res, n, os.path.abspath(src), "sha256-of-file-list:" + listing, skipped)
    write_split(out_dir, tmp_path, labels, meta, None if captions is None else [captions[k] for k in kept], sizes)


# ----------------------------------------------------------------------------- latents

def prepare_latents(src, out, name, split, vae, scale=None, batch=64, shard_size=4096):
    """Encode a dataset folder of images once with an autoencoder (the image and its mirror: flipping a latent is not
    encoding a flipped image), in shards keyed by the autoencoder's and the images' hashes (a killed run resumes;
    under torchrun each rank encodes its shards), bf16 on a GPU."""
    import torch
    from model import ae_encode, load_autoencoder
    from plumbing import distributed, remove_shards, run_shards, setup_device, to_float
    data = read_dataset(src)
    if data.latent:
        raise ValueError(f"--src {src} holds latents already: give a dataset folder of images")
    meta, images = data.meta, data.images
    with distributed("auto", 1800) as (ddp, rank, world, local_rank):
        device, _, bf16 = setup_device("auto", local_rank)
        ae, info = load_autoencoder(vae, device)
        scale = info["scaling_factor"] if scale is None else scale
        if rank == 0:
            print(f"{info['cls']} {vae}: scaling factor {scale:g}" + (" (from its config; diffusers' VQModel configs "
                  "carry 0.18215 where LDM uses 1.0: --vae-scale 1)" if info["cls"] == "VQModel" and scale != 1
                  else ""))
        key = hashlib.sha256(json.dumps([info["sha256"], meta.get("source_checksum"), list(images.shape),
                                         bf16]).encode()).hexdigest()[:12]

        def encode(lo, hi, bar):
            parts = []
            for b in range(lo, hi, batch):
                x = to_float(images[b:min(b + batch, hi)], device).expand(-1, 3, -1, -1)
                with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
                    z = ae_encode(ae, torch.cat([x, x.flip(3)])).float()
                parts.append(torch.stack(z.chunk(2), 1).cpu().numpy().astype(np.float16))
                bad = np.flatnonzero(~np.isfinite(parts[-1].reshape(len(x), -1)).all(1))
                if len(bad):  # nan, inf or beyond float16: refused here, not as a nan loss in training
                    raise ValueError(f"{src}: image row {b + bad[0]} encodes to a non-finite latent (nan, inf or "
                                     f"beyond float16): check that image and the autoencoder; nothing is written")
                bar.update(len(x))
            return np.concatenate(parts)
        out_dir = os.path.join(out, name, split)
        shards = run_shards(out_dir, key, len(images), shard_size, encode, ddp, rank, world, "images",
                            "prepare_data.py", announce=lambda missing, total: None)
        if rank == 0:
            assemble_latents(src, out_dir, meta, shards, info, scale)
            remove_shards(shards)


def assemble_latents(src, out_dir, meta, shards, info, scale):
    """The shards -> latents.npy, and the source's labels, captions and sizes beside it."""
    first = np.load(shards[0], mmap_mode="r")
    tmp_path = out_dir.rstrip("/") + ".latents.tmp.npy"
    arr = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float16, shape=(meta["count"],) + first.shape[1:])
    n = 0
    for path in shards:
        part = np.load(path)
        arr[n:n + len(part)] = part
        n += len(part)
    arr.flush()
    del arr
    cap = os.path.join(src, "captions.jsonl")
    captions = read_captions(cap, meta["count"]) if os.path.isfile(cap) else None
    sizes = np.load(os.path.join(src, "sizes.npy")) if os.path.isfile(os.path.join(src, "sizes.npy")) else None
    _, _, k, c, h, _ = first.shape
    latent = dict(vae=info["vae"], cls=info["cls"], sha256=info["sha256"], scale=scale, kind="kl" if k == 2 else "vq",
                  shape=list(first.shape[1:]), image_resolution=meta["resolution"], image_channels=meta["channels"])
    # a resumed run checks count and checksum: the checksum covers the autoencoder and the scale too
    checksum = f"{meta.get('source_checksum')}|{info['sha256'][:16]}|{scale:g}"
    write_split(out_dir, tmp_path, np.load(os.path.join(src, "labels.npy")),
                dict(meta, resolution=h, channels=c, source=os.path.abspath(src), source_checksum=checksum,
                     latent=latent), captions, sizes, array="latents.npy")


# ----------------------------------------------------------------------------- main

def get_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a, count = p.add_argument, Interval(int, "[1, inf)")
    a("--dataset", required=True, choices=["shapes", "cifar10", "imagefolder", "latents"],
      help="shapes (synthetic, no download), cifar10 (the official tarball), imagefolder (ImageNet layout, or "
           "image-caption pairs with --captions), latents (a dataset folder encoded by --vae)")
    a("--out", default="data", help="root of the dataset folders")
    a("--archive", help="cifar10: a cifar-10-python.tar.gz already on disk")
    a("--src", help="imagefolder: folder with one sub-folder of images per class; latents: a dataset folder of images")
    a("--name", help="imagefolder: dataset name under --out (default: the folder's name); latents: (default: the "
                     "source dataset's name + -latents)")
    a("--split", help="split name to write (default: train; latents: the source's)")
    a("--vae", help="latents: autoencoder, a hub id or a folder in diffusers' format (ID:subfolder)")
    a("--vae-scale", type=Interval(float, "(0, inf)"), help="latents: scaling factor (default: the autoencoder's)")
    a("--batch", type=count, default=64, help="latents: images per encoder batch")
    a("--captions", help="imagefolder: JSONL or TSV of (image path relative to --src, caption)")
    a("--resolution", type=Interval(int, "[8, 1024]"), default=64, help="imagefolder: output size")
    a("--workers", type=count, default=os.cpu_count(), help="imagefolder: decoding processes")
    a("--count", type=Interval(int, "[10, inf)"), default=10000, help="shapes: training images (test gets a fifth)")
    return p


def main(argv=None):
    p = get_parser()
    a = check_flags(p, p.parse_args(argv))
    if a.dataset == "shapes":
        prepare_shapes(a.out, a.count, max(10, a.count // 5))
    elif a.dataset == "cifar10":
        prepare_cifar10(a.out, a.archive)
    elif a.dataset == "latents":
        if not a.src or not a.vae:
            raise ValueError("--dataset latents needs --src DATASET_FOLDER and --vae AUTOENCODER")
        src = os.path.normpath(a.src)
        prepare_latents(src, a.out, a.name or os.path.basename(os.path.dirname(os.path.abspath(src))) + "-latents",
                        a.split or os.path.basename(src), a.vae, a.vae_scale, a.batch)
    else:
        if not a.src:
            raise ValueError("--dataset imagefolder needs --src DIR (one sub-folder per class)")
        name = a.name or os.path.basename(os.path.normpath(a.src))
        prepare_imagefolder(a.src, a.out, name, a.split or "train", a.resolution, a.workers, a.captions)


if __name__ == "__main__":
    cli(main, "prepare_data.py", (ValueError, OSError, tarfile.TarError, pickle.UnpicklingError))
