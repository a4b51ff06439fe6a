"""slightdiff's diffusion, apart from the networks: noise schedules, the training loss, and the samplers that walk a
denoiser D(x, sigma) (as k-diffusion), with classifier-free guidance.

  make_betas, Diffusion    the schedules (linear, LDM's scaled_linear, cosine; SNR shift), q_sample, the eps or v
                           target and loss, the network wrapped once as D(x, sigma)
  samplers                 sample_ddim (and DDPM), sample_dpmpp_2m, sample_heun; resolve_sampler names the walk
  guided, generate         CFG in one batched pass; uint8 samples whose noise depends only on (seed, index)

A model here is any callable model(x_t, t, c, **inputs): c is the condition (its null from model.null_cond for
guidance), inputs the rest of what the network reads (CEP's delta, control metadata, an adapter's control image).
"""
import math

import numpy as np
import torch

from plumbing import seed_of, to_device, to_uint8

T = 1000  # diffusion timesteps of every schedule here: the network's time input and the control phase-in span [0, T)


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

    def loss(self, model, x0, c, t, noise, ip=None, **inputs):
        """Per-sample mean squared error [B] (eps or v target) of model(x_t, t, c, **inputs). ip: input perturbation
        (Ning et al. 2023), extra noise in the network's input x_t only; the target stays that of `noise`."""
        out = model(self.q_sample(x0, t, noise if ip is None else noise + ip), t, c, **inputs)
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


def guided(model, c, cfg_scale, **inputs):
    """Classifier-free guidance: out_u + s (out_c - out_u), conditional and null in one batched forward pass; every
    other input (control metadata, an adapter's control image) is the same in both halves (ControlNet's default)."""
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, c, **inputs)
    c_both = torch.cat([c, model.null_cond(c)])
    both = {k: None if v is None else torch.cat([v, v]) for k, v in inputs.items()}

    def fn(x, t):
        out_c, out_u = model(torch.cat([x, x]), torch.cat([t, t]), c_both, **both).float().chunk(2)
        return out_u + cfg_scale * (out_c - out_u)
    return fn


def generate(net, diffusion, idx, cond, *, seed, shape, device, bf16=False, sampler="ddim", steps=50, eta=0.0,
             spacing="time", cfg_scale=1.0, decode=None, inputs=None):
    """Samples for global indices idx with conditions cond -> uint8 [b, H, W, C]; sample i's noise depends only on
    (seed, i). inputs: the network's other inputs for these samples ({name: [b, ...]}: ctrl, an adapter's hint).
    decode: latents -> images (model.latent_decoder)."""
    x = to_device(sample_noise(seed, idx, shape), device)
    noise_fn = lambda k: to_device(sample_noise(seed, idx, shape, step=k), device)
    inputs = {k: None if v is None else to_device(v, device) for k, v in (inputs or {}).items()}
    model_fn = guided(net, to_device(cond, device), cfg_scale, **inputs)
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
