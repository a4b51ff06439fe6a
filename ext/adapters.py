"""Downstream adaptation on a frozen pre-trained run (Chen et al. Sec. 3.2): ControlNet (UNet; DiT as PixArt-delta's
ControlNet-Transformer) and T2I-Adapter (UNet), their control images and their control fidelity.

    python -m ext.adapters controls --src data/shapes/train --control canny   # controls.npy: Canny edges (OpenCV)
    python -m ext.adapters controls --src data/in100/train --control masks.npy  # maps made elsewhere (SAM)
    python -m ext.adapters train --data data/shapes/train --init-from runs/BASE --adapter controlnet [train.py flags]
    python -m ext.adapters train --resume runs/BASE-controlnet
    python -m ext.adapters sample --ckpt runs/BASE-controlnet --controls data/shapes/test [sample.py flags]
    python evaluate.py control --samples runs/BASE-controlnet/samples.npz     # edge F1 against the controls

An adapter run's checkpoint holds the adapter's weights and names its base run (path, weights' sha256, its
corruption); its base's weights are added on load and checked. Only the adapter trains; the base stays frozen, in
eval mode. train and sample are train.py and sample.py with the control image as one more network input.
"""
import argparse
import copy
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import sample
import train
from ext import run_command
from ext.metadata import MetadataDenoiser, neutral_control, sample_flags, with_metadata
from model import Downsample, load_model, zero_init
from evaluate import load_samples, save_result
from plumbing import (Interval, check_flags, check_labels, ckpt_path, cli, distributed, file_hash, load_checkpoint,
                      load_weights, optional, read_dataset, read_file, save_atomic, save_json, to_float, weights_hash)


# ----------------------------------------------------------------------------- the networks

def skip_channels(unet):
    """The channels of every skip connection of a UNet, then of its middle block: where ControlNet adds."""
    out = lambda m: (m.conv if isinstance(m, Downsample) else m.res.conv2).out_channels
    return [unet.conv_in.out_channels] + [out(m) for m in unet.down] + [out(unet.mid[-1])]


def level_ends(unet):
    """The encoder blocks that end a resolution level (before a Downsample, or last): where T2I-Adapter adds."""
    last = len(unet.down) - 1
    return [i for i, m in enumerate(unet.down) if not isinstance(m, Downsample) and
            (i == last or isinstance(unet.down[i + 1], Downsample))]


def hint_encoder(hint_ch, out_ch, down, patch=1):
    """The control image ([0, 1], at the image's resolution) -> features at the network's input resolution (down: image
    pixels per latent pixel), then patchified for a DiT: ControlNet's small convolution stack, its last layer
    zero-initialised."""
    layers, c = [nn.Conv2d(hint_ch, 16, 3, padding=1), nn.SiLU()], 16
    for _ in range(int(math.log2(down))):
        layers += [nn.Conv2d(c, 2 * c, 3, stride=2, padding=1), nn.SiLU()]
        c *= 2
    last = nn.Conv2d(c, out_ch, 3, padding=1) if patch == 1 else nn.Conv2d(c, out_ch, patch, stride=patch)
    return nn.Sequential(*layers, zero_init(last))


class ControlNet(nn.Module):
    """Zhang et al. 2023 for the UNet: a trainable copy of its encoder and middle block (initialised from the base by
    reset), reading the control image through the hint encoder after its first convolution; zero-initialised 1x1
    convolutions add the copy's features into the frozen UNet's skip connections and middle block."""

    def __init__(self, unet, hint_ch, down):
        super().__init__()
        self.copy = copy.deepcopy(unet)
        del self.copy.up, self.copy.norm_out, self.copy.conv_out
        self.hint = hint_encoder(hint_ch, unet.ch, down)
        self.zero = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in skip_channels(unet))

    def reset(self, unet):
        self.copy.load_state_dict({k: v for k, v in unet.state_dict().items() if k in self.copy.state_dict()})

    def forward(self, unet, x, t, c_vec, c_tokens, hint):
        emb = self.copy.embed(t, c_vec)
        feats = self.copy.encode(self.copy.conv_in(x) + self.hint(hint), emb, c_tokens)
        emb = unet.embed(t, c_vec)
        hs = unet.encode(unet.conv_in(x), emb, c_tokens)
        return unet.decode([h + z(f) for h, z, f in zip(hs, self.zero, feats)], emb, c_tokens)


class T2IAdapter(nn.Module):
    """Mou et al. 2023 for the UNet: the control image pixel-unshuffled to the network's resolution, one small
    convolution stage per encoder level (stride 2 between levels), each stage's output added to the encoder's
    features at the end of its level. The outputs are zero-initialised (ours, not the authors'): a fresh adapter
    changes nothing, as a fresh ControlNet."""

    def __init__(self, unet, hint_ch, down):
        super().__init__()
        self.ends = level_ends(unet)
        chans = [unet.down[i].res.conv2.out_channels for i in self.ends]
        self.stem = nn.Sequential(nn.PixelUnshuffle(down), nn.Conv2d(hint_ch * down * down, chans[0], 3, padding=1))
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU(),
                                                  nn.Conv2d(b, b, 3, padding=1))
                                    for i, (a, b) in enumerate(zip(chans[:1] + chans, chans)))
        self.out = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in chans)

    def forward(self, unet, x, t, c_vec, c_tokens, hint):
        f, feats = self.stem(hint), []
        for stage, out in zip(self.stages, self.out):
            f = stage(f)
            feats.append(out(f))
        # UNet.encode, with each level's feature added at the level's end
        emb, h = unet.embed(t, c_vec), unet.conv_in(x)
        hs = [h]
        for i, m in enumerate(unet.down):
            h = m(h) if isinstance(m, Downsample) else m(h, emb, c_tokens)
            h = h + feats[self.ends.index(i)] if i in self.ends else h
            hs.append(h)
        for m in unet.mid:
            h = m(h, emb, c_tokens)
        return unet.decode(hs + [h], emb, c_tokens)


class DiTControlNet(nn.Module):
    """ControlNet for the DiT as PixArt-delta's ControlNet-Transformer: trainable copies of the first half of the
    blocks (initialised from the base by reset), whose stream starts from the patch tokens plus the hint encoder's
    (patchified, zero-initialised); each copy's output joins the frozen stream after the block of the same index
    through a zero-initialised linear layer."""

    def __init__(self, dit, hint_ch, down):
        super().__init__()
        self.blocks = copy.deepcopy(dit.blocks[:max(1, len(dit.blocks) // 2)])
        self.hint = hint_encoder(hint_ch, dit.emb_dim, down, dit.patch)
        self.zero = nn.ModuleList(zero_init(nn.Linear(dit.emb_dim, dit.emb_dim)) for _ in self.blocks)

    def reset(self, dit):
        self.blocks.load_state_dict(dit.blocks[:len(self.blocks)].state_dict())

    def forward(self, dit, x, t, c_vec, c_tokens, hint):
        h, c = dit.embed(x, t, c_vec)
        a = h + rearrange(self.hint(hint), "b d y x -> b (y x) d")
        for i, block in enumerate(dit.blocks):
            h = block(h, c, c_tokens)
            if i < len(self.blocks):
                a = self.blocks[i](a, c, c_tokens)
                h = h + self.zero[i](a)
        return dit.final(h, c)


ADAPTERS = {("controlnet", "unet"): ControlNet, ("t2i", "unet"): T2IAdapter, ("controlnet", "dit"): DiTControlNet}


class AdapterDenoiser(MetadataDenoiser):
    """A Denoiser (with control metadata if its base has them) whose network reads a control image hint [B, C, H, W]
    in [0, 1] through an adapter: controlnet or t2i on control images of hint_ch channels at hint_res (default: the
    resolution; latents: the images')."""

    def __init__(self, adapter, hint_ch=1, hint_res=None, **model):
        super().__init__(**model)
        kind, res = "unet" if self.unet is not None else "dit", self.resolution
        down = (hint_res or res) // res
        if (adapter, kind) not in ADAPTERS or down * res != (hint_res or res) or down & (down - 1):
            raise ValueError(f"no {adapter} for a {kind.upper()} on {hint_res}-pixel controls at resolution "
                             f"{res}: controlnet (UNet, DiT) or t2i (UNet), controls 2^k x the resolution")
        self.adapter = ADAPTERS[adapter, kind](self.backbone, hint_ch, down)

    def train(self, mode=True):
        """The frozen base stays in eval mode (no dropout) while the adapter trains, as in ControlNet's training."""
        super().train(mode)
        self.backbone.train(False)
        return self

    def forward(self, x, t, c, cond_delta=None, ctrl=None, hint=None):
        return self.adapter(self.backbone, x, t, *self.condition(c, t, cond_delta, ctrl), hint.to(x.dtype))


def load_run(spec):
    """An adapter run's checkpoint with its base's (EMA) weights added, refused unless they are the ones the adapter
    was trained on; a plain run as it is."""
    ckpt = load_checkpoint(spec, ext=True)
    base = ckpt["config"].get("base")
    if not base:
        return ckpt
    try:
        state = load_model(base["path"], with_vae=False, ext=True)["ema"]
    except (OSError, ValueError) as e:
        raise ValueError(f"this adapter's base run {base['path']} cannot be read ({str(e)[:100]}): put it back "
                         f"there") from None
    if weights_hash(state) != base["sha256"]:
        raise ValueError(f"the base run {base['path']} is not the one this adapter was trained on (weights sha256 "
                         f"{weights_hash(state)[:12]} vs {base['sha256'][:12]}): put that run back there")
    return dict(ckpt, model={**state, **ckpt["model"]}, ema={**state, **ckpt["ema"]})



# ----------------------------------------------------------------------------- control images

def canny(images, low, high):
    """OpenCV's Canny edges of uint8 RGB images (ControlNet's annotator) -> uint8 [N, H, W, 1], 0 or 255."""
    cv2 = optional("cv2", "--control canny", "requirements-canny.txt")
    return np.stack([cv2.Canny(np.ascontiguousarray(im), low, high) for im in images])[..., None]


def add_controls(folder, control, thresholds):
    """controls.npy beside a dataset folder's images, what an adapter is conditioned on: their Canny edges, or an
    array made elsewhere (SAM masks, depth) uint8 [N, H, W(, C)] in images.npy order; meta.json records which."""
    d = read_dataset(folder, need_labels=False)
    res = d.meta["latent"]["image_resolution"] if d.latent else d.meta["resolution"]
    if control == "canny":
        if d.latent:
            raise ValueError(f"{folder} holds latents: compute the edges on the images they came from (--control "
                             f"canny --src IMAGES) and give that file: --control IMAGES/controls.npy")
        arr, record = canny(d.images, *thresholds), dict(kind="canny", low=thresholds[0], high=thresholds[1])
    else:
        try:
            arr = np.load(control, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read --control {control} as .npy ({type(e).__name__})") from None
        arr = arr[..., None] if arr.ndim == 3 else arr
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[:3] != (len(d.images), res, res):
            raise ValueError(f"--control {control} is {arr.dtype} {list(arr.shape)}: want uint8 [{len(d.images)}, "
                             f"{res}, {res}(, C)], one map per image of {folder} in its order, at the image size")
        record = dict(kind="file", file=os.path.abspath(control), sha256=file_hash(control))
    save_atomic(os.path.join(folder, "controls.npy"), lambda f: np.save(f, np.ascontiguousarray(arr)))
    save_json(os.path.join(folder, "meta.json"), dict(d.meta, control=dict(record, channels=int(arr.shape[3]))))
    print(f"wrote {folder}/controls.npy: {arr.dtype} {list(arr.shape)} ({record['kind']}); meta.json records it")


def read_controls(folder, count, res, channels=None):
    """A dataset folder's controls.npy (prepare_data.py --control), memory-mapped: uint8 [N, res, res, C], checked."""
    path, remake = os.path.join(folder, "controls.npy"), f"python -m ext.adapters controls --control canny --src {folder}"
    if not os.path.isfile(path):
        raise ValueError(f"{folder} has no controls.npy, the control images of an adapter: make them with {remake}")
    c = read_file(path, f"make it again with {remake}", mmap=True)
    if c.dtype != np.uint8 or c.ndim != 4 or c.shape[1:3] != (res, res) or count not in (None, len(c)) or \
            channels not in (None, c.shape[3]):
        raise ValueError(f"{path} is {c.dtype} {list(c.shape)}: want uint8 [{count or 'N'}, {res}, {res}, "
                         f"{channels or 'C'}], one control per image at the image size (as the model was trained "
                         f"on); make it again with python -m ext.adapters controls")
    return c


# ----------------------------------------------------------------------------- train: only the adapter

def train_main(argv):
    """python -m ext.adapters train: train.py's flags and --adapter; its main, with a frozen base and the control
    image of each image as one more input of the network."""
    p = train.get_parser()
    p.add_argument("--adapter", choices=["controlnet", "t2i"], help="train only a ControlNet (UNet, DiT) or a "
                   "T2I-Adapter (UNet) on the dataset's controls.npy, on top of the frozen --init-from run")
    p.description = __doc__
    args = train.parse_args(argv, p)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        # Configuration: the base's network and diffusion exactly (it stays frozen), loaded once
        ckpt = load_run(args.resume) if args.resume else None
        base = None if ckpt else base_run(args)
        cfg = train.resolve_config(args, world, ckpt)
        rt = train.runtime(cfg, ddp, rank, world, local_rank)

        # Data, and the control image of each image
        data = train.load_data(cfg, rt.device, rank)
        controls = read_controls(cfg.data, len(read_dataset(cfg.data).labels), data.image_res)
        hints = train.Batches(controls, data.index, rt.device, cfg.seed, None, data.batches.index is None, cfg.data)

        # The frozen base with the adapter on top
        model_cfg, diff_cfg = (ckpt["config"]["model"], ckpt["config"]["diffusion"]) if ckpt else \
            adapter_config(cfg, data, base["config"], controls.shape[3])
        config = train.run_config(cfg, data, model_cfg, diff_cfg, (ckpt or base)["config"].get("source"))
        config["base"] = ckpt["config"]["base"] if ckpt else base_record(cfg.init_from, base)
        if model_cfg.get("control"):  # a base with control metadata: its grid and samples' size, the images'
            config["data"]["control_size"] = [data.image_res] * 2
        if ckpt is not None:
            train.check_same_run(cfg.out, config["data"], ckpt["config"]["data"], **data.corruption)
        net = adapter_model(cfg, model_cfg, base, rt)
        s = train.build_state(cfg, net, diff_cfg, ckpt, rt, saved={k for k in net.state_dict() if
                                                                   k.startswith("adapter.")})
        if rank == 0:
            print(train.summary(cfg, data, s.net, rt))

        # Train: each image's control image cropped and flipped with it
        loss_fn = functools.partial(adapter_loss, s.net, s.diffusion, rt.memory_format,
                                    data.latent["scale"] if data.latent else None)
        step_fn = train.make_step_fn(cfg, data, s, rt, loss_fn, lambda idx: dict(x=data.batches.images_at(idx),
                                                                                 hint=hints.images_at(idx)))
        if rank == 0:
            train.prepare_run_folder(cfg.out, config, train.corruption_record(cfg, data), s.step)
        train.train(cfg, config, data, s, step_fn, grid_rows(cfg.cond, data, hints, model_cfg.get("control")), rt)


def base_run(args):
    """The --init-from run (a released model too), checked; its preset and the default run folder go into args."""
    if not args.adapter or not args.init_from:
        raise ValueError("--adapter trains on top of a pre-trained model: give --adapter controlnet|t2i and the run "
                         "folder with --init-from")
    base = load_model(args.init_from, with_vae=False, ext=True)
    args.preset = base["config"]["model"]["preset"]  # the base's network, whatever --preset says
    args.out = args.out or os.path.join("runs", f"{os.path.basename(os.path.normpath(args.init_from))}-"
                                                f"{args.adapter}{train.perturbed(vars(args))}")
    return base


def adapter_config(cfg, data, base, hint_ch):
    """(model config, diffusion config): the base's, with the adapter on top."""
    old = base["model"]
    if [old["resolution"], old["channels"], old.get("cond", "class"), old["num_classes"]] != \
            [data.res, data.ch, cfg.cond, data.meta["num_classes"]]:
        raise ValueError(f"--init-from {cfg.init_from} was trained at {old['resolution']}px, {old['channels']} "
                         f"channels, cond {old.get('cond', 'class')}, {old['num_classes']} classes: an adapter "
                         f"trains on data of the same kind ({cfg.data} is not)")
    return dict(old, adapter=cfg.adapter, hint_ch=hint_ch, hint_res=data.image_res), base["diffusion"]


def base_record(spec, base):
    """What an adapter's config says of its base: where it is, its weights' hash, its corruption (for `report`)."""
    return dict(path=os.path.abspath(ckpt_path(spec)) if os.path.exists(spec) else spec,
                sha256=weights_hash(base["ema"]), step=base["step"],
                **{k: base["config"]["train"].get(k) for k in ("eta", "corruption", "cep", "cep_gamma", "ip_gamma")})


def adapter_model(cfg, model_cfg, base, rt):
    """The network (seeded), with the base's EMA weights and a ControlNet's copy started from them (fresh runs);
    everything but the adapter frozen."""
    net = train.init_model(cfg, model_cfg, None, rt.device, rt.memory_format, make=AdapterDenoiser)
    if base is not None:
        own = {k: v for k, v in net.state_dict().items() if k.startswith("adapter.")}  # as initialised
        load_weights(net, {**own, **base["ema"]}, f"--init-from {cfg.init_from}", "this model",
                     "give the --preset, --cond and text/control flags of that run")
        if isinstance(net.adapter, (ControlNet, DiTControlNet)):  # the trainable copy starts as the base
            net.adapter.reset(net.backbone)
    for k, p in net.named_parameters():
        p.requires_grad_(k.startswith("adapter."))
    return net


def adapter_loss(net, diffusion, memory_format, latent_scale, d, x, hint):
    """train.micro_loss, the control images (uint8 NHWC) in [0, 1], cropped and flipped as their images."""
    hint = train.augment(to_float(hint, unit=True), d)
    return train.micro_loss(net, diffusion, memory_format, latent_scale, d, x, hint=hint)


def grid_rows(cond, data, hints, control):
    """The grid: the first 8 images' conditions (clean labels, or captions) with their control images (and, on a
    base with control metadata, no crop and no flip)."""
    rows = np.arange(min(8, len(data.index)))
    c = torch.from_numpy(data.corruption["clean_labels"][rows]) if cond == "class" else \
        data.cond_of(torch.from_numpy(rows), step=0)
    names = [data.meta["class_names"][k] for k in c] if cond == "class" else [f"image {k}" for k in rows]
    inputs = dict(hint=to_float(hints.images_at(rows).cpu(), unit=True))
    return c, names, dict(inputs, ctrl=neutral_control(len(rows), data.res, [data.image_res] * 2)) if control else \
        inputs


# ----------------------------------------------------------------------------- sample: from control images

def sample_main(argv):
    """python -m ext.adapters sample: sample.py's flags and --controls DATASET; sample i takes row i % N of its
    controls.npy and (unless --labels) its labels."""
    p = sample.get_parser()
    p.add_argument("--controls", required=True, help="a dataset folder with controls.npy; sample i takes row i %% N "
                                                     "of its controls and labels")
    sample_flags(p)  # a base with control metadata
    p.description = __doc__
    args = sample.parse(p, argv)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        ckpt = load_run(args.ckpt)
        cfg, m = ckpt["config"], ckpt["config"]["model"]
        if not m.get("adapter"):
            raise ValueError(f"--controls DATASET (a folder with controls.npy) goes with a model with an adapter "
                             f"(python -m ext.adapters train); {args.ckpt} has none: sample it with sample.py")
        d = read_dataset(args.controls)
        if m.get("cond", "class") == "class" and not args.labels:  # each sample takes its control's class
            check_labels(d.labels, m["num_classes"], f"--controls {args.controls}/labels.npy", "give the controls of "
                         "a dataset of the model's classes, or --labels")
        controls = read_controls(args.controls, len(d.labels), m.get("hint_res") or m["resolution"], m["hint_ch"])
        rows = np.arange(args.num) % len(controls)
        cond, stored, inputs, recorded = with_metadata(args, cfg, sample.conditions(args, cfg, args.num))
        if "arr_1" in stored and not args.labels:  # the controls' own classes unless --labels says otherwise
            cond, stored = torch.from_numpy(d.labels[rows]), dict(arr_1=d.labels[rows])
        stored["control_rows"] = rows
        with_hint = lambda idx: dict(inputs(idx), hint=to_float(controls[rows[idx]], unit=True))
        recorded = dict(recorded, controls=dict(path=os.path.abspath(args.controls),
                                                sha256=file_hash(controls.filename)))
        sample.run(args, ckpt, AdapterDenoiser(**m), (cond, stored, with_hint, recorded), ddp, rank, world,
                   local_rank)


# ----------------------------------------------------------------------------- controls and their fidelity

def controls_main(argv):
    """python -m ext.adapters controls: controls.npy beside a dataset folder's images."""
    p = argparse.ArgumentParser(prog="python -m ext.adapters controls", description=add_controls.__doc__)
    p.add_argument("--src", required=True, help="the dataset folder")
    p.add_argument("--control", required=True, help="canny (OpenCV's edges of its images) or a .npy of maps made "
                                                     "elsewhere, uint8 [N, H, W(, C)]")
    p.add_argument("--canny", type=Interval(int, "[0, 10000]", many=True), default=[100, 200],
                   help="--control canny: low,high thresholds (ControlNet's 100,200)")
    a = check_flags(p, p.parse_args(argv))
    if len(a.canny) != 2 or a.canny[0] > a.canny[1]:
        raise ValueError("--canny wants LOW,HIGH with LOW <= HIGH")
    return add_controls(os.path.normpath(a.src), a.control, a.canny)


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
    images, _, settings = load_samples(a.samples)
    src = settings.get("controls")
    if not src:
        raise ValueError(f"{a.samples} was not sampled from control images: sample an adapter with --controls DATASET")
    meta = read_file(os.path.join(src["path"], "meta.json"), "rebuild the controls' dataset with prepare_data.py")
    path = os.path.join(src["path"], "controls.npy")
    made = meta.get("control", {})
    if made.get("kind") != "canny":
        raise ValueError(f"the controls of {src['path']} are not Canny edges ({made.get('kind')}): edge F1 compares "
                         f"Canny edges")
    if not os.path.isfile(path) or file_hash(path) != src["sha256"]:
        raise ValueError(f"{path} is not the file {a.samples} was sampled with (missing or changed): sample again")
    rows = read_file(a.samples, "sample it again")["control_rows"]
    ref = read_file(path, "sample again", mmap=True)[rows][..., 0] > 0
    p, r, f1 = edge_f1(canny(images, made["low"], made["high"])[..., 0] > 0, ref, a.tolerance)
    out = dict(edge_precision=p, edge_recall=r, edge_f1=f1, tolerance=a.tolerance, canny=[made["low"], made["high"]],
               num_samples=len(images), samples=os.path.abspath(a.samples), settings=settings)
    print(f"edge F1 {f1:.3f} (precision {p:.3f}, recall {r:.3f}; tolerance {a.tolerance} px, Canny {made['low']}/"
          f"{made['high']}) | wrote {save_result(out, a.out, a.samples, 'control.json')}")
    return out


def parser(command="control"):
    p = argparse.ArgumentParser(prog="evaluate.py control", description=cmd_control.__doc__)
    p.add_argument("--samples", required=True, help="samples npz of an adapter model, sampled with --controls")
    p.add_argument("--tolerance", type=Interval(int, "[0, 16]"), default=1, help="edge matching distance (pixels)")
    p.add_argument("--out", help="JSON file for the result (default: control.json beside the samples)")
    return p


COMMANDS = dict(controls=controls_main, train=train_main, sample=sample_main)  # python -m ext.adapters COMMAND
EVALUATE = dict(control=cmd_control)  # evaluate.py's command


def main(argv=None):
    return run_command(COMMANDS, argv, "adapters", __doc__)


if __name__ == "__main__":
    cli(main, "ext.adapters", (ValueError, OSError, FloatingPointError))
