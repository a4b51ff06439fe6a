import math
import os

import numpy as np
import pytest
import torch

import model
import plumbing
from model import Denoiser, Diffusion
import diffusion  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("preset,res,classes", [("tiny", 32, 10), ("cifar", 32, 10), ("in64", 64, 1000)])
def test_unet_output_shape_every_preset(preset, res, classes):
    torch.manual_seed(0)
    net = Denoiser(classes, res, 3, preset).eval()
    x = torch.randn(2, 3, res, res)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 999]), torch.tensor([1, classes]))  # a real class and the null class
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(Denoiser(10, 32, 3, "tiny")) < 1_000_000
    cifar = Denoiser(10, 32, 3, "cifar")
    assert count(cifar.unet) == 35_746_307  # the DDPM CIFAR-10 UNet, 35.7M
    assert count(cifar.label_embed) == 11 * 512


def test_cross_attention_reads_the_condition_tokens():
    torch.manual_seed(0)
    unet = model.UNet(32, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_res=(16,), ctx_dim=24, head_ch=32)
    for m in unet.modules():  # zero-initialised projections would hide the tokens' effect
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 400])
    a = unet(x, t, c_tokens=torch.randn(2, 5, 24))
    b = unet(x, t, c_tokens=torch.randn(2, 5, 24))
    assert a.shape == x.shape and not torch.allclose(a, b)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_identities(schedule):
    d = Diffusion(schedule)
    betas = diffusion.make_betas(schedule, 1000)
    ac = np.cumprod(1 - betas)
    assert np.all(betas > 0) and np.all(betas <= 0.999) and np.all(np.diff(ac) < 0)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), ac, rtol=1e-6)
    np.testing.assert_allclose(np.exp(2 * d.log_sigmas.double().numpy()), (1 - ac) / ac, rtol=1e-5)
    if schedule == "linear":
        assert betas[0] == pytest.approx(1e-4) and betas[-1] == pytest.approx(0.02)
        assert ac[-1] == pytest.approx(4.04e-5, rel=0.01)  # DDPM: x_T is almost pure noise


def test_q_sample_moments():
    d = Diffusion()
    x0 = torch.full((20000, 1), 0.5)
    t = torch.full((20000,), 300)
    xt = d.q_sample(x0, t, torch.randn_like(x0))
    ac = d.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ac) * 0.5, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - ac, rel=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_denoiser_inverts_the_forward_process(prediction):
    d = Diffusion(prediction=prediction)
    x0 = torch.rand(4, 3, 8, 8) * 1.8 - 0.9
    eps, t = torch.randn_like(x0), torch.tensor([0, 10, 500, 999])
    exact = {int(k): d.target(x0[i:i + 1], t[i:i + 1], eps[i:i + 1]) for i, k in enumerate(t)}  # the ideal network
    D = d.denoiser(lambda x, tt: exact[int(tt[0].round())])
    for i, k in enumerate(t.tolist()):
        sigma = float(d.log_sigmas[k].exp())
        assert d.t_of(sigma).item() == pytest.approx(k, abs=1e-3)  # a trained sigma maps back to its timestep
        x_ve = d.q_sample(x0[i:i + 1], t[i:i + 1], eps[i:i + 1]) * math.sqrt(1 + sigma ** 2)
        torch.testing.assert_close(D(x_ve, sigma), x0[i:i + 1], atol=3e-3 * max(1, sigma), rtol=0)
    assert d.t_of(float(d.log_sigmas[10:12].exp().prod().sqrt())).item() == pytest.approx(10.5, abs=1e-3)


def test_ddim_eta0_is_deterministic_and_uses_no_noise():
    torch.manual_seed(0)
    net = Denoiser(10, 32, 3, "tiny").eval()
    d = Diffusion()
    x = torch.randn(3, 3, 32, 32)
    fn = diffusion.guided(net, torch.tensor([0, 1, 2]), 1.0)

    def no_noise(k):
        raise AssertionError("DDIM at eta 0 drew noise")
    a = d.sample(fn, x.clone(), "ddim", 5, eta=0.0, noise_fn=no_noise)
    b = d.sample(fn, x.clone(), "ddim", 5, eta=0.0, noise_fn=no_noise)
    assert torch.equal(a, b)
    c = d.sample(fn, x.clone(), "ddim", 5, eta=1.0, noise_fn=lambda k: torch.randn_like(x))
    assert not torch.allclose(a, c)


def test_sampler_noise_levels():
    d = Diffusion()
    ts = d.ddim_timesteps(50)
    assert len(ts) == 50 and ts[0] == 999 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
    assert d.ddim_timesteps(1000).tolist() == list(range(999, -1, -1))
    with pytest.raises(ValueError, match="sampling steps"):
        d.ddim_timesteps(0)
    s_max, s_min = math.exp(d.log_sigmas[-1].item()), math.exp(d.log_sigmas[0].item())
    for sampler, steps, n in [("ddim", 50, 51), ("dpm++", 20, 21), ("ddpm", 0, 1001), ("heun", 18, 19)]:
        sig = d.sigmas(*list(diffusion.resolve_sampler(sampler, steps).values())[:2])
        assert len(sig) == n and sig[-1] == 0 and all(a > b for a, b in zip(sig, sig[1:]))
        assert sig[0] == pytest.approx(s_max, rel=1e-5) and sig[-2] == pytest.approx(s_min, rel=1e-5)
    heun = np.array(d.sigmas("heun", 18)[:-1])
    np.testing.assert_allclose(np.diff(heun ** (1 / 7)), np.diff(heun ** (1 / 7))[0], rtol=1e-6)  # EDM's rho = 7


def test_ddpm_is_ancestral_with_the_posterior_variance():
    """One DDPM step from x_t must have the mean and variance of q(x_{t-1} | x_t, x0) (Ho et al. Eq. 6-7)."""
    d = Diffusion()
    t, x0, n = 500, 0.3, 200000
    ac, ac_prev = d.alphas_cumprod[t].double(), d.alphas_cumprod[t - 1].double()
    beta = 1 - ac / ac_prev
    xt = torch.full((n, 1), 0.7)
    sig = d.sigmas(*list(diffusion.resolve_sampler("ddpm", 0).values())[:2])
    s, s_next = sig[999 - t], sig[1000 - t]
    out = diffusion.sample_ddim(lambda x, sigma: torch.full_like(x, x0), xt * math.sqrt(1 + s ** 2), [s, s_next, 0.0][:2],
                            eta=1.0, noise_fn=lambda k: torch.randn(n, 1, dtype=torch.float64))
    out = out * ac_prev.sqrt()  # back to x_{t-1}
    mean = (beta * ac_prev.sqrt() / (1 - ac)) * x0 + ((1 - ac_prev) * (1 - beta).sqrt() / (1 - ac)) * 0.7
    var = beta * (1 - ac_prev) / (1 - ac)
    assert out.mean().item() == pytest.approx(mean.item(), abs=3e-4)
    assert out.var().item() == pytest.approx(var.item(), rel=0.02)


class GaussianData:
    """Data x0 ~ N(mu, s^2) per pixel: the exact epsilon predictor is known in closed form."""

    def __init__(self, d, mu=0.3, s=0.2):
        self.d, self.mu, self.s = d, mu, s

    def __call__(self, x_t, t):  # E[eps | x_t] at the noise level of (fractional) timestep t
        ls, t = self.d.log_sigmas.double(), t.double()
        i = t.floor().clamp(0, self.d.T - 2).long()  # the inverse of Diffusion.t_of: linear in log sigma
        ac = 1 / (1 + torch.exp(2 * (ls[i] + (t - i) * (ls[i + 1] - ls[i]))))[:, None, None, None]
        return (1 - ac).sqrt() * (x_t - ac.sqrt() * self.mu) / (ac * self.s ** 2 + 1 - ac)


@pytest.mark.parametrize("sampler,spacing", [("ddim", "time"), ("dpm++", "time"), ("dpm++", "logsnr"),
                                             ("heun", "time")])
def test_deterministic_samplers_converge_on_gaussian_data(sampler, spacing):
    d = Diffusion()
    exact = GaussianData(d)
    x = diffusion.sample_noise(0, range(4000), (1, 2, 2))
    errors = []
    for steps in (20, 50, 200):
        out = d.sample(exact, x, sampler, steps, spacing=spacing).double()
        errors.append(abs(out.mean().item() - 0.3) + abs(out.std().item() - 0.2))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.01, errors  # 16000 values: noise ~0.003
    again = d.sample(exact, x, sampler, 10, spacing=spacing)
    assert torch.equal(again, d.sample(exact, x, sampler, 10, spacing=spacing))  # deterministic for a fixed noise


def test_dpm_solver_beats_ddim_at_20_steps():
    """Distance of each sample to the exact ODE solution from the same noise (Heun, 400 steps)."""
    d = Diffusion()
    exact = GaussianData(d)
    x = diffusion.sample_noise(0, range(4000), (1, 2, 2))
    ref = d.sample(exact, x, "heun", 400).double()
    err = {(s, sp): (d.sample(exact, x, s, 20, spacing=sp).double() - ref).abs().mean().item()
           for s, sp in [("ddim", "time"), ("dpm++", "time"), ("dpm++", "logsnr")]}
    assert err["dpm++", "time"] < err["ddim", "time"], err  # measured 0.040 vs 0.046: barely, in the paper's spacing
    assert err["dpm++", "logsnr"] < 0.1 * err["ddim", "time"], err  # measured 0.0022


def test_classifier_free_guidance_is_batched_and_exact():
    torch.manual_seed(0)
    net = Denoiser(10, 32, 3, "tiny").eval()
    for p in net.unet.conv_out.parameters():  # make the output depend on the input
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 600]), torch.tensor([3, 4])
    with torch.no_grad():
        cond, uncond = net(x, t, y), net(x, t, torch.full_like(y, 10))
        got = diffusion.guided(net, y, 2.5)(x, t)
        torch.testing.assert_close(got, uncond + 2.5 * (cond - uncond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(diffusion.guided(net, y, 1.0)(x, t), cond)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_cep_noise_scale(kind):
    g = torch.Generator().manual_seed(0)
    d, gamma = 512, 2.0
    delta = model.cep_delta(kind, gamma, (400, d), g)
    bound = gamma / math.sqrt(d)
    if kind == "uniform":
        assert delta.abs().max() <= bound and delta.abs().max() > 0.99 * bound
        assert delta.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)
    else:
        assert delta.std().item() == pytest.approx(bound, rel=0.02)  # gamma/sqrt(d) read as the std
    assert abs(delta.mean().item()) < 0.01 * bound * 10
    with pytest.raises(ValueError, match="unknown CEP"):
        model.cep_delta("laplace", 1.0, (2, 4))


def test_cep_changes_the_embedding_only_when_given():
    emb = model.ClassEmbedder(10, 16)
    y = torch.tensor([1, 2])
    delta = torch.ones(2, 16)
    torch.testing.assert_close(emb(y, delta), emb(y) + 1)


def test_sample_noise_depends_only_on_seed_and_index():
    a = diffusion.sample_noise(0, [0, 1, 2, 3], (3, 4, 4))
    b = torch.cat([diffusion.sample_noise(0, [2, 3], (3, 4, 4)), diffusion.sample_noise(0, [0, 1], (3, 4, 4))])
    torch.testing.assert_close(a, b[[2, 3, 0, 1]], rtol=0, atol=0)
    assert not torch.allclose(a, diffusion.sample_noise(1, [0, 1, 2, 3], (3, 4, 4)))
    assert not torch.allclose(a, diffusion.sample_noise(0, [0, 1, 2, 3], (3, 4, 4), step=0))
    assert a.std().item() == pytest.approx(1.0, rel=0.15)


class Exploit:
    def __reduce__(self):  # what an untrusted pickle would run on loading
        return (os.system, ("touch exploited",))


def test_checkpoint_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        plumbing.load_checkpoint(str(tmp_path / "nope.pt"))
    good = dict(format=plumbing.CKPT_FORMAT, model={"w": torch.ones(1000)}, ema={}, opt={}, step=3,
                config=dict(model={}, diffusion={}, train={}, data={}))
    plumbing.save_atomic(str(tmp_path / "good.pt"), lambda f: torch.save(good, f))
    data = (tmp_path / "good.pt").read_bytes()
    for cut in sorted(np.random.default_rng(0).choice(len(data) - 1, 12, replace=False)):  # truncated anywhere
        (tmp_path / "cut.pt").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated or not a torch file"):
            plumbing.load_checkpoint(str(tmp_path / "cut.pt"))
    torch.save({"state_dict": {}}, str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="not a slightdiff checkpoint"):
        plumbing.load_checkpoint(str(tmp_path / "foreign.pt"))
    torch.save({k: v for k, v in good.items() if k != "ema"}, str(tmp_path / "old.pt"))
    with pytest.raises(ValueError, match="lacks ema"):
        plumbing.load_checkpoint(str(tmp_path / "old.pt"))
    torch.save(dict(good, step=Exploit()), str(tmp_path / "evil.pt"))
    with pytest.raises(ValueError, match="refusing .*pickled objects"):
        plumbing.load_checkpoint(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "exploited").exists()
    assert plumbing.load_checkpoint(str(tmp_path / "good.pt"))["model"]["w"].sum() == 1000
    assert [p.name for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_save_atomic_keeps_the_previous_file_when_a_write_fails(tmp_path):
    path = str(tmp_path / "f.npz")
    plumbing.save_npz(path, x=np.arange(3))
    before = (tmp_path / "f.npz").read_bytes()

    def disk_full(f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="cannot write .*f.npz .No space left on device.*unchanged"):
        plumbing.save_atomic(path, disk_full)
    assert (tmp_path / "f.npz").read_bytes() == before and os.listdir(tmp_path) == ["f.npz"]
    plumbing.save_npz(str(tmp_path / "g.npz"), x=np.arange(3))
    assert (tmp_path / "g.npz").read_bytes() == before  # no timestamps: the same arrays, the same bytes


@pytest.mark.slow
def test_compiled_model_agrees_with_eager():
    torch.manual_seed(0)
    net = Denoiser(10, 32, 3, "tiny").eval()
    for p in net.unet.conv_out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x, t, y = torch.randn(2, 3, 32, 32), torch.tensor([5, 600]), torch.tensor([3, 10])
    compiled = torch.compile(net, backend="aot_eager")  # graph capture on the CPU; no C++ toolchain needed
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), net(x, t, y), atol=1e-5, rtol=1e-5)
    # the checkpoint is saved from the uncompiled module: no _orig_mod. prefixes
    assert list(net.state_dict()) == [k.replace("_orig_mod.", "") for k in compiled.state_dict()]
    assert all(not k.startswith("_orig_mod.") for k in net.state_dict())


def test_tokenize_and_null_caption():
    tok = model.tokenize(["ab", "", "é" * 10], 8)
    assert tok.shape == (3, 8) and tok[:, 0].tolist() == [model.CLS] * 3
    assert tok[0, 1:3].tolist() == [97, 98] and (tok[0, 3:] == model.PAD).all()
    assert (tok[1, 1:] == model.PAD).all()  # the empty caption: CLS alone, the null condition of CFG
    assert (tok[2] != model.PAD).all()  # cut at max_len - 1 bytes
    net = Denoiser(1, 32, 3, "tiny", cond="text", max_len=8)
    assert torch.equal(net.null_cond(tok), model.tokenize(["", "", ""], 8))


def test_replicate_padding_copies_real_tokens_and_noise_makes_them_vary():
    torch.manual_seed(0)
    enc = model.TextEncoder(16, 1, 8, 32).eval()
    tok = model.tokenize(["ab", "abcdefghij"], 8)  # 3 real tokens (CLS a b) and 5 padding positions; no padding
    with torch.no_grad():
        _, h = enc(tok)
    assert torch.equal(h[0, 3:], h[0, [0, 1, 2, 0, 1]])  # cycled copies of CLS, a, b instead of pad embeddings
    plain = model.TextEncoder(16, 1, 8, 32, replicate_pad=False).eval()
    plain.load_state_dict(enc.state_dict())
    with torch.no_grad():
        _, p = plain(tok)
    assert torch.equal(p[:, :3], h[:, :3]) and not torch.allclose(p[0, 3], p[0, 0], atol=0.1)  # pad tokens' outputs
    net = Denoiser(1, 32, 3, "tiny", cond="text", max_len=8, pad_noise=0.1).eval()
    delta = net.cond_noise(tok, "none", 1.0, torch.Generator().manual_seed(0))
    assert delta.shape == (2, 9, 64) and (delta[0, :3] == 0).all() and (delta[0, 3:8] != 0).all()
    assert (delta[1] == 0).all() and (delta[:, -1] == 0).all()  # real tokens and the pooled vector: no pad noise
    with torch.no_grad():
        _, noisy = net.text(tok, delta)
    spread = noisy[0, 3:].std(0)  # padded positions are not constant, nor exact copies
    assert (spread > 0).all() and not torch.allclose(noisy[0, 3], noisy[0, 0])
    assert not torch.allclose(noisy[0, 3], noisy[0, 6])  # two noisy copies of CLS differ


def test_cep_on_text_perturbs_every_token_and_the_pooled_vector():
    net = Denoiser(1, 32, 3, "tiny", cond="text", max_len=8, replicate_pad=False).eval()
    tok = model.tokenize(["a red disk", ""], 8)
    d = net.cond_noise(tok, "uniform", 2.0, torch.Generator().manual_seed(0))
    assert d.shape == (2, 9, 64) and (d != 0).all() and d.abs().max() <= 2.0 / math.sqrt(64)  # d = the text width
    with torch.no_grad():
        vec0, tok0 = net.text(tok)
        vec1, tok1 = net.text(tok, d)
        torch.testing.assert_close(tok1, tok0 + d[:, :-1])
        torch.testing.assert_close(vec1 - vec0, d[:, -1] @ net.text.to_vec.weight.T)  # pooled (CLS) + delta


def test_control_is_phased_in_at_low_noise():
    from ext import metadata
    Meta = lambda control: metadata.MetadataDenoiser(control, num_classes=10, resolution=32, channels=3, preset="tiny")
    w = metadata.control_weight(torch.tensor([0, 100, 500, 900, 999]))
    assert w[0] == 1 and w[-1] < 1e-6 and w[1] > 0.97 and abs(w[2] - 0.5) < 0.01 and w[3] < 0.03
    torch.manual_seed(0)
    net = Meta("phased").eval()
    torch.nn.init.normal_(net.control.mlp[-1].weight, std=0.5)  # zero-initialised: give the control an effect
    for m in net.unet.modules():  # and the blocks, which start as the identity
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=0.05)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 2])
    a, b = metadata.neutral_control(2, 32), metadata.neutral_control(2, 32)
    b[:, 6] = 1  # flipped
    with torch.no_grad():
        for t, changes in [(0, True), (999, False)]:
            tt = torch.full((2,), t)
            out_a, out_b = net(x, tt, y, ctrl=a), net(x, tt, y, ctrl=b)
            assert (not torch.allclose(out_a, out_b, atol=1e-6)) == changes, t
        summed = Meta("sum").eval()
        summed.load_state_dict(net.state_dict())
        tt = torch.full((2,), 999)
        assert not torch.allclose(summed(x, tt, y, ctrl=a), summed(x, tt, y, ctrl=b), atol=1e-6)  # the baseline


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_shift_divides_the_snr(schedule):
    snr = lambda betas: (lambda ac: ac / (1 - ac))(np.cumprod(1 - betas))  # float64, as the schedule is built
    base, shifted = diffusion.make_betas(schedule, 1000), diffusion.make_betas(schedule, 1000, shift=2.0)
    np.testing.assert_allclose(snr(shifted), snr(base) / 4, rtol=1e-9)
    assert np.all(shifted > 0) and np.all(shifted < 1)
    assert Diffusion(schedule, shift=2.0).alphas_cumprod[500] < Diffusion(schedule).alphas_cumprod[500]
