"""Control metadata kept apart from the semantic condition (Berrada et al., NeurIPS 2024): what was done to each
training image (its crop box as fractions of the source image, the source's original size, the flip), embedded by a
network of its own and added to the condition vector, phased in over the noise level (phased) or summed (sum, the
baseline). At sampling, the metadata asked for: by default no crop, no flip and the training set's median size.

    python -m ext.metadata train --data data/in64/train --control phased --crop-scale 0.7 [train.py flags]
    python -m ext.metadata train --resume runs/NAME
    python -m ext.metadata sample --ckpt runs/NAME [--ctrl-crop 0,0,0.5,0.5] [--ctrl-size H,W] [--ctrl-flip] [...]

The original sizes come from the dataset folder's sizes.npy (prepare_data.py imagefolder writes it), else the
image size. train and sample are train.py and sample.py with the metadata as one more input of the network.
"""
import functools
import math
import os

import numpy as np
import torch
import torch.nn as nn

import sample
import train
from ext import run_command
from diffusion import T
from model import Denoiser, timestep_embedding, zero_init
from plumbing import cli, distributed, load_checkpoint, read_file, to_device


# crop box and flip scaled x1000 and sizes in pixels: every value spans the sinusoids' range, as timesteps do
CONTROL_SCALE = (1000.0, 1000.0, 1000.0, 1000.0, 1.0, 1.0, 1000.0)


def neutral_control(n, resolution, size=None, device=None):
    """Control metadata of "no crop, no flip" [n, 7]: (top, left, height, width, original h, original w, flip)."""
    h, w = size or (resolution, resolution)
    return torch.tensor([[0.0, 0.0, 1.0, 1.0, h, w, 0.0]], device=device).repeat(n, 1)


def control_weight(t):
    """Phase-in of the control embedding over the noise level: 1 at t = 0, 0 at t = T - 1 (Berrada et al. use a
    cosine schedule; its exact form is unconfirmed, no code: we take cos^2(pi/2 t / (T - 1)))."""
    return torch.cos(0.5 * math.pi * t.float() / (T - 1)) ** 2


class ControlEmbedder(nn.Module):
    """Control metadata [B, 7] (crop box as fractions of the source image, original size, flip) -> [B, emb_dim]:
    sinusoidal features of each value through its own MLP, kept apart from the semantic condition."""

    def __init__(self, emb_dim, freq_dim=64):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(7 * freq_dim, emb_dim), nn.SiLU(), zero_init(nn.Linear(emb_dim, emb_dim)))
        self.register_buffer("scale", torch.tensor(CONTROL_SCALE), persistent=False)

    def forward(self, ctrl):
        return self.mlp(timestep_embedding((ctrl.float() * self.scale).flatten(), self.freq_dim).view(len(ctrl), -1))


class MetadataDenoiser(Denoiser):
    """A Denoiser that also reads the control metadata ctrl [B, 7] (None: no crop, no flip, the model's size)."""

    def __init__(self, control=None, **model):
        super().__init__(**model)
        self.control_mode = control
        if control:
            self.control = ControlEmbedder(self.backbone.emb_dim)

    def forward(self, x, t, c, cond_delta=None, ctrl=None):
        return self.backbone(x, t, *self.condition(c, t, cond_delta, ctrl))

    def condition(self, c, t, cond_delta=None, ctrl=None):
        c_vec, c_tokens = super().condition(c, t, cond_delta)
        if self.control_mode:
            e = self.control(neutral_control(len(t), self.resolution, device=t.device) if ctrl is None else ctrl)
            # "phased": Berrada et al.'s phase-in, control acts mostly at low noise; "sum": the baseline
            e = e * control_weight(t)[:, None] if self.control_mode == "phased" else e
            c_vec = e if c_vec is None else c_vec + e
        return c_vec, c_tokens


def metadata(d, hw):
    """The control metadata of a micro-batch d [b, 7]: the crop box (train.py's draw), the original size hw, the flip."""
    side = torch.ones(len(d.t), device=d.t.device)
    top, left, side = (side * 0, side * 0, side) if d.crop is None else d.crop.unbind(1)
    return torch.cat([torch.stack([top, left, side, side], 1), hw, d.flip[:, None].float()], 1)


def metadata_loss(net, diffusion, memory_format, latent_scale, d, x, hw):
    return train.micro_loss(net, diffusion, memory_format, latent_scale, d, x, ctrl=metadata(d, hw))


def original_sizes(folder, index, image_res):
    """(each position's original size [N, 2], their median: the grid's metadata) from sizes.npy, else the image size."""
    path = os.path.join(folder, "sizes.npy")
    if not os.path.isfile(path):
        return np.full((len(index), 2), image_res), [image_res] * 2
    sizes = read_file(path, "rebuild the dataset with prepare_data.py")
    return sizes[index], np.median(sizes, 0).round().astype(int).tolist()


def train_main(argv):
    """python -m ext.metadata train: train.py's flags and --control; its setup and loop, the metadata of each image
    an input of the network."""
    p = train.get_parser()
    p.add_argument("--control", default="phased", choices=["phased", "sum"], help="phased in over the noise level "
                   "(Berrada et al.) or summed into the condition vector (the baseline)")
    p.description = __doc__
    args = train.parse_args(argv, p)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        cfg, config, data, s, rt = train.setup(args, ddp, rank, world, local_rank, make=MetadataDenoiser,
                                               model=dict(control=args.control))
        sizes, median = original_sizes(cfg.data, data.index, data.image_res)
        config["data"]["control_size"] = median
        hw = lambda idx: to_device(torch.from_numpy(sizes[idx]), rt.device).float()
        step_fn = train.make_step_fn(cfg, data, s, rt, functools.partial(
            metadata_loss, s.net, s.diffusion, rt.memory_format, data.latent["scale"] if data.latent else None),
            lambda idx: dict(x=data.batches.images_at(idx), hw=hw(idx)))
        if rank == 0:
            train.prepare_run_folder(cfg.out, config, train.corruption_record(cfg, data), s.step)
        rows, labels, _ = train.grid_rows(cfg.cond, data.meta["class_names"], data.captions, data.text_emb,
                                          cfg.max_len)
        train.train(cfg, config, data, s, step_fn, (rows, labels, dict(ctrl=neutral_control(len(rows), data.res,
                                                                                            median))), rt)


def sample_flags(p):
    p.add_argument("--ctrl-crop", default="0,0,1,1", help="crop box top,left,height,width (fractions)")
    p.add_argument("--ctrl-size", help="original size H,W (default: the training set's median)")
    p.add_argument("--ctrl-flip", action="store_true", help="condition on a flipped image")


def with_metadata(args, cfg, conds):
    """sample.py's conditions, the metadata of --ctrl-crop, --ctrl-size, --ctrl-flip added (a model with it)."""
    m = cfg["model"]
    if not m.get("control"):
        return conds
    try:
        crop = [float(v) for v in args.ctrl_crop.split(",")]
        size = [int(v) for v in args.ctrl_size.split(",")] if args.ctrl_size else cfg["data"].get("control_size")
        assert len(crop) == 4 and all(0 <= v <= 1 for v in crop) and len(size or [0, 0]) == 2
    except (ValueError, AssertionError):
        raise ValueError("--ctrl-crop wants top,left,height,width in [0, 1] and --ctrl-size H,W") from None
    ctrl = neutral_control(1, m["resolution"], size)
    ctrl[0, :4], ctrl[0, 6] = torch.tensor(crop), float(args.ctrl_flip)
    cond, stored, inputs, recorded = conds
    return cond, stored, lambda idx: dict(inputs(idx), ctrl=ctrl.expand(len(idx), -1)), \
        dict(recorded, control=ctrl[0].tolist())


def sample_main(argv):
    """python -m ext.metadata sample: sample.py's flags and the metadata asked for."""
    p = sample.get_parser()
    sample_flags(p)
    p.description = __doc__
    args = sample.parse(p, argv)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        ckpt = load_checkpoint(args.ckpt, ext=True)
        cfg = ckpt["config"]
        if not cfg["model"].get("control") or "base" in cfg:
            raise ValueError(f"{args.ckpt} is not a run of python -m ext.metadata train: sample it with "
                             f"{'python -m ext.adapters sample' if 'base' in cfg else 'sample.py'}")
        conds = with_metadata(args, cfg, sample.conditions(args, cfg, args.num))
        sample.run(args, ckpt, MetadataDenoiser(**cfg["model"]), conds, ddp, rank, world, local_rank)


COMMANDS = dict(train=train_main, sample=sample_main)


def main(argv=None):
    return run_command(COMMANDS, argv, "metadata", __doc__)


if __name__ == "__main__":
    cli(main, "ext.metadata", (ValueError, OSError, FloatingPointError))
