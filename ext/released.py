"""Released models converted on load into slightdiff checkpoints (step 0, no optimizer state), so that sample.py
--ckpt and train.py --init-from take them as they take a run: the paper's DiT-XL/2 models as DiT's own checkpoint files
(DiT-XL-2-256x256.pt, or a training checkpoint's EMA) and diffusers DiTs (a DiTTransformer2DModel folder, a DiTPipeline
folder, or a hub id such as facebook/DiT-XL-2-256 or DiffusionNoise/dit-xl-2_imagenet_clean).

model.load_model hands this module whatever is not a slightdiff run (the first of the two lazy seams, README
"Layout"); what is not a released model either gets the run loader's own error.
"""
import json
import math
import os
import re

import torch

from diffusion import T
from model import PRESETS, load_autoencoder
from plumbing import CKPT_FORMAT, file_hash, optional, weights_hash


def load(spec, with_vae=True, why=None):
    """spec converted, or `why` (the run loader's error) raised where spec is no released model. with_vae: record a
    pipeline's autoencoder, as a latent dataset records one."""
    folder = os.path.isdir(spec)
    if folder and diffusers_folder(spec) or not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) \
            and not spec.endswith(".pt") and not os.path.isdir(spec.split("/")[0]):  # runs/typo: a missing run
        state, arch, diffusion, names, vae = dit_from_diffusers(spec)
        source = dict(kind="diffusers", id=os.path.abspath(spec) if folder else spec, sha256=weights_hash(state))
    elif os.path.isfile(spec) and (theirs := dit_pt_state(spec)) is not None:
        (state, arch), diffusion, names, vae = dit_from_pt(theirs, spec), dict(schedule="linear"), None, None
        source = dict(kind="dit-pt", id=os.path.abspath(spec), sha256=file_hash(spec))
    else:
        raise why
    return as_checkpoint(spec, state, arch, diffusion, names, vae if with_vae else None, source)


def diffusers_folder(path):
    """A folder in diffusers' format (a pipeline's model_index.json, or a model's config.json with its class)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    try:
        return "_class_name" in json.load(open(os.path.join(path, "config.json")))
    except (OSError, ValueError):
        return False


def as_checkpoint(spec, state, arch, diffusion, names, vae, source):
    """A converted DiT as a slightdiff checkpoint: its config as train.py would have written it for the run."""
    res, ch = arch.pop("resolution"), arch.pop("channels")
    latent = dict(vae=None, cls="AutoencoderKL", sha256=None, scale=0.18215, kind="kl", image_channels=3,
                  image_resolution=8 * res)  # DiT's: the SD autoencoder, 8x downsampling
    if vae:
        ae, info = load_autoencoder(vae)
        latent.update(vae=info["vae"], cls=info["cls"], sha256=info["sha256"], scale=info["scaling_factor"],
                      image_resolution=2 ** (len(ae.config.block_out_channels) - 1) * res)
    n = arch.pop("num_classes")
    preset = next((k for k, v in PRESETS.items() if v.get("dit") == {a: arch[a] for a in v.get("dit", ())}),
                  "dit-tiny")
    # the paper's released models say their eta in their names (..._clean, ..._random_noise_2.5)
    m = re.search(r"_(clean|random_noise_([\d.]+))", spec)
    eta = None if m is None else float(m.group(2) or 0) / 100
    config = dict(model=dict(num_classes=n, resolution=res, channels=ch, preset=preset, cond="class", **arch),
                  diffusion=dict(dict(schedule="linear", T=T, prediction="eps", shift=1.0, clip=False), **diffusion),
                  train=dict(cond="class", eta=eta, corruption="symmetric", corruption_mode="fixed", cep="none",
                             cep_gamma=0.0, seed=0, subset=None),
                  data=dict(num_classes=n, class_names=names or [str(k) for k in range(n)], resolution=res,
                            count=0, latent=dict(latent, shape=[2, 2, ch, res, res])),
                  source=source)
    return dict(format=CKPT_FORMAT, model=state, ema=state, opt={}, step=0, nimg=0, config=config)


def renamed(theirs, names):
    """{our module: their module} -> our state dict entries (weight and bias) from theirs."""
    return {f"{o}.{p}": theirs[f"{t}.{p}"] for o, t in names.items() for p in ("weight", "bias")}


def without_sigma(state, key, channels, patch):
    """The output layer of a learned-sigma DiT has 2C channels per patch pixel, (p q c) ordered: keep the first C."""
    for p in ("weight", "bias"):
        w = state[f"{key}.{p}"]
        if w.shape[0] == 2 * channels * patch * patch:
            state[f"{key}.{p}"] = w.view(patch * patch, 2 * channels, *w.shape[1:])[:, :channels].flatten(0, 1)
    return state


def dit_pt_state(path):
    """The state dict of DiT's own checkpoint file (its EMA weights in a training checkpoint), or None."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one with pickled objects: load_checkpoint's error says which
        return None
    sd = sd.get("ema", sd) if isinstance(sd, dict) else None
    return sd if isinstance(sd, dict) and "x_embedder.proj.weight" in sd else None


def dit_from_pt(sd, path):
    """DiT's checkpoint (facebookresearch/DiT models.py) -> (our state dict, architecture): the fused qkv split into
    q and kv; the number of heads, which the file does not hold, from DiT's model of that depth and width."""
    w = sd["x_embedder.proj.weight"]
    dim, ch, patch = w.shape[0], w.shape[1], w.shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    heads = next((v["dit"]["heads"] for v in PRESETS.values() if "dit" in v and (v["dit"]["depth"], v["dit"]["dim"])
                  == (depth, dim)), None)
    if heads is None:
        raise ValueError(f"refusing {path}: a DiT of depth {depth} and width {dim} is not one of DiT's models, so its "
                         f"number of heads is unknown")
    state = renamed(sd, {"dit.x_embed": "x_embedder.proj", "dit.time_mlp.0": "t_embedder.mlp.0",
                         "dit.time_mlp.2": "t_embedder.mlp.2", "dit.ada_out": "final_layer.adaLN_modulation.1",
                         "dit.out": "final_layer.linear"})
    state["label_embed.embed.weight"] = sd["y_embedder.embedding_table.weight"]
    for i in range(depth):
        b, o = f"blocks.{i}.", f"dit.blocks.{i}."
        state.update(renamed(sd, {o + "proj": b + "attn.proj", o + "mlp.0": b + "mlp.fc1", o + "mlp.2": b + "mlp.fc2",
                                  o + "ada": b + "adaLN_modulation.1"}))
        for p in ("weight", "bias"):
            state[o + "q." + p], state[o + "kv." + p] = sd[b + "attn.qkv." + p].split([dim, 2 * dim])
    n = sd["y_embedder.embedding_table.weight"].shape[0] - 1  # the last row is the null class
    arch = dict(num_classes=n, resolution=math.isqrt(sd["pos_embed"].shape[1]) * patch, channels=ch, depth=depth,
                dim=dim, heads=heads, patch=patch, freq_shift=0, mlp_eps=1e-6)
    return without_sigma(state, "dit.out", ch, patch), arch



def dit_from_diffusers(spec):
    """A diffusers DiTTransformer2DModel (and its pipeline's scheduler, class names and autoencoder) -> (our state
    dict, architecture, diffusion config, class names or None, autoencoder spec or None). Each of its blocks holds
    its own timestep and class embedder: identical copies are one embedder here; copies that differ are refused."""
    diffusers = optional("diffusers", "released models in diffusers' format", "requirements-latent.txt")
    local = os.path.isdir(spec)
    pipeline = os.path.isdir(os.path.join(spec, "transformer")) if local else True
    try:
        try:
            cfg = diffusers.DiTTransformer2DModel.load_config(spec, subfolder="transformer" if pipeline else None)
        except Exception:
            if local:
                raise
            pipeline, cfg = False, diffusers.DiTTransformer2DModel.load_config(spec)
        if cfg.get("_class_name") not in ("DiTTransformer2DModel", "Transformer2DModel"):
            raise ValueError(f"a {cfg.get('_class_name')}, not a DiT")
        net = diffusers.DiTTransformer2DModel.from_pretrained(spec, subfolder="transformer" if pipeline else None,
                                                              low_cpu_mem_usage=False)
    except Exception as e:  # no network, no such folder or id, another kind of model, bad files
        raise ValueError(f"cannot load {spec} as a slightdiff run, a DiT checkpoint or a diffusers DiT (folder or hub "
                         f"id reachable from here): {type(e).__name__}: {str(e).strip().splitlines()[0][:150]}") \
            from None
    c, sd = net.config, net.state_dict()
    if (c.norm_type, c.activation_fn, c.attention_bias, c.norm_elementwise_affine) != \
            ("ada_norm_zero", "gelu-approximate", True, False) or c.out_channels not in (None, c.in_channels,
                                                                                        2 * c.in_channels):
        raise ValueError(f"refusing {spec}: a DiT with {c.norm_type}, {c.activation_fn}, attention bias "
                         f"{c.attention_bias}, affine norms {c.norm_elementwise_affine}, {c.out_channels} output "
                         f"channels is not an architecture slightdiff's DiT has")
    emb = "transformer_blocks.{}.norm1.emb."
    for k in (k for k in sd if k.startswith(emb.format(0))):
        for i in range(1, c.num_layers):
            if not torch.equal(sd[k], sd[k.replace(emb.format(0), emb.format(i))]):
                raise ValueError(f"refusing {spec}: block {i}'s {k.split('.emb.')[1]} differs from block 0's; "
                                 f"slightdiff's DiT has one timestep and class embedder for all blocks")
    dim, e = c.num_attention_heads * c.attention_head_dim, emb.format(0)
    state = renamed(sd, {"dit.x_embed": "pos_embed.proj", "dit.time_mlp.0": e + "timestep_embedder.linear_1",
                         "dit.time_mlp.2": e + "timestep_embedder.linear_2", "dit.ada_out": "proj_out_1",
                         "dit.out": "proj_out_2"})
    state["label_embed.embed.weight"] = table = sd[e + "class_embedder.embedding_table.weight"]
    if len(table) != c.num_embeds_ada_norm + 1:
        raise ValueError(f"refusing {spec}: its class embedding has no null class (trained without label dropout), "
                         f"which classifier-free guidance needs")
    for i in range(c.num_layers):
        b, o = f"transformer_blocks.{i}.", f"dit.blocks.{i}."
        state.update(renamed(sd, {o + "q": b + "attn1.to_q", o + "proj": b + "attn1.to_out.0", o + "mlp.0":
                                  b + "ff.net.0.proj", o + "mlp.2": b + "ff.net.2", o + "ada": b + "norm1.linear"}))
        for p in ("weight", "bias"):
            state[o + "kv." + p] = torch.cat([sd[b + "attn1.to_k." + p], sd[b + "attn1.to_v." + p]])
    arch = dict(num_classes=c.num_embeds_ada_norm, resolution=c.sample_size, channels=c.in_channels,
                depth=c.num_layers, dim=dim, heads=c.num_attention_heads, patch=c.patch_size, freq_shift=1,
                mlp_eps=c.norm_eps)
    diffusion, names, vae = {}, None, None
    if pipeline:
        diffusion = released_schedule(diffusers, spec)
        index = diffusers.DiffusionPipeline.load_config(spec)
        names = [v for _, v in sorted((int(k), v) for k, v in (index.get("id2label") or {}).items())] or None
        vae = f"{spec}:vae"
    return without_sigma(state, "dit.out", c.in_channels, c.patch_size), arch, diffusion, names, vae


def released_schedule(diffusers, spec):
    """A pipeline's scheduler config -> our diffusion config; a schedule we do not have is refused."""
    s = diffusers.DDIMScheduler.load_config(spec, subfolder="scheduler")
    known = {("linear", 1e-4, 0.02): "linear", ("scaled_linear", 0.0015, 0.0195): "scaled_linear"}
    schedule = known.get((s.get("beta_schedule"), s.get("beta_start"), s.get("beta_end")))
    prediction = {"epsilon": "eps", "v_prediction": "v"}.get(s.get("prediction_type", "epsilon"))
    if schedule is None or prediction is None or s.get("num_train_timesteps", T) != T:
        raise ValueError(f"refusing {spec}: its scheduler ({s.get('beta_schedule')} {s.get('beta_start')}.."
                         f"{s.get('beta_end')}, {s.get('prediction_type')}, T {s.get('num_train_timesteps')}) is "
                         f"not a schedule slightdiff has")
    return dict(schedule=schedule, prediction=prediction)
