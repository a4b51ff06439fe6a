"""slightdiff's networks: the denoisers' backbones, their condition embedders, the autoencoders of the latent path,
and the checkpoint opener. The diffusion (schedules, loss, samplers) is diffusion.py.

  PRESETS            every network by name: the UNets tiny, cifar (DDPM), in64 (ADM), ldm4 (LDM-4) and the DiTs
                     dit-tiny, dit-s2 ... dit-xl2 (Peebles & Xie), with their text-encoder size and schedule
  attention          the one multi-head attention (SDPA) of the UNet, the DiT and the text encoder
  UNet               ResBlock, AttentionBlock (self-, cross-attention, LDM's feed-forward), ResAttnBlock, UNet
  DiT                sincos_2d, DiTBlock (adaLN-Zero), DiT
  conditions         ClassEmbedder, TextEncoder (UTF-8 bytes), cep_delta (Chen et al.)
  Denoiser           a backbone and its condition embedders: what train.py trains and sample.py samples
  autoencoders       load_autoencoder, ae_encode, latent_decoder: the latent path (diffusers)
  checkpoints        build, load_model: a run (a released model: ext/released.py, through the first lazy seam)

The condition enters a backbone in two ways, so text tokens (or ext/metadata.py's control metadata) are added without
touching it:
  c_vec    [B, emb_dim]      added to the time embedding (a UNet's scale-shift norms, a DiT's adaLN);
  c_tokens [B, L, ctx_dim]   attended to by cross-attention (if ctx_dim is set).
"""
import hashlib
import inspect
import json
import math
import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from diffusion import Diffusion
from plumbing import hub_offline, load_checkpoint, optional, weights_hash

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
    # LDM-4 on 64x64x3 VQ-f4 latents, CompVis' cin256-v2 block for block (Chen et al. Table 3): LDM's spatial
    # transformers with one head, the class as one cross-attention token of a 512-wide embedding (class_ctx; 0 sends
    # it through c_vec), LDM's schedule. An ldm4 config without `transformer` predates this block (load_checkpoint).
    "ldm4": dict(unet=dict(ch=192, ch_mult=(1, 2, 3, 5), num_res_blocks=2, attn_res=(32, 16, 8), dropout=0.0,
                           head_ch=None, scale_shift=False, transformer=True), class_ctx=512, schedule="scaled_linear"),
    # DiTs (depth, width, heads, patch): a CPU-sized one and DiT's S/2, B/2, L/2, XL/2 (Peebles & Xie, Table 1).
    "dit-tiny": dict(dit=dict(depth=4, dim=128, heads=4, patch=2), text=(64, 2)),
    "dit-s2": dict(dit=dict(depth=12, dim=384, heads=6, patch=2)),
    "dit-b2": dict(dit=dict(depth=12, dim=768, heads=12, patch=2)),
    "dit-l2": dict(dit=dict(depth=24, dim=1024, heads=16, patch=2)),
    "dit-xl2": dict(dit=dict(depth=28, dim=1152, heads=16, patch=2)),
}  # text: (width, layers) of the text encoder, default (384, 6); schedule: default linear


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


class SpatialTransformer(nn.Module):
    """LDM's transformer block over the pixels (CompVis' SpatialTransformer, diffusers' Transformer2DModel): GroupNorm,
    a 1x1 projection in, LayerNorm + self-attention, LayerNorm + cross-attention to the condition tokens (itself
    without them, as LDM), LayerNorm + GEGLU (4x wide), a zero-initialised 1x1 projection out, residual."""

    def __init__(self, ch, head_ch, ctx_dim=None):
        super().__init__()
        self.heads = max(1, ch // head_ch) if head_ch else 1
        self.norm, self.proj_in = nn.GroupNorm(math.gcd(32, ch), ch, eps=1e-6), nn.Conv2d(ch, ch, 1)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(ch), nn.LayerNorm(ch), nn.LayerNorm(ch)
        self.q, self.kv, self.proj = nn.Linear(ch, ch, bias=False), nn.Linear(ch, 2 * ch, bias=False), nn.Linear(ch, ch)
        self.q_x, self.proj_x = nn.Linear(ch, ch, bias=False), nn.Linear(ch, ch)
        self.kv_x = nn.Linear(ctx_dim or ch, 2 * ch, bias=False)
        self.ff_in, self.ff_out = nn.Linear(ch, 8 * ch), nn.Linear(4 * ch, ch)
        self.proj_out = zero_init(nn.Conv2d(ch, ch, 1))

    def forward(self, x, tokens=None):
        h = rearrange(self.proj_in(self.norm(x)), "b c y x -> b (y x) c")
        n = self.norm1(h)
        h = h + attend(n, n, self.heads, self.q, self.kv, self.proj)
        n = self.norm2(h)
        h = h + attend(n, n if tokens is None else tokens, self.heads, self.q_x, self.kv_x, self.proj_x)
        a, gate = self.ff_in(self.norm3(h)).chunk(2, -1)
        h = h + self.ff_out(a * F.gelu(gate))
        return x + self.proj_out(rearrange(h, "b (y x) c -> b c y x", y=x.shape[2]))


class ResAttnBlock(nn.Module):
    """A ResBlock, followed at the attention resolutions by an AttentionBlock (or LDM's SpatialTransformer)."""

    def __init__(self, cin, cout, emb_dim, dropout, scale_shift, attn, head_ch, ctx_dim, ff, transformer):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, dropout, scale_shift)
        self.attn = None if not attn else SpatialTransformer(cout, head_ch, ctx_dim) if transformer else \
            AttentionBlock(cout, head_ch, ctx_dim, ff)

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
                 dropout=0.1, head_ch=64, scale_shift=True, ctx_dim=None, out_ch=None, ff=False, transformer=False):
        super().__init__()
        self.ch, self.emb_dim = ch, 4 * ch
        if resolution % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"resolution {resolution} is not divisible by 2^{len(ch_mult) - 1} for this preset")
        self.time_mlp = nn.Sequential(nn.Linear(ch, self.emb_dim), nn.SiLU(), nn.Linear(self.emb_dim, self.emb_dim))
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)
        blk = dict(emb_dim=self.emb_dim, dropout=dropout, scale_shift=scale_shift, head_ch=head_ch, ctx_dim=ctx_dim,
                   ff=ff, transformer=transformer)
        self.down, skips, cur, res = nn.ModuleList(), [ch], ch, resolution
        for i, m in enumerate(ch_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResAttnBlock(cur, ch * m, attn=res in attn_res, **blk))
                cur = ch * m
                skips.append(cur)
            if i < len(ch_mult) - 1:
                self.down.append(Downsample(cur))
                skips.append(cur)
                res //= 2
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

    def forward(self, x, t, c_vec=None, c_tokens=None):
        emb = self.embed(t, c_vec)
        return self.decode(self.encode(self.conv_in(x), emb, c_tokens), emb, c_tokens)

    def embed(self, t, c_vec=None):
        """The time embedding, plus the condition vector."""
        emb = self.time_mlp(timestep_embedding(t, self.ch))
        return emb if c_vec is None else emb + c_vec

    def encode(self, h, emb, tokens):
        """The encoder and the middle block, from the first convolution's output -> the features of every skip
        connection, then the middle block's output (what the decoder reads; ControlNet adds to each)."""
        hs = [h]
        for m in self.down:
            h = m(h) if isinstance(m, Downsample) else m(h, emb, tokens)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb, tokens)
        return hs + [h]

    def decode(self, hs, emb, tokens):
        h = hs.pop()
        for m in self.up:
            h = m(h) if isinstance(m, Upsample) else m(torch.cat([h, hs.pop()], 1), emb, tokens)
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


class Denoiser(nn.Module):
    """x_t, t, condition c -> network output: a backbone (self.unet or self.dit) and its condition embedders. c is one
    of: class labels [B] (index num_classes = null), byte tokens [B, L] of captions (the empty caption = null),
    precomputed caption embeddings [B, L, ext_dim] (zeros = null). cond_delta: training-time noise on the condition
    embedding (cond_noise)."""

    def __init__(self, num_classes, resolution=32, channels=3, preset="tiny", cond="class", text_dim=None,
                 text_layers=None, max_len=64, ext_dim=None, replicate_pad=True, pad_noise=0.1, class_ctx=None, **arch):
        """preset: a name in PRESETS; arch: its backbone's values changed (a UNet's ch, dropout, attn_res; a DiT's
        depth, dim, heads, patch, freq_shift, mlp_eps); class_ctx: the class through cross-attention on an
        embedding this wide (0: through c_vec; default: the preset's)."""
        super().__init__()
        spec = PRESETS[preset]
        kind, net = ("dit", DiT) if "dit" in spec else ("unet", UNet)
        unknown = set(arch) - set(inspect.signature(net).parameters)
        if unknown:
            raise ValueError(f"{preset} is a {kind.upper()}: {', '.join(sorted(unknown))} are not its settings")
        class_ctx = spec.get("class_ctx") if class_ctx is None else class_ctx
        self.class_ctx = class_ctx if cond == "class" else None
        self.num_classes, self.cond, self.resolution, self.pad_noise = num_classes, cond, resolution, pad_noise
        text_dim, text_layers = (a or b for a, b in zip((text_dim, text_layers), spec.get("text", (384, 6))))
        ctx_dim = text_dim if cond == "text" else self.class_ctx or None
        backbone = net(resolution, channels, ctx_dim=ctx_dim, **{**spec[kind], **arch})
        self.unet, self.dit = (backbone, None) if kind == "unet" else (None, backbone)
        if cond == "class":
            self.label_embed = ClassEmbedder(num_classes, self.class_ctx or backbone.emb_dim)
        else:
            self.text = TextEncoder(text_dim, text_layers, max_len, backbone.emb_dim, ext_dim, replicate_pad)

    @property
    def backbone(self):
        return self.unet if self.unet is not None else self.dit

    def forward(self, x, t, c, cond_delta=None):
        return self.backbone(x, t, *self.condition(c, t, cond_delta))

    def condition(self, c, t, cond_delta=None):
        """-> (c_vec, c_tokens), what the backbone reads of the condition (see the module's docstring)."""
        c_vec, c_tokens = (self.label_embed(c, cond_delta), None) if self.cond == "class" else self.text(c, cond_delta)
        if self.class_ctx:  # the class as one token that cross-attention reads (LDM), not in the time embedding
            c_vec, c_tokens = None, c_vec[:, None]
        return c_vec, c_tokens

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


# ----------------------------------------------------------------------------- autoencoders (the latent path)

def load_autoencoder(spec, device="cpu"):
    """--vae: a hub id or a folder in diffusers' format, "ID:subfolder" for a subfolder (e.g.
    CompVis/ldm-celebahq-256:vqvae); an AutoencoderKL or a VQModel, told apart by its config. -> (module, info:
    vae, class, sha256 of its config and weights, scaling factor from its config)."""
    diffusers = optional("diffusers", "the latent path", "requirements-latent.txt")
    path, sub = spec.rsplit(":", 1) if ":" in spec and not os.path.exists(spec) else (spec, None)
    offline = None if os.path.exists(path) else hub_offline(spec, "--vae")  # fail at once where the hub is out of reach
    try:
        config = diffusers.AutoencoderKL.load_config(path, subfolder=sub)
        cls = {"AutoencoderKL": diffusers.AutoencoderKL, "VQModel": diffusers.VQModel}.get(config.get("_class_name"))
        if cls is None:
            raise ValueError(f"a {config.get('_class_name')}, not an AutoencoderKL or a VQModel")
        ae = cls.from_pretrained(path, subfolder=sub, low_cpu_mem_usage=False).to(device).eval().requires_grad_(False)
    except Exception as e:  # diffusers and the hub raise many kinds: no network, no such folder, bad files
        raise ValueError(offline or f"cannot load the autoencoder {spec} ({type(e).__name__}: {str(e).strip()[:150]}): "
                         f"give a folder in diffusers' format or a hub id reachable from here") from None
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


# ----------------------------------------------------------------------------- checkpoints

def build(config):
    """(Denoiser, Diffusion) from a checkpoint's stored config."""
    return Denoiser(**config["model"]), Diffusion(**config["diffusion"])


def load_model(spec, with_vae=True, ext=False):
    """--ckpt, --init-from: a slightdiff run folder or checkpoint file (ext: an extension's run too). Anything else
    goes to ext/released.py (the first lazy seam), which converts a released model on load (with_vae: recording its
    autoencoder) or raises the run loader's error."""
    try:
        return load_checkpoint(spec, ext)
    except (OSError, ValueError) as e:
        try:
            from ext import released
        except ImportError:  # a fork without ext/: plain runs only
            raise e from None
        return released.load(spec, with_vae, why=e, ext=ext)
