"""slightdiff's model: the networks, the diffusion and its samplers, the condition embedders.

  PRESETS            every network by name: the UNets tiny, cifar (DDPM), in64 (ADM), ldm4 (LDM-4) and the DiTs
                     dit-tiny, dit-s2 ... dit-xl2 (Peebles & Xie), with their text-encoder size and schedule
  attention          the one multi-head attention (SDPA) of the UNet, the DiT and the text encoder
  UNet               ResBlock, AttentionBlock (self-, cross-attention, LDM's feed-forward), ResAttnBlock, UNet
  DiT                sincos_2d, DiTBlock (adaLN-Zero), DiT
  conditions         ClassEmbedder, TextEncoder (UTF-8 bytes), ControlEmbedder (Berrada et al.), cep_delta (Chen et al.)
  Denoiser           a backbone and its condition embedders: what train.py trains and sample.py samples
  Diffusion          noise schedules, the training loss, the denoiser D(x, sigma) that every sampler walks
  samplers           sample_ddim (and DDPM), sample_dpmpp_2m, sample_heun; guided (CFG); generate (noise per sample)
  autoencoders       load_autoencoder, ae_encode, latent_decoder: the latent path (diffusers)
  released models    load_model: a run, or a released DiT (DiT's own file, a diffusers DiT) converted on load

The condition enters a backbone in two ways, so text tokens or control metadata are added without touching it:
  c_vec    [B, emb_dim]      added to the time embedding (a UNet's scale-shift norms, a DiT's adaLN);
  c_tokens [B, L, ctx_dim]   attended to by cross-attention (if ctx_dim is set).
"""
import copy
import hashlib
import inspect
import json
import math
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from plumbing import CKPT_FORMAT, file_hash, load_checkpoint, seed_of, to_device, to_uint8, weights_hash

PRESETS = {
    # UNets. CPU tests and the quick start.
    "tiny": dict(unet=dict(ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_res=(8,), dropout=0.0, head_ch=64,
                           scale_shift=True), text=(64, 2)),
    # DDPM's CIFAR-10 UNet (35.7M parameters): additive time embedding as in Ho et al., one attention head.
    "cifar": dict(unet=dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,), dropout=0.1, head_ch=256,
                            scale_shift=False), text=(256, 4)),
    # ADM's ImageNet 64x64 UNet (Dhariwal & Nichol, Table 14), with conv resampling.
    "in64": dict(unet=dict(ch=192, ch_mult=(1, 2, 3, 4), num_res_blocks=3, attn_res=(32, 16, 8), dropout=0.1,
                           head_ch=64, scale_shift=True)),
    # LDM-4 on 64x64x3 VQ-f4 latents (Chen et al. Table 3; CompVis cin256-v2): one attention head, the class through
    # cross-attention on a 512-wide embedding as LDM (class_ctx; 0 sends it through c_vec), LDM's schedule.
    "ldm4": dict(unet=dict(ch=192, ch_mult=(1, 2, 3, 5), num_res_blocks=2, attn_res=(32, 16, 8), dropout=0.0,
                           head_ch=None, scale_shift=False, ff=True), class_ctx=512, schedule="scaled_linear"),
    # DiTs (depth, width, heads, patch): a CPU-sized one and DiT's S/2, B/2, L/2, XL/2 (Peebles & Xie, Table 1).
    "dit-tiny": dict(dit=dict(depth=4, dim=128, heads=4, patch=2), text=(64, 2)),
    "dit-s2": dict(dit=dict(depth=12, dim=384, heads=6, patch=2)),
    "dit-b2": dict(dit=dict(depth=12, dim=768, heads=12, patch=2)),
    "dit-l2": dict(dit=dict(depth=24, dim=1024, heads=16, patch=2)),
    "dit-xl2": dict(dit=dict(depth=28, dim=1152, heads=16, patch=2)),
}  # text: (width, layers) of the text encoder, default (384, 6); schedule: default linear
T = 1000  # diffusion timesteps of every schedule here: the network's time input and the control phase-in span [0, T)


def timestep_embedding(t, dim, max_period=10000.0, shift=0):
    """[cos, sin] of t at frequencies exp(-ln(max_period) i / (half - shift)); shift 1 is diffusers' DiT."""
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / (half - shift))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def zero_init(m):
    nn.init.zeros_(m.weight)
    nn.init.zeros_(m.bias)
    return m


def attention(q, k, v, mask=None):
    """Multi-head attention [B, heads, L, d] through SDPA (flash on a GPU). The fused kernels (flash,
    memory-efficient, cuDNN) need the head dimension at stride 1; a UNet's NCHW convolution gives it at stride H*W,
    which would leave only the math path (measured on an H100)."""
    q, k, v = (z if z.stride(-1) == 1 else z.contiguous() for z in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def norm(ch):
    return nn.GroupNorm(math.gcd(32, ch), ch)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout, scale_shift):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1, self.conv1 = norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * cout if scale_shift else cout)
        self.norm2, self.drop = norm(cout), nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(cout, cout, 3, padding=1))  # each block starts as the identity
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        e = self.emb(F.silu(emb))[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class AttentionBlock(nn.Module):
    """Self-attention over the pixels, then (ctx_dim) cross-attention from the pixels to the condition tokens, then
    (ff) LDM's feed-forward layer: with both, the transformer block of LDM's UNet."""

    def __init__(self, ch, head_ch, ctx_dim=None, ff=False):
        super().__init__()
        self.ff = ff
        if ff:  # GEGLU, 4x wide
            self.norm_ff, self.ff_in = norm(ch), nn.Conv2d(ch, 8 * ch, 1)
            self.ff_out = zero_init(nn.Conv2d(4 * ch, ch, 1))
        self.heads = max(1, ch // head_ch) if head_ch else 1
        self.norm, self.qkv, self.proj = norm(ch), nn.Conv2d(ch, 3 * ch, 1), zero_init(nn.Conv2d(ch, ch, 1))
        self.cross = bool(ctx_dim)
        if self.cross:
            self.norm_x, self.q_x = norm(ch), nn.Conv2d(ch, ch, 1)
            self.kv_x, self.proj_x = nn.Linear(ctx_dim, 2 * ch), zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x, tokens=None):
        pixels = lambda o: rearrange(o, "b h (y x) d -> b (h d) y x", y=x.shape[2])
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (n h d) y x -> n b h (y x) d", n=3, h=self.heads)
        x = x + self.proj(pixels(attention(q, k, v)))
        if tokens is not None and self.cross:
            q = rearrange(self.q_x(self.norm_x(x)), "b (h d) y x -> b h (y x) d", h=self.heads)
            k, v = rearrange(self.kv_x(tokens).to(q.dtype), "b l (n h d) -> n b h l d", n=2, h=self.heads)
            x = x + self.proj_x(pixels(attention(q, k, v)))
        if self.ff:
            a, gate = self.ff_in(self.norm_ff(x)).chunk(2, 1)
            x = x + self.ff_out(a * F.gelu(gate))
        return x


class ResAttnBlock(nn.Module):
    """A ResBlock, followed at the attention resolutions by an AttentionBlock."""

    def __init__(self, cin, cout, emb_dim, dropout, scale_shift, attn, head_ch, ctx_dim, ff):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout, scale_shift)
        self.attn = AttentionBlock(cout, head_ch, ctx_dim, ff) if attn else None

    def forward(self, h, emb, tokens):
        h = self.res(h, emb)
        return self.attn(h, tokens) if self.attn is not None else h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, h):
        return self.conv(h)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, h):
        return self.conv(F.interpolate(h, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    def __init__(self, resolution=32, in_ch=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_res=(16,),
                 dropout=0.1, head_ch=64, scale_shift=True, ctx_dim=None, out_ch=None, ff=False):
        super().__init__()
        self.ch, self.emb_dim = ch, 4 * ch
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(ch_mult) - 1} for this preset")
        self.time_mlp = nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        blk = dict(emb_dim=self.emb_dim, dropout=dropout, scale_shift=scale_shift, head_ch=head_ch, ctx_dim=ctx_dim,
                   ff=ff)
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, resolution
        self.level_ends, self.level_ch = [], [ch * m for m in ch_mult]  # where T2I-Adapter features join
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResAttnBlock(cur, ch * m, attn=res in attn_res, **blk))
                cur = ch * m
                skips.append(cur)
            self.level_ends.append(len(self.down) - 1)
            if i < len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res //= 2
        self.skip_ch = skips + [cur]  # every skip connection, then the middle block: ControlNet's zero convolutions
        self.mid = nn.ModuleList([ResAttnBlock(cur, cur, attn=True, **blk), ResAttnBlock(cur, cur, attn=False, **blk)])
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResAttnBlock(cur + skips.pop(), ch * m, attn=res in attn_res, **blk))
                cur = ch * m
            if i > 0:
                self.up.append(Upsample(cur))
                res *= 2
        self.norm_out = norm(cur)
        self.conv_out = zero_init(nn.Conv2d(cur, out_ch or in_ch, 3, padding=1))

    def encode(self, x, t, c_vec=None, c_tokens=None, hint=None, level_add=None):
        """The encoder and the middle block -> (their skip features and output, the time embedding). hint: added
        after the first convolution (ControlNet's copy); level_add: one feature map per level, added to the
        encoder's at the level's end (T2I-Adapter)."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        emb = emb if c_vec is None else emb + c_vec
        h = self.conv_in(x) if hint is None else self.conv_in(x) + hint
        hs = [h]
        for i, m in enumerate(self.down):
            h = m(h) if isinstance(m, Downsample) else m(h, emb, c_tokens)
            if level_add is not None and i in self.level_ends:
                h = h + level_add[self.level_ends.index(i)]
            hs.append(h)
        for m in self.mid:
            h = m(h, emb, c_tokens)
        return hs + [h], emb

    def forward(self, x, t, c_vec=None, c_tokens=None, control=None, level_add=None):
        """control: ControlNet's features, one per skip connection and one for the middle block, added to them."""
        hs, emb = self.encode(x, t, c_vec, c_tokens, level_add=level_add)
        hs = hs if control is None else [a + b for a, b in zip(hs, control)]
        h = hs.pop()
        for m in self.up:
            h = m(h) if isinstance(m, Upsample) else m(torch.cat([h, hs.pop()], 1), emb, c_tokens)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------- DiT (Peebles & Xie 2023)

def sincos_2d(dim, grid):
    """DiT's fixed 2-D sin-cos position embedding [grid * grid, dim]: half the channels for each axis."""
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                            indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    emb = [f(p.reshape(-1, 1) * omega) for p in (xs, ys) for f in (torch.sin, torch.cos)]
    return torch.cat(emb, 1).float()


def attend(q_in, kv_in, heads, q, kv, proj):
    """Multi-head attention of q_in's tokens to kv_in's [B, L, D] through SDPA (flash on a GPU)."""
    qh = rearrange(q(q_in), "b l (h d) -> b h l d", h=heads)
    k, v = rearrange(kv(kv_in).to(qh.dtype), "b l (n h d) -> n b h l d", n=2, h=heads)
    return proj(rearrange(attention(qh, k, v), "b h l d -> b l (h d)"))


class DiTBlock(nn.Module):
    """adaLN-Zero: LayerNorms without affine, modulated by shift, scale and gate vectors regressed from the
    conditioning vector c, the gates zero-initialised so that a fresh block is the identity; self-attention, then
    (ctx_dim) cross-attention to the condition tokens (PixArt-alpha), then the MLP."""

    def __init__(self, dim, heads, ctx_dim=None, mlp_eps=1e-6):
        super().__init__()
        self.heads, self.cross = heads, bool(ctx_dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim, 1e-6, elementwise_affine=False), nn.LayerNorm(dim, mlp_eps, False)
        self.q, self.kv, self.proj = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = zero_init(nn.Linear(dim, 6 * dim))
        if self.cross:
            self.norm_x, self.q_x, self.proj_x = nn.LayerNorm(dim), nn.Linear(dim, dim), zero_init(nn.Linear(dim, dim))
            self.kv_x = nn.Linear(ctx_dim, 2 * dim)

    def forward(self, x, c, tokens=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(c))[:, None].chunk(6, 2)
        h = self.norm1(x) * (1 + scale1) + shift1
        x = x + gate1 * attend(h, h, self.heads, self.q, self.kv, self.proj)
        if tokens is not None and self.cross:
            x = x + attend(self.norm_x(x), tokens, self.heads, self.q_x, self.kv_x, self.proj_x)
        return x + gate2 * self.mlp(self.norm2(x) * (1 + scale2) + shift2)


class DiT(nn.Module):
    """Patchify, fixed sin-cos positions, adaLN-Zero blocks, final adaLN layer, unpatchify. The same interface as
    UNet: (x, t, c_vec, c_tokens). Epsilon (or v) only: DiT's learned variance is not trained (see README)."""

    def __init__(self, resolution, in_ch, depth, dim, heads, patch, ctx_dim=None, freq_shift=0, mlp_eps=1e-6):
        """freq_shift, mlp_eps: 0 and 1e-6 as DiT; diffusers' DiTs have 1 and their config's norm_eps."""
        super().__init__()
        if resolution % patch:
            raise ValueError(f"patch size {patch} does not divide the {resolution}x{resolution} input: pick another "
                             f"preset or resolution")
        self.patch, self.grid, self.emb_dim, self.freq_shift = patch, resolution // patch, dim, freq_shift
        self.x_embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.register_buffer("pos", sincos_2d(dim, self.grid), persistent=False)  # recomputed for any grid
        self.time_mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.blocks = nn.ModuleList(DiTBlock(dim, heads, ctx_dim, mlp_eps) for _ in range(depth))
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada_out, self.out = zero_init(nn.Linear(dim, 2 * dim)), zero_init(nn.Linear(dim, patch * patch * in_ch))

    def embed(self, x, t, c_vec=None):
        """-> (the patch tokens with their positions, the conditioning vector)."""
        c = self.time_mlp(timestep_embedding(t, 256, shift=self.freq_shift))
        return rearrange(self.x_embed(x), "b d y x -> b (y x) d") + self.pos.to(x.dtype), c if c_vec is None else \
            c + c_vec

    def forward(self, x, t, c_vec=None, c_tokens=None):
        h, c = self.embed(x, t, c_vec)
        for block in self.blocks:
            h = block(h, c, c_tokens)
        return self.final(h, c)

    def final(self, h, c):
        shift, scale = self.ada_out(F.silu(c))[:, None].chunk(2, 2)
        h = self.out(self.norm_out(h) * (1 + scale) + shift)
        return rearrange(h, "b (y x) (p q c) -> b c (y p) (x q)", y=self.grid, p=self.patch, q=self.patch)


# ----------------------------------------------------------------------------- conditions

class ClassEmbedder(nn.Module):
    """Class embedding c_theta(y); index num_classes is the null class used for classifier-free guidance."""

    def __init__(self, num_classes, dim):
        super().__init__()
        self.embed = nn.Embedding(num_classes + 1, dim)

    def forward(self, y, delta=None):
        c = self.embed(y)
        return c if delta is None else c + delta.to(c.dtype)


CLS, PAD = 256, 257  # byte tokens 0..255, a summary token that starts every caption, padding


def tokenize(captions, max_len):
    """Captions -> byte tokens [B, max_len]: CLS, the UTF-8 bytes (cut at max_len - 1), PAD. "" is the null caption."""
    out = np.full((len(captions), max_len), PAD, dtype=np.int64)
    out[:, 0] = CLS
    for i, c in enumerate(captions):
        b = np.frombuffer(c.encode("utf-8")[:max_len - 1], dtype=np.uint8)
        out[i, 1:1 + len(b)] = b
    return torch.from_numpy(out)


def replicate_padding(h, pad):
    """Noisy replicate padding (Berrada et al. 2024): padding positions hold copies of the real tokens, cycled, in
    place of pad embeddings; the noise on them is drawn with the rest of the condition noise (Denoiser.cond_noise)."""
    n = (~pad).sum(1, keepdim=True)  # real tokens per caption, CLS included: at least 1
    src = torch.arange(h.shape[1], device=h.device)[None] % n
    return h.gather(1, src[..., None].expand_as(h))


class TextBlock(nn.Module):
    """Pre-norm transformer block; attention skips the padding (keep: [B, 1, 1, L] bool)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(dim), nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h, keep):
        q, k, v = rearrange(self.qkv(self.norm1(h)), "b l (n h d) -> n b h l d", n=3, h=self.heads)
        h = h + self.proj(rearrange(attention(q, k, v, keep), "b h l d -> b l (h d)"))
        return h + self.mlp(self.norm2(h))


class TextEncoder(nn.Module):
    """A small transformer over UTF-8 bytes, trained jointly with the UNet (Chen et al. train a BERT-style encoder
    from scratch), or with ext_dim over precomputed caption embeddings [B, L, ext_dim] of an external encoder.
    -> (pooled [B, emb_dim] for c_vec, tokens [B, L, dim] for cross-attention); delta [B, L + 1, dim] is added to
    every token and (last slot) to the pooled vector: CEP and the replicate-padding noise."""

    def __init__(self, dim, layers, max_len, emb_dim, ext_dim=None, replicate_pad=True):
        super().__init__()
        self.dim, self.ext_dim, self.replicate_pad = dim, ext_dim, replicate_pad
        self.inp = nn.Linear(ext_dim, dim) if ext_dim else nn.Embedding(PAD + 1, dim)
        self.pos = nn.Parameter(torch.randn(max_len, dim) * 0.02)
        self.blocks = nn.ModuleList(TextBlock(dim, max(1, dim // 64)) for _ in range(layers))
        self.norm, self.to_vec = nn.LayerNorm(dim), nn.Linear(dim, emb_dim)

    def forward(self, c, delta=None):
        pad = None if self.ext_dim else c == PAD
        h = self.inp(c.to(self.pos.dtype) if self.ext_dim else c) + self.pos[:c.shape[1]]
        keep = None if pad is None else ~pad[:, None, None, :]
        for block in self.blocks:
            h = block(h, keep)
        h = self.norm(h)
        if pad is not None and self.replicate_pad:
            h = replicate_padding(h, pad)
        pooled = h.mean(1) if pad is None else h[:, 0]  # external embeddings have no CLS: their mean
        if delta is not None:
            h, pooled = h + delta[:, :-1].to(h.dtype), pooled + delta[:, -1].to(h.dtype)
        return self.to_vec(pooled), h


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


def cep_delta(kind, gamma, shape, generator=None, device=None):
    """Condition Embedding Perturbation, Chen et al. Sec. 5, Eq. 8; delta is fresh per sample per step.

    CEP-U: delta ~ U(-gamma/sqrt(d), gamma/sqrt(d)).  CEP-G: delta ~ N(0, (gamma/sqrt(d))^2); the paper writes
    N(0, gamma/sqrt(d)) without saying std or variance, and we read gamma/sqrt(d) as the standard deviation.
    """
    scale = gamma / math.sqrt(shape[-1])
    if kind == "uniform":
        return (torch.rand(shape, generator=generator, device=device) * 2 - 1) * scale
    if kind == "gaussian":
        return torch.randn(shape, generator=generator, device=device) * scale
    raise ValueError(f"unknown CEP kind {kind!r}: use none, uniform or gaussian")


# ----------------------------------------------------------------------------- adapters (Chen et al. Sec. 3.2)

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
        self.zero = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in unet.skip_ch)

    def reset(self, unet):
        self.copy.load_state_dict({k: v for k, v in unet.state_dict().items() if k in self.copy.state_dict()})

    def forward(self, unet, x, t, c_vec, c_tokens, hint):
        feats, _ = UNet.encode(self.copy, x, t, c_vec, c_tokens, hint=self.hint(hint))
        return unet(x, t, c_vec, c_tokens, control=[z(f) for z, f in zip(self.zero, feats)])


class T2IAdapter(nn.Module):
    """Mou et al. 2023 for the UNet: the control image pixel-unshuffled to the network's resolution, one small
    convolution stage per encoder level (stride 2 between levels), each stage's output added to the encoder's
    features at the end of its level. The outputs are zero-initialised (ours, not the authors'): a fresh adapter
    changes nothing, as a fresh ControlNet."""

    def __init__(self, unet, hint_ch, down):
        super().__init__()
        chans = unet.level_ch
        self.stem = nn.Sequential(nn.PixelUnshuffle(down), nn.Conv2d(hint_ch * down * down, chans[0], 3, padding=1))
        self.stages = nn.ModuleList(nn.Sequential(nn.Conv2d(a, b, 3, stride=1 if i == 0 else 2, padding=1), nn.SiLU(),
                                                  nn.Conv2d(b, b, 3, padding=1))
                                    for i, (a, b) in enumerate(zip(chans[:1] + chans, chans)))
        self.out = nn.ModuleList(zero_init(nn.Conv2d(c, c, 1)) for c in chans)

    def reset(self, unet):
        pass

    def forward(self, unet, x, t, c_vec, c_tokens, hint):
        f, feats = self.stem(hint), []
        for stage, out in zip(self.stages, self.out):
            f = stage(f)
            feats.append(out(f))
        return unet(x, t, c_vec, c_tokens, level_add=feats)


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


class Denoiser(nn.Module):
    """x_t, t, condition c -> network output. c is one of: class labels [B] (index num_classes = null), byte tokens
    [B, L] of captions (the empty caption = null), precomputed caption embeddings [B, L, ext_dim] (zeros = null).
    cond_delta: training-time noise on the condition embedding (cond_noise); ctrl: control metadata [B, 7]."""

    def __init__(self, num_classes, resolution=32, channels=3, preset="tiny", cond="class", text_dim=None,
                 text_layers=None, max_len=64, ext_dim=None, replicate_pad=True, pad_noise=0.1, control=None,
                 class_ctx=None, adapter=None, hint_ch=1, hint_res=None, **arch):
        """preset: a name in PRESETS; arch: its backbone's values changed (a UNet's ch, dropout, attn_res; a DiT's
        depth, dim, heads, patch, freq_shift, mlp_eps); class_ctx: the class through cross-attention on an
        embedding this wide (0: through c_vec; default: the preset's); adapter: controlnet or t2i on a control image
        of hint_ch channels at hint_res (default: the resolution; latents: the images')."""
        super().__init__()
        spec = PRESETS[preset]
        kind, net = ("dit", DiT) if "dit" in spec else ("unet", UNet)
        unknown = set(arch) - set(inspect.signature(net).parameters)
        if unknown:
            raise ValueError(f"{preset} is a {kind.upper()}: {', '.join(sorted(unknown))} are not its settings")
        class_ctx = spec.get("class_ctx") if class_ctx is None else class_ctx
        self.class_ctx = class_ctx if cond == "class" else None
        self.num_classes, self.cond, self.resolution = num_classes, cond, resolution
        self.pad_noise, self.control_mode = pad_noise, control
        text_dim, text_layers = (a or b for a, b in zip((text_dim, text_layers), spec.get("text", (384, 6))))
        ctx_dim = text_dim if cond == "text" else self.class_ctx or None
        setattr(self, kind, net(resolution, channels, ctx_dim=ctx_dim, **{**spec[kind], **arch}))
        emb_dim = self.backbone.emb_dim
        if cond == "class":
            self.label_embed = ClassEmbedder(num_classes, self.class_ctx or emb_dim)
        else:
            self.text = TextEncoder(text_dim, text_layers, max_len, emb_dim, ext_dim, replicate_pad)
        if control:
            self.control = ControlEmbedder(emb_dim)
        self.adapter = None
        if adapter:
            down = (hint_res or resolution) // resolution
            if (adapter, kind) not in ADAPTERS or down * resolution != (hint_res or resolution) or down & (down - 1):
                raise ValueError(f"no {adapter} for a {kind.upper()} on {hint_res}-pixel controls at resolution "
                                 f"{resolution}: controlnet (UNet, DiT) or t2i (UNet), controls 2^k x the resolution")
            self.adapter = ADAPTERS[adapter, kind](self.backbone, hint_ch, down)

    @property
    def backbone(self):
        return self.dit if hasattr(self, "dit") else self.unet

    def train(self, mode=True):
        """An adapter's frozen base stays in eval mode (no dropout) while the adapter trains, as in ControlNet's."""
        super().train(mode)
        if self.adapter is not None:
            self.backbone.train(False)
        return self

    def forward(self, x, t, c, cond_delta=None, ctrl=None, hint=None):
        c_vec, c_tokens = (self.label_embed(c, cond_delta), None) if self.cond == "class" else self.text(c, cond_delta)
        if self.class_ctx:  # the class as one token that cross-attention reads (LDM), not in the time embedding
            c_vec, c_tokens = None, c_vec[:, None]
        if self.control_mode:
            e = self.control(neutral_control(len(x), self.resolution, device=x.device) if ctrl is None else ctrl)
            # "phased": Berrada et al.'s phase-in, control acts mostly at low noise; "sum": the baseline
            e = e * control_weight(t)[:, None] if self.control_mode == "phased" else e
            c_vec = e if c_vec is None else c_vec + e
        if self.adapter is not None:  # the control image [B, C, H, W] in [0, 1]
            return self.adapter(self.backbone, x, t, c_vec, c_tokens, hint.to(x.dtype))
        return self.backbone(x, t, c_vec=c_vec, c_tokens=c_tokens)

    def null_cond(self, c):
        """The null condition of classifier-free guidance, shaped like c."""
        if self.cond == "class":
            return torch.full_like(c, self.num_classes)
        if c.is_floating_point():
            return torch.zeros_like(c)
        null = torch.full_like(c, PAD)
        null[:, 0] = CLS
        return null

    def cond_noise(self, c, cep, gamma, generator):
        """Training-time noise on the condition embedding of a (global) batch: CEP's delta (Chen et al. Eq. 8: every
        embedding, the null condition included) and, for captions, the replicate-padding noise on the padding."""
        if self.cond == "class":
            dim = self.label_embed.embed.embedding_dim
            return None if cep == "none" else cep_delta(cep, gamma, (len(c), dim), generator, c.device)
        shape = (len(c), c.shape[1] + 1, self.text.dim)  # every token, then the pooled vector
        delta = torch.zeros(shape, device=c.device) if cep == "none" else cep_delta(cep, gamma, shape, generator,
                                                                                    c.device)
        if self.text.replicate_pad and not self.text.ext_dim and self.pad_noise:
            pad = F.pad(c == PAD, (0, 1))
            delta = delta + self.pad_noise * torch.randn(shape, generator=generator, device=c.device) * pad[..., None]
        return delta


# ----------------------------------------------------------------------------- diffusion

def make_betas(schedule, T, shift=1.0):
    if schedule == "linear":  # Ho et al. 2020; Chen et al. Table 3; DiT
        betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    elif schedule == "scaled_linear":  # LDM's "linear" (diffusers: scaled_linear): linear in sqrt(beta)
        betas = np.linspace(0.0015 ** 0.5, 0.0195 ** 0.5, T, dtype=np.float64) ** 2
    elif schedule == "cosine":  # Nichol & Dhariwal 2021, Eq. 17, s = 0.008, betas clipped at 0.999
        f = lambda t: np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
        t = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - f(t + 1) / f(t), 0.999)
    else:
        raise ValueError(f"unknown schedule {schedule!r}: use linear, scaled_linear or cosine")
    if shift != 1.0:  # SNR(t) / shift^2 for an image shift x larger (Hoogeboom et al. 2023; train.py --init-from)
        ac = np.cumprod(1 - betas)
        ac = ac / (ac + shift ** 2 * (1 - ac))
        betas = 1 - ac / np.append(1.0, ac[:-1])
    return betas


class Diffusion:
    def __init__(self, schedule="linear", T=T, prediction="eps", shift=1.0, clip=True):
        self.T, self.prediction, self.clip = T, prediction, clip  # clip: x0 in the data range [-1, 1] (not latents)
        betas = make_betas(schedule, T, shift)
        ac = np.cumprod(1.0 - betas)
        # float32 tensors indexed by integer t in [0, T); .to(device) once, so no step copies them
        self.alphas_cumprod = torch.tensor(ac, dtype=torch.float32)
        self.log_sigmas = torch.tensor(0.5 * np.log((1 - ac) / ac), dtype=torch.float32)  # increasing in t

    def to(self, device):
        for k, v in vars(self).items():
            if torch.is_tensor(v):
                setattr(self, k, v.to(device))
        return self

    def _at(self, arr, t, x):
        return arr[t].view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, t, noise):
        ac = self._at(self.alphas_cumprod, t, x0)
        return ac.sqrt() * x0 + (1 - ac).sqrt() * noise

    def target(self, x0, t, noise):
        if self.prediction == "eps":
            return noise
        ac = self._at(self.alphas_cumprod, t, x0)
        return ac.sqrt() * noise - (1 - ac).sqrt() * x0  # v of Salimans & Ho 2022

    def loss(self, model, x0, c, t, noise, cond_delta=None, ctrl=None, ip=None, hint=None):
        """Per-sample mean squared error [B] (eps or v target). ip: input perturbation (Ning et al. 2023), extra
        noise in the network's input x_t only; the target stays that of `noise`. hint: an adapter's control image."""
        out = model(self.q_sample(x0, t, noise if ip is None else noise + ip), t, c, cond_delta, ctrl, hint)
        return (out.float() - self.target(x0, t, noise)).pow(2).flatten(1).mean(1)

    # ------------------------------------------------------------------------- sampling
    # The discrete-time network is wrapped once as a denoiser D(x, sigma) in variance-exploding coordinates,
    # x = x_t / sqrt(alphas_cumprod), sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod); each sampler walks a
    # list of sigmas (as k-diffusion). DDIM is Euler on the probability-flow ODE in these coordinates.

    def t_of(self, sigma):
        """Timestep of noise level sigma, interpolated in log sigma between the trained integer timesteps: samplers
        whose sigmas fall between them (Heun) give the network the exact noise level, its sinusoidal time embedding
        being smooth in t; at a trained sigma it is that integer t (up to float round-off)."""
        ls = self.log_sigmas
        x = torch.as_tensor(sigma, dtype=torch.float32, device=ls.device).log().clamp(ls[0], ls[-1])
        i = torch.searchsorted(ls, x.reshape(1)).clamp(1, len(ls) - 1)
        return (i - 1 + (x - ls[i - 1]) / (ls[i] - ls[i - 1])).squeeze(0)

    def denoiser(self, model_fn):
        """D(x, sigma): the network's output turned into x0, clipped to the data range [-1, 1] unless latent."""
        def D(x, sigma):
            c_in = 1 / math.sqrt(1 + sigma ** 2)  # sqrt(alphas_cumprod): x_t = c_in * x
            out = model_fn(x * c_in, self.t_of(sigma).expand(len(x))).float()
            x0 = x - sigma * out if self.prediction == "eps" else c_in ** 2 * x - sigma * c_in * out
            return x0.clamp(-1, 1) if self.clip else x0
        return D

    def ddim_timesteps(self, steps):
        if not 1 <= steps <= self.T:
            raise ValueError(f"sampling steps must be in [1, {self.T}], got {steps}")
        # evenly spaced and ending at T-1, so that sampling starts from pure noise ("trailing", Lin et al. 2024)
        return np.unique(np.round(np.linspace(0, self.T - 1, steps)).astype(np.int64))[::-1].copy()

    def sigmas(self, sampler, steps, spacing="time"):
        """The descending noise levels a sampler walks, ending at 0."""
        s = np.exp(self.log_sigmas.double().cpu().numpy())
        if sampler == "heun":  # EDM (Karras et al. 2022, Eq. 5): rho = 7 over our model's sigma range
            if steps < 2:
                raise ValueError("heun needs at least 2 steps")
            r = np.linspace(0, 1, steps)
            sig = (s[-1] ** (1 / 7) + r * (s[0] ** (1 / 7) - s[-1] ** (1 / 7))) ** 7
        elif spacing == "logsnr":  # uniform in log sigma: DPM-Solver's advice for low resolution
            sig = np.exp(np.linspace(np.log(s[-1]), np.log(s[0]), self.ddim_timesteps(steps).size))
        else:  # uniform in t: DPM-Solver's "time_uniform", the spacing of LDM's DPMSolverSampler (the paper's LDM-4
            # code base) and of DDIM; on our linear pixel-space schedule its last steps are very uneven in log sigma
            sig = s[self.ddim_timesteps(steps)]
        return [float(v) for v in sig] + [0.0]

    @torch.no_grad()
    def sample(self, model_fn, x, sampler="ddim", steps=50, eta=0.0, spacing="time", noise_fn=None):
        """Pure noise x ~ N(0, I) -> samples in [-1, 1]. noise_fn(k): fresh noise of step k (ddim with eta > 0)."""
        walk = resolve_sampler(sampler, steps, eta, spacing, self.T)
        sigmas = self.sigmas(walk["sampler"], walk["steps"], walk["spacing"])
        x = x.float() * math.sqrt(1 + sigmas[0] ** 2)
        extra = dict(eta=walk["eta"], noise_fn=noise_fn) if walk["eta"] else {}
        return SAMPLERS[walk["sampler"]](self.denoiser(model_fn), x, sigmas, **extra)


def resolve_sampler(sampler, steps, eta=0.0, spacing="time", T=T):
    """The walk as taken: DDPM is DDIM with eta 1 over all T steps, spaced in t; eta belongs to DDIM alone."""
    if eta and sampler != "ddim":
        raise ValueError(f"eta is for ddim (sample.py: --ddim-eta is for --sampler ddim); {sampler} is deterministic")
    if sampler == "ddpm":
        return dict(sampler="ddim", steps=T, eta=1.0, spacing="time")
    return dict(sampler=sampler, steps=steps, eta=eta, spacing=spacing)


def sample_ddim(D, x, sigmas, eta=0.0, noise_fn=None):
    """DDIM (Song et al. 2021, Eq. 12) as Euler steps in sigma; eta > 0 moves part of each step into fresh noise
    (the ancestral split of k-diffusion, which equals DDIM's sigma_t(eta)); eta = 1 over all T steps is DDPM's
    ancestral sampler with the posterior variance beta_tilde (Ho et al. 2020, Alg. 2)."""
    for k, (s, s_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        x0 = D(x, s)
        up = min(s_next, eta * math.sqrt(s_next ** 2 * (s ** 2 - s_next ** 2) / s ** 2))
        x = x0 + math.sqrt(s_next ** 2 - up ** 2) / s * (x - x0)
        if up > 0:
            x = x + up * noise_fn(k)
    return x


def sample_dpmpp_2m(D, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, second order, data prediction, in lambda = -log sigma;
    first order on the first step and on the last (sigma = 0), as in DPM-Solver's lower_order_final."""
    x0_prev, h_prev = None, None
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = D(x, s)
        if s_next == 0:
            return x0
        h = math.log(s / s_next)
        d = x0 if x0_prev is None else (1 + h / (2 * h_prev)) * x0 - h / (2 * h_prev) * x0_prev
        x = s_next / s * x - math.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


def sample_heun(D, x, sigmas):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1 without churn): 2N - 1 network evaluations."""
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        d = (x - D(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            x_next = x + (s_next - s) * (d + (x_next - D(x_next, s_next)) / s_next) / 2
        x = x_next
    return x


SAMPLERS = {"ddim": sample_ddim, "dpm++": sample_dpmpp_2m, "heun": sample_heun}  # and ddpm: resolve_sampler


def guided(model, c, cfg_scale, ctrl=None, hint=None):
    """Classifier-free guidance: out_u + s (out_c - out_u), conditional and null in one batched forward pass; the
    control metadata and an adapter's control image are the same in both (ControlNet's default)."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, c, None, ctrl, hint)
    c_both = torch.cat([c, model.null_cond(c)])
    ctrl_both, hint_both = (None if v is None else torch.cat([v, v]) for v in (ctrl, hint))

    def fn(x, t):
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), c_both, None, ctrl_both, hint_both).float().chunk(2)
        return out_u + cfg_scale * (out_c - out_u)
    return fn


def generate(net, diffusion, idx, cond, *, seed, shape, device, bf16=False, sampler="ddim", steps=50, eta=0.0,
             spacing="time", cfg_scale=1.0, ctrl=None, decode=None, hint=None):
    """Samples for global indices idx with conditions cond and control metadata ctrl [1, 7] or None -> uint8
    [b, H, W, C]; sample i's noise depends only on (seed, i). decode: latents -> images (latent_decoder). hint: an
    adapter's control images, uint8 [b, H, W, C]."""
    x = to_device(sample_noise(seed, idx, shape), device)
    noise_fn = lambda k: to_device(sample_noise(seed, idx, shape, step=k), device)
    ctrl = None if ctrl is None else ctrl.to(device).expand(len(idx), -1)
    hint = None if hint is None else to_device(torch.as_tensor(np.asarray(hint)), device).permute(0, 3, 1, 2) / 255
    model_fn = guided(net, to_device(cond, device), cfg_scale, ctrl, hint)
    with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=bf16):
        x = diffusion.sample(model_fn, x, sampler, steps, eta, spacing, noise_fn)
        return to_uint8(x if decode is None else decode(x))


def sample_noise(seed, indices, shape, step=None):
    """Standard normal noise whose row j depends only on (seed, indices[j], step): a sample's noise is the same
    for any batch size and any number of GPUs (what lets two models be compared image by image)."""
    out = torch.empty(len(indices), *shape)
    for j, i in enumerate(indices):
        g = torch.Generator().manual_seed(seed_of(seed, int(i), *([] if step is None else [step + 1])))
        out[j] = torch.randn(shape, generator=g)
    return out


# ----------------------------------------------------------------------------- autoencoders (the latent path)

def load_autoencoder(spec, device="cpu"):
    """--vae: a hub id or a folder in diffusers' format, "ID:subfolder" for a subfolder (e.g.
    CompVis/ldm-celebahq-256:vqvae); an AutoencoderKL or a VQModel, told apart by its config. -> (module, info:
    vae, class, sha256 of its config and weights, scaling factor from its config)."""
    try:
        import diffusers
    except ImportError:
        raise ValueError("the latent path needs diffusers: pip install -r requirements-latent.txt") from None
    path, sub = spec.rsplit(":", 1) if ":" in spec and not os.path.exists(spec) else (spec, None)
    try:
        config = diffusers.AutoencoderKL.load_config(path, subfolder=sub)
        cls = {"AutoencoderKL": diffusers.AutoencoderKL, "VQModel": diffusers.VQModel}.get(config.get("_class_name"))
        if cls is None:
            raise ValueError(f"a {config.get('_class_name')}, not an AutoencoderKL or a VQModel")
        ae = cls.from_pretrained(path, subfolder=sub, low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
    except Exception as e:  # diffusers and the hub raise many kinds: no network, no such folder, bad files
        raise ValueError(f"cannot load the autoencoder {spec} ({type(e).__name__}: {str(e).strip()[:150]}): give a "
                         f"folder in diffusers' format or a hub id reachable from here") from None
    public = {k: v for k, v in dict(ae.config).items() if not k.startswith("_")}
    sha = hashlib.sha256((json.dumps(public, sort_keys=True, default=str) + weights_hash(ae.state_dict())).encode())
    return ae, dict(vae=os.path.abspath(spec) if os.path.isdir(spec) else spec, cls=config["_class_name"],
                    sha256=sha.hexdigest(), scaling_factor=float(ae.config.get("scaling_factor") or 1.0))


def ae_encode(ae, x):
    """Images in [-1, 1] -> [B, K, C, h, w]: an AutoencoderKL's posterior mean and std (K = 2: training draws a fresh
    latent each step, as EDM2), a VQModel's latent before quantization (K = 1: LDM's VQ decoder quantizes)."""
    if hasattr(ae, "quantize"):
        return ae.encode(x).latents[:, None]
    d = ae.encode(x).latent_dist
    return torch.stack([d.mean, d.std], 1)


def latent_decoder(latent, vae=None, device="cpu"):
    """z (scaled latents) -> images in [-1, 1], with the autoencoder a latent dataset was made with (its record:
    meta.json's `latent`); vae: where that autoencoder lives now. Another autoencoder is refused."""
    if not (vae or latent["vae"]):
        raise ValueError("this model comes without its autoencoder: give --vae (DiT's: stabilityai/sd-vae-ft-ema)")
    try:
        ae, info = load_autoencoder(vae or latent["vae"], device)
    except ValueError as e:
        if vae:
            raise
        raise ValueError(f"the autoencoder recorded in the run, {latent['vae']}, is not there any more or cannot be "
                         f"reached ({str(e).split(' (', 1)[-1].split('):')[0][:120]}): give --vae PATH (or hub id) "
                         f"where it lives now") from None
    if latent["sha256"] and info["sha256"] != latent["sha256"]:
        raise ValueError(f"the autoencoder {vae or latent['vae']} is not the one these latents were made with (sha256 "
                         f"{info['sha256'][:12]} vs {latent['sha256'][:12]}): give --vae PATH where that one lives")
    return lambda z: ae.decode(z.float() / latent["scale"]).sample


# ----------------------------------------------------------------------------- checkpoints, released models

def build(config):
    """(Denoiser, Diffusion) from a checkpoint's stored config."""
    return Denoiser(**config["model"]), Diffusion(**config["diffusion"])


def with_base(ckpt):
    """An adapter run's checkpoint holds the adapter's weights and names its frozen base run: add the base's (EMA)
    weights, refused unless they are the ones the adapter was trained on."""
    base = ckpt["config"].get("base")
    if not base:
        return ckpt
    try:
        state = load_checkpoint(base["path"])["ema"]
    except (OSError, ValueError) as e:
        raise ValueError(f"this adapter's base run {base['path']} cannot be read ({str(e)[:100]}): put it back "
                         f"there") from None
    if weights_hash(state) != base["sha256"]:
        raise ValueError(f"the base run {base['path']} is not the one this adapter was trained on (weights sha256 "
                         f"{weights_hash(state)[:12]} vs {base['sha256'][:12]}): put that run back there")
    return dict(ckpt, model={**state, **ckpt["model"]}, ema={**state, **ckpt["ema"]})


def load_model(spec, with_vae=True):
    """--ckpt, --init-from: a slightdiff run folder or checkpoint, or a released DiT converted on load into one
    (step 0, no optimizer state): DiT's own checkpoint (DiT-XL-2-256x256.pt) or a diffusers DiTTransformer2DModel
    (a pipeline's folder or hub id, e.g. facebook/DiT-XL-2-256 or DiffusionNoise/dit-xl-2_imagenet_clean, or the
    model's own folder). with_vae: record the pipeline's autoencoder, as a latent dataset records one."""
    folder = os.path.isdir(spec)
    if folder and not os.path.isfile(os.path.join(spec, "ckpt.pt")) and \
            {"config.json", "model_index.json"} & set(os.listdir(spec)) or \
            not os.path.exists(spec) and re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and not spec.endswith(".pt") \
            and not os.path.isdir(spec.split("/")[0]):  # runs/typo is a missing run, not a hub id
        state, arch, diffusion, names, vae = dit_from_diffusers(spec)
        source = dict(kind="diffusers", id=os.path.abspath(spec) if folder else spec, sha256=weights_hash(state))
    elif os.path.isfile(spec) and (theirs := dit_pt_state(spec)) is not None:
        (state, arch), diffusion, names, vae = dit_from_pt(theirs, spec), dict(schedule="linear"), None, None
        source = dict(kind="dit-pt", id=os.path.abspath(spec), sha256=file_hash(spec))
    else:
        return with_base(load_checkpoint(spec))
    res, ch = arch.pop("resolution"), arch.pop("channels")
    latent = dict(vae=None, cls="AutoencoderKL", sha256=None, scale=0.18215, kind="kl", image_channels=3,
                  image_resolution=8 * res)  # DiT's: the SD autoencoder, 8x downsampling
    if vae and with_vae:
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
        with zipfile.ZipFile(path) as z:  # a slightdiff checkpoint says so in its pickle: not loaded twice
            if any(n.endswith("data.pkl") and CKPT_FORMAT.encode() in z.read(n) for n in z.namelist()):
                return None
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file, or one with pickled objects: plumbing.load_checkpoint says which
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
    try:
        import diffusers
    except ImportError:
        raise ValueError("released models in diffusers' format need diffusers: pip install -r "
                         "requirements-latent.txt") from None
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
