"""What every stage shares and none is about: flags, devices and ranks, atomic files, downloads and hashes,
checkpoints, the dataset folder and its captions, resumable shards, PNG grids, MFU, one-line errors. torch is
imported where it is needed, so that corrupt.py and prepare_data.py (and its decoding workers) start without it."""
import argparse
import contextlib
import datetime
import hashlib
import importlib
import json
import math
import os
import pickle
import shutil
import sys
import textwrap
import time
import urllib.request
import warnings
import zipfile

import numpy as np


# ----------------------------------------------------------------------------- flags

class Interval:
    """type= of a numeric flag that also declares its range, as in maths: Interval(float, "[0, 1)"). argparse turns
    any error of a type into its own usage message, so the range is checked after parsing, by check_flags: one
    ValueError line that names the flag. NaN lies in no interval; inf only in one closed at inf. many: a
    comma-separated list of such numbers ("1.5,2,3")."""

    def __init__(self, kind, spec, many=False):
        self.kind, self.spec, self.many, self.__name__ = kind, spec, many, kind.__name__  # argparse names the type
        self.lo, self.hi = (float(x) for x in spec[1:-1].split(","))

    def __call__(self, text):
        return [self.kind(v) for v in text.split(",")] if self.many else self.kind(text)

    def __contains__(self, v):
        return (self.lo <= v if self.spec[0] == "[" else self.lo < v) and (v <= self.hi if self.spec[-1] == "]"
                                                                           else v < self.hi)

    def check(self, name, value):
        for v in value if isinstance(value, list) else [value]:
            if v is not None and v not in self:
                raise ValueError(f"--{name.replace('_', '-')} must be in {self.spec}, got {v}")


def check_flags(parser, args):
    """Every numeric flag within its Interval, before any work."""
    for a in (a for a in parser._actions if isinstance(a.type, Interval)):
        a.type.check(a.dest, getattr(args, a.dest, None))
    return args


def flag_adder(parser):
    """parser.add_argument that also takes resumable=True: a flag a resumed run may change (train.py)."""
    def add(*names, resumable=False, **kw):
        action = parser.add_argument(*names, **kw)
        action.resumable = resumable
        return action
    return add


def resumable_flags(parser):
    return {a.dest for a in parser._actions if getattr(a, "resumable", False)}


def class_indices(spec, names, flag, at_least=1):
    """'0,5,7' or 'cat,dog' (class indices or names, comma-separated) -> the class indices, in the order given."""
    out = []
    for word in (w.strip() for w in str(spec).split(",") if w.strip()):
        number = word.lstrip("-").isdigit()
        k = int(word) if number else names.index(word) if word in names else -1
        if not 0 <= k < len(names):
            known = f" or names ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
            raise ValueError(f"{flag} must be class indices in [0, {len(names)}){known}, comma-separated: unknown "
                             f"class {word if number else repr(word)}")
        out.append(k)
    if len(set(out)) < at_least:
        raise ValueError(f"{flag} needs at least {('one', 'two')[at_least - 1]} classes, got {spec!r}")
    return out


def optional(module, what, requirements):
    """An optional dependency, imported where it is used; missing, one line that says how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ValueError(f"{what} needs {module}: pip install -r {requirements}") from None


def cli(main, script, errors=(ValueError, OSError)):
    """Run main() as a script: a user's mistake or a broken file is one line, never a traceback."""
    try:
        main()
    except errors as e:
        sys.exit(f"{script}: error: {e}")
    except KeyboardInterrupt as e:
        sys.exit(f"{script}: interrupted: {e}" if e.args else f"{script}: interrupted")


# ----------------------------------------------------------------------------- device, ranks, seeds

def seed_of(*key):
    """A 63-bit seed for a tuple of integers (run seed, step, sample index, ...): independent streams per key."""
    return int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)


def resolve_device(name, local_rank=0):
    """--device auto|cpu|cuda -> torch.device; auto picks CUDA when there is one, each rank its own GPU."""
    import torch
    kind = name if name != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(f"cuda:{local_rank}" if kind == "cuda" else kind)


def setup_device(name, local_rank, compile=None, bf16=None, tf32=False):
    """(device, use_compile, use_bf16): torch.compile and bf16 autocast default to on where CUDA is, off elsewhere
    (bf16 only ever on CUDA); cuDNN picks its fastest kernels once, as a run's shapes never change."""
    import torch
    device = resolve_device(name, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
        if tf32:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    use_compile = compile if compile is not None else device.type == "cuda"
    return device, use_compile, (bf16 if bf16 is not None else True) and device.type == "cuda"


@contextlib.contextmanager
def distributed(device_name, timeout_s):
    """Under torchrun (RANK set): join the process group (NCCL on GPUs, gloo on the CPU; a dead rank makes the
    others fail within timeout_s) and leave it at the end. Yields (ddp, rank, world size, local rank)."""
    if "RANK" not in os.environ:
        yield False, 0, 1, 0
        return
    import torch
    import torch.distributed as dist
    backend = "nccl" if torch.cuda.is_available() and device_name != "cpu" else "gloo"
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:  # a rank that never came: the store times out
        raise OSError(f"cannot join the other ranks ({str(e).strip().splitlines()[0][:150]}): start them all, as "
                      f"torchrun does") from None
    try:
        yield True, dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def peers(rank, then="continue it with --resume"):
    """Around a collective: another rank's death (gloo: a RuntimeError; NCCL: an error or the --dist-timeout)
    ends the run with one line instead of a traceback; `then` says how to go on."""
    try:
        yield
    except RuntimeError as e:
        raise OSError(f"rank {rank} lost the other ranks ({str(e).splitlines()[0][:150]}): the run stops; "
                      f"{then}") from None


def barrier(ddp, rank, then):
    if ddp:
        import torch.distributed as dist
        with peers(rank, then):
            dist.barrier()


def to_device(t, device):
    """Host tensor -> device without a stream sync: a pageable host-to-device copy waits for the GPU."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def to_uint8(x):
    """[-1, 1] float [B, C, H, W] -> uint8 [B, H, W, C] numpy."""
    import torch
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def to_float(images, device=None, unit=False):
    """uint8 [B, H, W, C] (a tensor, or numpy: copied) -> float [B, C, H, W] on the device, in [-1, 1] (the data
    range) or, unit, in [0, 1] (control images, feature networks' inputs)."""
    import torch
    x = images if torch.is_tensor(images) else torch.from_numpy(np.array(images))
    x = (x if device is None else x.to(device)).permute(0, 3, 1, 2).float()
    return x / 255 if unit else x / 127.5 - 1


# ----------------------------------------------------------------------------- files

def save_atomic(path, write):
    """write(f) into a temp file in the same folder, fsync, rename: a crash never leaves a half-written file, and a
    failed write (disk full) removes its temp file and leaves the previous file as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # whatever the writer raised, Ctrl-C included, no temp file is left
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, ValueError) or not isinstance(e, Exception):  # a check of ours (download), or Ctrl-C
            raise
        # torch.save reports a full disk as RuntimeError ("enforce fail at inline_container.cc ... unexpected pos")
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {str(e).strip()[:120]}"
        raise OSError(f"cannot write {path} ({why.splitlines()[0]}); the previous file, if any, is unchanged: free "
                      f"some space and run again") from None


def save_npz(path, **arrays):
    """np.savez, atomically and byte for byte the same for the same arrays (zip entries without a timestamp), so
    a resumed run's file equals an uninterrupted one's."""
    import zipfile

    def write(f):
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, a in arrays.items():
                with z.open(zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0)), "w",
                            force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asanyarray(a), allow_pickle=False)
    save_atomic(path, write)


def save_json(path, obj):
    save_atomic(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def save_grid(path, images, nrow, labels=None, width=100):
    """uint8 [N, H, W, C] -> one PNG with nrow rows; labels: each row's class name or caption, whole, wrapped in a
    band of `width` pixels at the row's start (a row grows to fit a long caption)."""
    from PIL import Image, ImageDraw
    n, h, w, c = images.shape
    ncol, lw = math.ceil(n / nrow), width if labels else 0
    lines = [textwrap.wrap(label, lw // 6) or [""] for label in labels] if labels else [[]] * nrow
    tops = np.cumsum([0] + [max(h, 11 * len(l) + 2) for l in lines])  # PIL's default font: 6 x 11 pixels
    grid = np.zeros((tops[-1], lw + ncol * w, c), dtype=np.uint8)
    for k in range(n):
        r, q = divmod(k, ncol)
        grid[tops[r]:tops[r] + h, lw + q * w:lw + (q + 1) * w] = images[k]
    img = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    for r, rows in enumerate(lines):
        for j, line in enumerate(rows):
            ImageDraw.Draw(img).text((2, tops[r] + 1 + 11 * j), line, fill=255 if c == 1 else (255, 255, 255))
    save_atomic(path, lambda f: img.save(f, "PNG"))


def download(url, dest, algo, digest, hint):
    """Fetch url to dest through save_atomic, hashing as it streams: a file whose algo hexdigest does not start with
    digest is never renamed into place. hint: what to do without a network."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    try:
        r = urllib.request.urlopen(url, timeout=60)
    except OSError as e:
        raise OSError(f"cannot download {url} ({e}); {hint}") from None

    def write(f):
        h = hashlib.new(algo)
        with r, tqdm(total=int(r.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                     desc=os.path.basename(dest)) as bar:
            for chunk in iter(lambda: r.read(1 << 20), b""):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
        if not h.hexdigest().startswith(digest):
            raise ValueError(f"downloaded {os.path.basename(dest)} fails its {algo} check; download it again")
    save_atomic(dest, write)
    return dest


def file_hash(path, algo="sha256"):
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_hash(state):
    """sha256 of a state dict (names, dtypes, shapes, bytes): what a resumable output of these weights is keyed by,
    so that another model saved under the same path and step is never taken for this one."""
    import torch
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k} {t.dtype} {list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ----------------------------------------------------------------------------- checkpoints

CKPT_FORMAT = "slightdiff-ckpt-v1"


def ckpt_path(path):
    """A run folder or a checkpoint file -> the checkpoint file (its folder is the run folder)."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


def torch_load(path, allow=()):
    """torch.load(weights_only=True) to the CPU, the classes in allow let through (DiT's argparse.Namespace); any
    other pickled object is refused in one line, never run."""
    import torch
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refuses anything but tensors and plain containers
        what = next((l.split("error: ")[-1].split(".")[0] for l in str(e).splitlines() if "Unsupported" in l), "")
        raise ValueError(f"refusing {path}: it holds pickled objects, which weights-only loading does not run "
                         f"({what}); a checkpoint holds only tensors and plain values") from None


def load_checkpoint(path, ext=False):
    """Load a slightdiff checkpoint with weights_only=True; a missing, truncated or foreign file is a ValueError, and
    so is a run of an extension (an adapter, control metadata) unless ext: its module in ext/ loads it."""
    folder, path = os.path.isdir(path), ckpt_path(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the run folder {os.path.dirname(path)} has no checkpoint yet (train.py writes "
                                f"ckpt.pt every --ckpt-every steps)" if folder else f"checkpoint {path} not found: "
                                f"give a run folder or its ckpt.pt")
    try:  # torch.save writes a zip archive; ours says so in its pickle, read before any tensor is
        with zipfile.ZipFile(path) as z:
            ours = any(n.endswith("data.pkl") and CKPT_FORMAT.encode() in z.read(n) for n in z.namelist())
    except (OSError, zipfile.BadZipFile, EOFError):
        raise ValueError(f"{path} is not a checkpoint (truncated or not a torch file): give a run folder or its "
                         f"ckpt.pt") from None
    if not ours:
        raise ValueError(f"{path} is not a slightdiff checkpoint (format {CKPT_FORMAT})")
    try:
        ckpt = torch_load(path)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path} (truncated or not a torch file: "
                         f"{type(e).__name__}); use an earlier checkpoint or retrain") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a slightdiff checkpoint (format {CKPT_FORMAT})")
    missing = {"model", "ema", "opt", "step", "config"} - set(ckpt)
    if missing or not {"model", "diffusion", "train", "data"} <= set(ckpt["config"]):
        raise ValueError(f"{path} lacks {', '.join(sorted(missing)) or 'parts of its config'}: it was not written by "
                         f"this version of slightdiff's train.py")
    model = ckpt["config"]["model"]
    if model.get("preset") == "ldm4" and "transformer" not in model:  # written before the cin256-v2 block
        model.update(transformer=False, ff=True)
    made_by = "adapters" if "base" in ckpt["config"] else "metadata" if model.get("control") else \
        "released" if "bert" in model else None
    if made_by and not ext:
        raise ValueError(f"{path} is a run of ext/{made_by}.py: continue it or sample it with python -m ext.{made_by} "
                         f"(train --resume, sample --ckpt)")
    return ckpt


def load_weights(net, state, path, fits="the model in its config",
                 hint="was it written by another version of slightdiff or edited?"):
    """load_state_dict with a one-line error where the weights do not fit the model."""
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        detail = "; ".join(l.strip() for l in str(e).splitlines()[1:2])
        raise ValueError(f"{path}: its weights do not fit {fits} ({detail}); {hint}") from None


# ----------------------------------------------------------------------------- the dataset folder

def read_dataset(path, need_labels=True):
    """A dataset folder from prepare_data.py, checked: namespace of meta (meta.json), images (memory-mapped uint8
    [N, H, W, C], or a latent folder's float16 [N, 2 (image, mirror), K, C, h, w]), labels (int64 [N]) and whether
    it is latent. Anything missing or inconsistent is one ValueError line that says to rebuild it."""
    array = "latents.npy" if os.path.isfile(os.path.join(path, "latents.npy")) else "images.npy"
    for f in (array, "meta.json") + (("labels.npy",) if need_labels else ()):
        if not os.path.isfile(os.path.join(path, f)):
            raise FileNotFoundError(f"{path}/{f} missing: give a dataset folder made by prepare_data.py "
                                    f"(e.g. python prepare_data.py --dataset shapes)")
    try:
        meta = json.load(open(os.path.join(path, "meta.json")))
        num_classes, names = int(meta["num_classes"]), list(meta["class_names"])
        images = np.load(os.path.join(path, array), mmap_mode="r")
        labels = np.load(os.path.join(path, "labels.npy")) if need_labels else np.zeros(len(images), np.int64)
        latent = "latent" in meta
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot read meta.json (with num_classes, class_names), {array} or labels.npy "
                         f"({type(e).__name__}: {str(e)[:80]}); rebuild the dataset with prepare_data.py") from None
    want = (np.float16, 6, "float16 [N, 2, K, C, h, w]") if latent else (np.uint8, 4, "uint8 [N, H, W, C]")
    if images.dtype != want[0] or images.ndim != want[1] or len(images) != len(labels) or labels.ndim != 1:
        raise ValueError(f"{path}: {array} must be {want[2]} and labels.npy [N], found {images.dtype} "
                         f"{list(images.shape)} and {list(labels.shape)}; rebuild the dataset with prepare_data.py")
    h, w = images.shape[4:6] if latent else images.shape[1:3]
    if len(names) != num_classes or h != w or meta.get("resolution") != h \
            or not len(labels) or labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"{path}: meta.json does not describe its arrays (num_classes, class_names, resolution, "
                         f"labels in [0, num_classes)); rebuild the dataset with prepare_data.py")
    return argparse.Namespace(meta=meta, images=images, labels=labels.astype(np.int64), latent=latent)


def read_file(path, remake, mmap=False):
    """Every .json, .npy and .npz file the project reads goes through here: -> its content (an .npz as a dict of its
    arrays, read whole; an .npy memory-mapped with mmap). Missing, truncated or garbled is one line that names the
    file and says how to make it again (remake)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {remake}")
    try:
        if path.endswith(".json"):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        z = np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        return {k: z[k] for k in z.files} if isinstance(z, np.lib.npyio.NpzFile) else z
    except (OSError, ValueError, EOFError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise ValueError(f"cannot read {path} ({type(e).__name__}: {str(e).strip().splitlines()[0][:80]}): "
                         f"{remake}") from None


def check_labels(labels, num_classes, what, fix):
    """Class labels read from a file, each in [0, num_classes), before any work: a label equal to num_classes would
    silently be the null class of guidance, a larger one an index error half-way through."""
    labels = np.asarray(labels)
    bad = (labels < 0) | (labels >= num_classes)
    if labels.dtype.kind not in "iu" or bad.any():
        found = labels[bad][0] if labels.dtype.kind in "iu" else labels.dtype
        raise ValueError(f"{what} has label {found} where there are {num_classes} classes (0 .. {num_classes - 1}): "
                         f"{fix}")
    return labels


HUB_PROBE = {}  # the probe's answer, once per process


def hub_offline(spec, flag):
    """Before a hub id is fetched: where the hub cannot be reached (a 3 s probe; HF_HUB_OFFLINE=1 says so at once),
    only the local cache is looked in, so a miss fails at once instead of after a minute of retries. -> the line that
    says so (naming flag and the local alternative), or None where the hub answers."""
    import socket
    import urllib.parse
    if "offline" not in HUB_PROBE:
        host = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
        HUB_PROBE["offline"] = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        if not HUB_PROBE["offline"]:
            try:
                socket.create_connection((host, 443), timeout=3).close()
            except OSError:
                HUB_PROBE["offline"] = True
        if HUB_PROBE["offline"]:
            os.environ["HF_HUB_OFFLINE"] = "1"
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks")  # diffusers' call, not ours
            if "huggingface_hub.constants" in sys.modules:  # imported already: its flag is read at each call
                sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
    return f"{flag} {spec}: the hub cannot be reached from here and {spec} is not in the local cache: give {flag} a " \
        f"local folder (the model saved with save_pretrained) or a hub id reachable from here" \
        if HUB_PROBE["offline"] else None


def read_captions(path, count=None):
    """A dataset folder's captions.jsonl -> list (one per image: count of them) of lists of captions; bad files are
    a ValueError."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} missing: build a dataset with captions (prepare_data.py --dataset shapes, "
                                f"or --dataset imagefolder --captions FILE)")
    out = []
    with open(path, "rb") as f:
        for i, line in enumerate(f, 1):
            try:
                c = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                raise ValueError(f"{path} line {i} is not a UTF-8 JSON caption ({type(e).__name__}): rebuild the "
                                 f"dataset with prepare_data.py") from None
            c = [c] if isinstance(c, str) else c
            if not isinstance(c, list) or not c or not all(isinstance(x, str) for x in c):
                raise ValueError(f"{path} line {i}: want a caption or a non-empty list of captions")
            out.append(c)
    if count is not None and len(out) != count:
        raise ValueError(f"{path} has {len(out)} lines for {count} images: rebuild the dataset with prepare_data.py")
    return out


# ----------------------------------------------------------------------------- resumable shards

def run_shards(prefix, key, n, shard_size, make, ddp, rank, world, desc, script, announce=print):
    """Items [0, n) in shards, each saved as it finishes to PREFIX.shards-KEY/ (KEY hashes all that decides the
    content: other settings never resume them); the missing ones are split over the ranks. make(lo, hi, bar) -> the
    array of items [lo, hi). -> every shard's path, in order, for rank 0 to merge (then remove_shards)."""
    from tqdm import tqdm
    folder, then = f"{prefix}.shards-{key}", f"run {script} again: the shards it finished are kept"
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{s:06d}.npy") for s in range(-(-n // shard_size))]
    missing = [s for s, p in enumerate(paths) if not os.path.exists(p)]
    todo = missing[rank::world]
    barrier(ddp, rank, then)  # every rank lists the shards before any rank writes one
    if rank == 0:
        announce(len(missing), len(paths))
    bar = tqdm(total=sum(min(shard_size, n - s * shard_size) for s in todo), disable=rank != 0, unit="img",
               dynamic_ncols=True, desc=desc)
    t0 = time.perf_counter()
    for s in todo:
        part = make(s * shard_size, min((s + 1) * shard_size, n), bar)
        save_atomic(paths[s], lambda f: np.save(f, part))
    bar.close()
    if todo:
        dt = time.perf_counter() - t0
        print(f"rank {rank}: {bar.n} {desc} in {dt:.1f} s, {bar.n / dt:.1f} images/s")
    barrier(ddp, rank, then)
    return paths


def remove_shards(paths):
    shutil.rmtree(os.path.dirname(paths[0]))


# ----------------------------------------------------------------------------- MFU

# Dense bf16 tensor-core peaks (FLOP/s) for MFU, from the vendors' data sheets.
PEAK_BF16 = {"H100 SXM": 989.4e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12,
             "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165.2e12}


def peak_flops(device):
    """The GPU's dense bf16 peak (FLOP/s) from PEAK_BF16, or None (a CPU, an unknown GPU): MFU is then not given."""
    import torch
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return next((v for k, v in PEAK_BF16.items() if k in name), None) if name else None


def mfu(flops_img, images_per_s, peak, world):
    """Model FLOPs utilisation: the training FLOPs done per second over the peak of all the GPUs, or None."""
    return flops_img * images_per_s / (peak * world) if peak else None
