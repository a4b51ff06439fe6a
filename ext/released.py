"""Released models converted on load into slightdiff checkpoints (step 0, no optimizer state), so that sample.py
--ckpt and train.py --init-from take them as they take a run:

  DiTs       the paper's DiT-XL/2 models as DiT's own checkpoint files (DiT-XL-2-256x256.pt, or a training
             checkpoint's EMA) and diffusers DiTs (a DiTTransformer2DModel folder, a DiTPipeline folder, or a hub id
             such as facebook/DiT-XL-2-256 or DiffusionNoise/dit-xl-2_imagenet_clean)
  LDM-4      the paper's ImageNet LDMs (the authors' diffusers fork's LDMClassToImagePipeline: vqvae/, class_embedder/,
             unet/, scheduler/, e.g. DiffusionNoise/ldm_in1k_clean) as the ldm4 preset; their CC3M LDMs (upstream's
             LDMTextToImagePipeline: bert/, tokenizer/, unet/, vqvae/, scheduler/) with their BERT as the text
             encoder, sampled and fine-tuned through this module: python -m ext.released sample|train

model.load_model hands this module whatever is not a slightdiff run (the first of the two lazy seams, README
"Layout"); what is not a released model either gets the run loader's own error.
"""
import argparse
import functools
import json
import math
import os
import re
import zipfile

import torch

import sample
import train
from ext import run_command
from diffusion import T
from model import PRESETS, Denoiser, cep_delta, load_autoencoder, load_model
from plumbing import (CKPT_FORMAT, cli, distributed, file_hash, hub_offline, optional, read_file, torch_load,
                      weights_hash)


def load(spec, with_vae=True, why=None, ext=False):
    """spec converted, or `why` (the run loader's error) raised where spec is no released model. with_vae: record a
    pipeline's autoencoder, as a latent dataset records one; ext: a model with BERT too (python -m ext.released)."""
    folder = os.path.isdir(spec)
    if folder and diffusers_folder(spec) or not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) \
            and not spec.endswith(".pt") and not os.path.isdir(spec.split("/")[0]):  # runs/typo: a missing run
        source = lambda state: dict(kind="diffusers", id=os.path.abspath(spec) if folder else spec,
                                    sha256=weights_hash(state))
        if not folder:  # fail at once where the hub is out of reach
            hub_offline(spec, "--ckpt (--init-from)")
        index = pipeline_index(spec)
        if {"class_embedder", "bert"} & set(index):
            return complete(spec, lambda: ldm_checkpoint(spec, index, with_vae, ext, source))
        state, arch, diffusion, names, vae = complete(spec, lambda: dit_from_diffusers(spec))
        source = source(state)
    elif os.path.isfile(spec) and (theirs := dit_pt_state(spec)) is not None:
        (state, arch), diffusion, names, vae = complete(spec, lambda: dit_from_pt(theirs, spec)), \
            dict(schedule="linear"), None, None
        source = dict(kind="dit-pt", id=os.path.abspath(spec), sha256=file_hash(spec))
    else:
        raise why
    res, ch, n = arch.pop("resolution"), arch.pop("channels"), arch.pop("num_classes")
    preset = next((k for k, v in PRESETS.items() if v.get("dit") == {a: arch[a] for a in v.get("dit", ())}),
                  "dit-tiny")
    latent = dict(vae=None, cls="AutoencoderKL", sha256=None, scale=0.18215, kind="kl", image_channels=3,
                  image_resolution=8 * res)  # DiT's: the SD autoencoder, 8x downsampling
    model = dict(num_classes=n, resolution=res, channels=ch, preset=preset, cond="class", **arch)
    return as_checkpoint(spec, state, model, diffusion, names, latent, vae if with_vae else None, source)


def complete(spec, convert):
    """convert(), where a weight the conversion reads and spec lacks is one line, not a KeyError."""
    try:
        return convert()
    except KeyError as e:
        raise ValueError(f"refusing {spec}: it lacks {e.args[0]}, which its model has: a file cut short or edited; "
                         f"download it again") from None


def diffusers_folder(path):
    """A folder in diffusers' format (a pipeline's model_index.json, or a model's config.json with its class)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return True
    try:
        return "_class_name" in json.load(open(os.path.join(path, "config.json")))
    except (OSError, ValueError):
        return False


def pipeline_index(spec):
    """A pipeline's model_index.json ({} for a model's own folder, or a hub id that cannot be read)."""
    if os.path.isdir(spec):
        path = os.path.join(spec, "model_index.json")
        return read_file(path, "save the pipeline again (save_pretrained)") if os.path.isfile(path) else {}
    try:
        return optional("diffusers", "released models", "requirements-latent.txt").DiffusionPipeline.load_config(spec)
    except Exception:  # not a pipeline, or no network: the DiT path says which
        return {}


def as_checkpoint(spec, state, model, diffusion, names, latent, vae, source, scale=None):
    """A converted model as a slightdiff checkpoint: its config as train.py would have written it for the run; vae:
    the pipeline's autoencoder, recorded with its config's scaling factor (or scale)."""
    res, ch, n = model["resolution"], model["channels"], model["num_classes"]
    if vae:
        ae, info = load_autoencoder(vae)
        latent.update(vae=info["vae"], cls=info["cls"], sha256=info["sha256"],
                      scale=info["scaling_factor"] if scale is None else scale,
                      image_resolution=2 ** (len(ae.config.block_out_channels) - 1) * res)
    # the paper's released models say their eta and CEP in their names (_clean, _random_noise_2.5, _condnoise_uniform)
    m = re.search(r"_(clean|random_noise_([\d.]+))(_condnoise_(uniform|gaussian))?", spec)
    eta, cep = (None, None) if m is None else (float(m.group(2) or 0) / 100, m.group(4))
    k = 2 if latent["kind"] == "kl" else 1
    config = dict(model=model,
                  diffusion=dict(dict(schedule="linear", T=T, prediction="eps", shift=1.0, clip=False), **diffusion),
                  train=dict(cond=model["cond"], eta=eta, corruption="swap" if model["cond"] == "text" else
                             "symmetric", corruption_mode="fixed", cep=cep or "none", cep_gamma=1.0 if cep else 0.0,
                             seed=0, subset=None),
                  data=dict(num_classes=n, class_names=names or [str(c) for c in range(n)], resolution=res,
                            count=0, latent=dict(latent, shape=[2, k, ch, res, res])),
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
    if not zipfile.is_zipfile(path):  # not a torch file: load_checkpoint's error says so
        return None
    try:  # a training checkpoint holds its argparse.Namespace: that class alone is let through
        sd = torch_load(path, allow=[argparse.Namespace])
    except ValueError:  # other pickled objects: refused
        raise
    except Exception:  # a damaged file: load_checkpoint's error says so
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
        raise ValueError((not local and hub_offline(spec, "--ckpt (--init-from)")) or f"cannot load {spec} as a "
                         f"slightdiff run, a DiT checkpoint or a diffusers DiT (folder or hub id reachable from here): "
                         f"{type(e).__name__}: {str(e).strip().splitlines()[0][:150]}") from None
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


# ----------------------------------------------------------------------------- LDM-4 (the paper's IN-1K and CC3M models)

# A diffusers UNet2DConditionModel's config keys and the values slightdiff's ldm4 block takes (the first: the default)
LDM_UNET = dict(norm_num_groups=(32,), norm_eps=(1e-5,), act_fn=("silu",), flip_sin_to_cos=(True,), freq_shift=(0,),
                use_linear_projection=(False,), resnet_time_scale_shift=("default",), class_embed_type=(None,),
                addition_embed_type=(None,), time_embedding_type=("positional",), upcast_attention=(False,),
                mid_block_type=("UNetMidBlock2DCrossAttn",), only_cross_attention=(False,), conv_in_kernel=(3,),
                dual_cross_attention=(False,), center_input_sample=(False,), conv_out_kernel=(3,), dropout=(0.0,),
                downsample_padding=(1,), mid_block_scale_factor=(1,), encoder_hid_dim=(None,), time_embedding_dim=(None,),
                time_cond_proj_dim=(None,), attention_type=("default",), transformer_layers_per_block=(1,),
                resnet_out_scale_factor=(1.0,), resnet_skip_time_act=(False,), timestep_post_act=(None,),
                time_embedding_act_fn=(None,), num_class_embeds=(None,), class_embeddings_concat=(False,),
                encoder_hid_dim_type=(None,), mid_block_only_cross_attention=(None, False))


def ldm_arch(c, spec):
    """A UNet2DConditionModel's config -> the ldm4 UNet's settings; a key its block cannot take is refused."""
    blocks, downs, heads = list(c["block_out_channels"]), list(c["down_block_types"]), c["attention_head_dim"]
    ch = blocks[0]
    checks = [(k, c.get(k, ok[0]) in ok) for k, ok in LDM_UNET.items()] + [
        ("attention_head_dim", all(h == 1 for h in (heads if isinstance(heads, (list, tuple)) else [heads]))),
        ("num_attention_heads", c.get("num_attention_heads") in (None, 1)),
        ("block_out_channels", all(b % ch == 0 for b in blocks)), ("layers_per_block", isinstance(
            c["layers_per_block"], int)), ("down_block_types", set(downs) <= {"DownBlock2D", "CrossAttnDownBlock2D"}),
        ("up_block_types", list(c["up_block_types"]) == [t.replace("Down", "Up") for t in reversed(downs)]),
        ("out_channels", c["out_channels"] == c["in_channels"])]
    bad = next((k for k, ok in checks if not ok), None)
    if bad:
        raise ValueError(f"refusing {spec}: its UNet's {bad} = {c.get(bad)!r} is not what slightdiff's ldm4 block "
                         f"takes (CompVis' cin256-v2 blocks: one head, a 1x1 projection, 32 groups)")
    return dict(ch=ch, ch_mult=[b // ch for b in blocks], num_res_blocks=c["layers_per_block"], transformer=True,
                attn_res=[c["sample_size"] // 2 ** i for i, t in enumerate(downs) if t.startswith("CrossAttn")])


def ldm_state(sd, levels, blocks):
    """A UNet2DConditionModel's weights under the ldm4 UNet's names (k and v fused into kv, as ours)."""
    out = {}

    def copy(o, t):
        out.update({f"unet.{o}.{p}": sd[f"{t}.{p}"] for p in ("weight", "bias") if f"{t}.{p}" in sd})

    def block(o, res, attn):
        for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"),
                     ("conv2", "conv2"), ("skip", "conv_shortcut")):
            copy(f"{o}.res.{a}", f"{res}.{b}")
        if f"{attn}.norm.weight" in sd:
            t = "transformer_blocks.0."
            for a, b in (("norm", "norm"), ("proj_in", "proj_in"), ("proj_out", "proj_out"), ("norm1", t + "norm1"),
                         ("norm2", t + "norm2"), ("norm3", t + "norm3"), ("q", t + "attn1.to_q"), ("proj", t +
                         "attn1.to_out.0"), ("q_x", t + "attn2.to_q"), ("proj_x", t + "attn2.to_out.0"),
                         ("ff_in", t + "ff.net.0.proj"), ("ff_out", t + "ff.net.2")):
                copy(f"{o}.attn.{a}", f"{attn}.{b}")
            for a, n in (("kv", "attn1"), ("kv_x", "attn2")):
                out[f"unet.{o}.attn.{a}.weight"] = torch.cat([sd[f"{attn}.{t}{n}.to_{x}.weight"] for x in "kv"])
    for o, t in (("time_mlp.0", "time_embedding.linear_1"), ("time_mlp.2", "time_embedding.linear_2"),
                 ("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out")):
        copy(o, t)
    for part, n, scale in (("down", blocks, "downsamplers"), ("up", blocks + 1, "upsamplers")):
        k = 0
        for i in range(levels):
            for j in range(n):
                block(f"{part}.{k}", f"{part}_blocks.{i}.resnets.{j}", f"{part}_blocks.{i}.attentions.{j}")
                k += 1
            if i < levels - 1:
                copy(f"{part}.{k}.conv", f"{part}_blocks.{i}.{scale}.0.conv")
                k += 1
    block("mid.0", "mid_block.resnets.0", "mid_block.attentions.0")
    block("mid.1", "mid_block.resnets.1", "none")
    return out


def class_embedding(spec):
    """The fork's ClassEmbedder (class_embedder/: nn.Embedding(n_classes, 512), the null class its last row)."""
    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"):
        try:
            path = os.path.join(spec, "class_embedder", name) if os.path.isdir(spec) else \
                __import__("huggingface_hub").hf_hub_download(spec, f"class_embedder/{name}")
            sd = __import__("safetensors.torch").torch.load_file(path) if name.endswith("s") else torch_load(path)
            return sd["embedding.weight"]
        except Exception:  # no such file (the next one, then one line), or not the fork's layout
            continue
    raise ValueError(f"refusing {spec}: its class_embedder/ holds no embedding.weight (the fork's ClassEmbedder)")


def ldm_checkpoint(spec, index, with_vae, ext, source):
    """A released LDM-4 as a slightdiff checkpoint: the unet as the ldm4 UNet; the class embedder as the class
    embedding, one cross-attention token (IN-1K; the fork decodes without a latent scale), or the BERT as the text
    encoder (CC3M; upstream divides by the VQ's scaling factor)."""
    diffusers = optional("diffusers", "released models in diffusers' format", "requirements-latent.txt")
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(spec, subfolder="unet", low_cpu_mem_usage=False)
        vq = diffusers.VQModel.load_config(spec, subfolder="vqvae")
    except Exception as e:
        raise ValueError((not os.path.isdir(spec) and hub_offline(spec, "--ckpt (--init-from)")) or f"cannot load "
                         f"{spec}'s unet/ and vqvae/ ({type(e).__name__}: {str(e).strip().splitlines()[0][:150]})") \
            from None
    c, arch = unet.config, ldm_arch(unet.config, spec)
    if vq.get("_class_name") != "VQModel" or c.in_channels not in {vq.get("latent_channels")} | {vq.get("vq_embed_dim")}:
        raise ValueError(f"refusing {spec}: its vqvae ({vq.get('_class_name')}, {vq.get('latent_channels')} channels, "
                         f"codebook {vq.get('num_vq_embeddings')} x {vq.get('vq_embed_dim')}) is not a VQ of its "
                         f"UNet's {c.in_channels} latent channels")
    state = ldm_state(unet.state_dict(), len(arch["ch_mult"]), arch["num_res_blocks"])
    model = dict(resolution=c.sample_size, channels=c.in_channels, preset="ldm4", **arch)
    if "class_embedder" in index:
        state["label_embed.embed.weight"] = emb = class_embedding(spec)
        if emb.shape[1] != c.cross_attention_dim:
            raise ValueError(f"refusing {spec}: its class embedder is {emb.shape[1]} wide, its UNet's cross-attention "
                             f"reads {c.cross_attention_dim}")
        model.update(num_classes=len(emb) - 1, cond="class", class_ctx=emb.shape[1])
    else:
        model.update(num_classes=1, cond="text", **bert_model(spec, index, c.cross_attention_dim, state))
        if not ext:
            raise ValueError(f"{spec} is a text LDM with a BERT: sample or fine-tune it with python -m ext.released "
                             f"sample|train (sample.py and train.py take its class-conditional twins)")
    latent = dict(vae=None, cls="VQModel", sha256=None, scale=1.0, kind="vq", image_channels=3,
                  image_resolution=4 * c.sample_size)  # LDM-4: VQ f4
    return as_checkpoint(spec, state, model, released_schedule(diffusers, spec), ["image"] if "bert" in index else
                         None, latent, f"{spec}:vqvae" if with_vae else None, source(state),
                         scale=1.0 if "class_embedder" in index else None)


# ----------------------------------------------------------------------------- BERT: the CC3M LDMs' text encoder

def bert_model(spec, index, width, state):
    """A pipeline's bert/ (a transformers BertModel) into state as text.*; -> the text encoder's model settings."""
    transformers = optional("transformers", "a text LDM's BERT", "requirements-clip.txt")
    if (index.get("bert") or [None, None])[1] != "BertModel":
        raise ValueError(f"refusing {spec}: its text model is {index.get('bert')}, not a transformers BertModel")
    bert = transformers.BertModel.from_pretrained(spec, subfolder="bert", add_pooling_layer=False)
    if bert.config.hidden_size != width:
        raise ValueError(f"refusing {spec}: its BERT is {bert.config.hidden_size} wide, its UNet reads {width}")
    state.update({f"text.{k}": v for k, v in bert.state_dict().items()})
    return bert_settings(bert.config, f"{spec}:tokenizer")


def bert_settings(config, tokenizer):
    """What a run records of its BERT: its config, its tokenizer (a folder or ID:subfolder), "" tokenized (null)."""
    null = tokens([""], tokenizer)[0].tolist()
    return dict(bert={k: v for k, v in config.to_dict().items() if not k.startswith("_")}, tokenizer=tokenizer,
                null_ids=null, max_len=len(null))


def tokens(captions, tokenizer, max_len=77):
    """Captions -> BERT token ids [B, max_len], as LDMTextToImagePipeline tokenizes them (padded, cut)."""
    transformers = optional("transformers", "a text LDM's BERT", "requirements-clip.txt")
    path, sub = tokenizer.rsplit(":", 1) if ":" in tokenizer and not os.path.exists(tokenizer) else (tokenizer, None)
    tok = transformers.AutoTokenizer.from_pretrained(path, subfolder=sub or "")
    return tok(list(captions), padding="max_length", max_length=max_len, truncation=True,
               return_tensors="pt").input_ids


class BertDenoiser(Denoiser):
    """A Denoiser whose text encoder is a BERT (trained with the network, as the paper's CC3M LDMs): its token states
    are the cross-attention context, with no pooled vector; CEP perturbs them; "" is the null prompt."""

    def __init__(self, bert, tokenizer, null_ids, **model):
        transformers = optional("transformers", "a text LDM's BERT", "requirements-clip.txt")
        super().__init__(**dict(model, text_dim=bert["hidden_size"], text_layers=1, max_len=len(null_ids)))
        self.text = transformers.BertModel(transformers.BertConfig(**bert), add_pooling_layer=False)
        self.register_buffer("null_ids", torch.tensor(null_ids), persistent=False)

    def condition(self, c, t, cond_delta=None):
        h = self.text(input_ids=c)[0]  # no attention mask: the pipeline attends to the padding too
        return None, h if cond_delta is None else h + cond_delta.to(h.dtype)

    def null_cond(self, c):
        return self.null_ids.to(c.device).expand(len(c), -1)

    def cond_noise(self, c, cep, gamma, generator):
        shape = (len(c), c.shape[1], self.text.config.hidden_size)
        return None if cep == "none" else cep_delta(cep, gamma, shape, generator, c.device)


# ----------------------------------------------------------------------------- sample and train a text LDM with BERT

def sample_main(argv):
    """python -m ext.released sample: sample.py for a text LDM with BERT (a CC3M pipeline, or a run of train below),
    its prompts tokenized by the BERT's tokenizer."""
    p = sample.get_parser()
    p.description = __doc__
    args = sample.parse(p, argv)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        ckpt = load_model(args.ckpt, ext=True)
        m = ckpt["config"]["model"]
        if "bert" not in m:
            raise ValueError(f"{args.ckpt} has no BERT text encoder: sample it with sample.py")
        cond, stored, inputs, recorded = sample.conditions(args, ckpt["config"], args.num)
        cond = tokens(stored["captions"], m["tokenizer"], m["max_len"])
        sample.run(args, ckpt, BertDenoiser(**m), (cond, stored, inputs, recorded), ddp, rank, world, local_rank)


def source_bert(src):
    """The BERT settings of --init-from's text LDM, from the source train.setup has read (once)."""
    model = (src or {}).get("config", {}).get("model", {})
    if "bert" not in model:
        raise ValueError("ext.released train: give --text-encoder BERT, or --init-from a text LDM with one")
    return {k: v for k, v in model.items() if k in ("bert", "tokenizer", "null_ids", "max_len")}


def train_main(argv):
    """python -m ext.released train: train.py with a BERT text encoder trained with the network (the paper's CC3M
    LDMs): --text-encoder a BERT in transformers' format (with its tokenizer), or --init-from a text LDM with one."""
    p = train.get_parser()
    p.add_argument("--text-encoder", help="a BERT (transformers' BertModel and tokenizer): a folder or a hub id")
    p.description = __doc__
    args = train.parse_args(argv, p)
    with distributed(args.device, args.dist_timeout) as (ddp, rank, world, local_rank):
        bert = settings = None
        if args.text_encoder and not args.resume:
            transformers = optional("transformers", "--text-encoder", "requirements-clip.txt")
            bert = transformers.BertModel.from_pretrained(args.text_encoder, add_pooling_layer=False)
            settings = bert_settings(bert.config, args.text_encoder)
        cfg, config, data, s, rt = train.setup(args, ddp, rank, world, local_rank, make=BertDenoiser,
                                               model=settings or source_bert)
        if bert is not None:  # a pre-trained BERT under a fresh network
            for net in (s.net, s.ema):
                net.text.load_state_dict(bert.state_dict())
        tok = lambda captions: tokens(captions, config["model"]["tokenizer"], config["model"]["max_len"])
        data.cond_of = functools.partial(data.cond_of, tokens=tok)
        step_fn = train.make_step_fn(cfg, data, s, rt)
        if rank == 0:
            train.prepare_run_folder(cfg.out, config, train.corruption_record(cfg, data), s.step)
        prompts = [c[0] for c in data.captions[:8]]
        train.train(cfg, config, data, s, step_fn, (tok(prompts), prompts, {}), rt)


COMMANDS = dict(sample=sample_main, train=train_main)


def main(argv=None):
    return run_command(COMMANDS, argv, "released", __doc__)


if __name__ == "__main__":
    cli(main, "ext.released", (ValueError, OSError, FloatingPointError))
