"""What Chen et al. measure beyond FID: the IP baseline, the condition-embedding distance, the guidance sweep, RMD,
nearest-neighbour L2, memorization ratio, sample entropy. Each measure against a hand computation."""
import json
import math
import os
import types

import numpy as np
import pytest
import torch

import evaluate
import model
import sample
import train
from diffusion import Diffusion  # noqa: E402
from ext import gmm  # noqa: E402
from ext import measures  # noqa: E402

TINY = ["--preset", "tiny", "--batch-size", "8", "--warmup", "1", "--grid-steps", "1"]


def test_input_perturbation_moves_the_input_and_keeps_the_target():
    diffusion, seen = Diffusion(), []
    net = lambda x, t, c, **inputs: seen.append(x) or torch.zeros_like(x)  # a network that outputs 0
    g = torch.Generator().manual_seed(0)
    x0, noise, xi = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 900])
    loss = diffusion.loss(net, x0, None, t, noise, ip=0.1 * xi)
    torch.testing.assert_close(seen[0], diffusion.q_sample(x0, t, noise + 0.1 * xi))  # Ning et al.: eps + gamma xi
    torch.testing.assert_close(loss, noise.pow(2).flatten(1).mean(1))  # the target is the unperturbed noise


def test_input_perturbation_is_one_more_draw_and_changes_no_other(shapes16):
    draws = {}
    for ip in ("0", "0.1"):
        cfg = train.resolve_config(train.parse_args(["--data", f"{shapes16}/train", *TINY, "--ip-gamma", ip]), 1)
        data = train.load_data(cfg, torch.device("cpu"))
        net = model.Denoiser(**train.model_config(cfg, data, None)[0])
        draws[ip] = train.draw_step(3, cfg, data, net, torch.device("cpu"))
    assert draws["0"].ip is None and all(torch.equal(torch.as_tensor(getattr(draws["0"], k)), torch.as_tensor(v))
                                         for k, v in vars(draws["0.1"]).items() if k != "ip" and v is not None)
    assert draws["0.1"].ip.std().item() == pytest.approx(0.1, rel=0.15)
    assert cfg.out.endswith("-ip0.1")


def test_condition_embedding_distance_by_hand():
    net = types.SimpleNamespace(label_embed=types.SimpleNamespace(embed=torch.nn.Embedding(3, 2)))
    with torch.no_grad():
        net.label_embed.embed.weight.copy_(torch.tensor([[0.0, 0.0], [3.0, 4.0], [9.0, 9.0]]))
    data = types.SimpleNamespace(fixed_ids=np.array([1, 1, 0]), corruption=dict(clean_labels=np.array([0, 0, 0])))
    d = train.cond_l2(net, data, "class", "none", 1.0, seed=0, n=3000)
    assert d == pytest.approx(5 * (2 / 3), rel=0.05)  # two rows of three flipped 0 -> 1: distance 5, one row 0
    d = train.cond_l2(net, types.SimpleNamespace(fixed_ids=np.zeros(4, int), corruption=dict(
        clean_labels=np.zeros(4, int))), "class", "uniform", 1.0, seed=0, n=20000)
    # CEP-U alone: delta ~ U(-1/sqrt 2, 1/sqrt 2)^2, E|delta| by numerical integration of the square's mean norm
    u = (np.random.default_rng(0).uniform(-1, 1, (200000, 2)) / math.sqrt(2))
    assert d == pytest.approx(np.linalg.norm(u, axis=1).mean(), rel=0.02)
    assert train.cond_l2(net, data, "text", "none", 1.0, 0) is None


def test_relative_mahalanobis_by_hand():
    ref, labels = np.array([[0.0], [2.0], [4.0], [6.0]]), np.array([0, 0, 1, 1])
    # class means 1 and 5, within-class variance 1; all: mean 3, variance 5
    got = measures.relative_mahalanobis(np.array([[1.0], [5.0], [5.0]]), np.array([0, 0, 1]), ref, labels)
    np.testing.assert_allclose(got, [0 - 4 / 5, 16 - 4 / 5, 0 - 4 / 5])


def test_code_entropy_and_nearest_l2_by_hand():
    assert measures.code_entropy([0, 0, 1, 1], 64) == pytest.approx(math.log(2))
    assert measures.code_entropy(np.zeros((2, 3), np.int64), 8) == 0.0
    assert measures.code_entropy(np.arange(8), 8) == pytest.approx(math.log(8))
    ref = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    got = measures.nearest_l2(torch.tensor([[0.0, 0.0], [3.0, 0.0]]), ref, k=2)
    torch.testing.assert_close(got, torch.tensor([[0.0, 1.0], [math.sqrt(9 + 1), math.sqrt(9)]]).sort(1).values)


def test_diversity_of_copied_training_images_with_a_vq_entropy(shapes16, tmp_path):
    from tiny_vae import make_autoencoder
    pytest.importorskip("diffusers")
    shapes = shapes16  # 16x16: pixel features of 768 dimensions, whose covariances are inverted
    train_images, labels = np.load(f"{shapes}/train/images.npy"), np.load(f"{shapes}/train/labels.npy")
    np.savez(tmp_path / "samples.npz", arr_0=train_images[:50], arr_1=labels[:50])
    make_autoencoder("vq", str(tmp_path / "vq"))
    r = evaluate.main(["diversity", "--samples", str(tmp_path / "samples.npz"), "--ref", f"{shapes}/train",
                       "--features", "pixels", "--vq", str(tmp_path / "vq")])
    assert r["memorization_ratio"] == 1.0 and r["nn5_l2"] > 0  # each is its own nearest neighbour; the next 4 not
    codes, n = measures.vq_codes(str(tmp_path / "vq"), train_images[:50], torch.device("cpu"))
    assert r["entropy"] == pytest.approx(measures.code_entropy(codes, n)) and 0 < r["entropy"] <= math.log(n)
    assert len(r["rmd_density"]) == 20 and r["rmd_top1"] >= r["rmd_mean"]
    assert json.load(open(tmp_path / "diversity.json"))["features"] == "pixels"
    with pytest.raises(ValueError, match="is not a VQModel"):
        make_autoencoder("kl", str(tmp_path / "kl"))
        evaluate.main(["diversity", "--samples", str(tmp_path / "samples.npz"), "--ref", f"{shapes}/train",
                       "--features", "pixels", "--vq", str(tmp_path / "kl"), "--out", str(tmp_path / "x.json")])


class MeanStd(torch.nn.Module):
    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


@pytest.mark.slow
def test_a_guidance_sweep_writes_a_file_per_scale_scored_and_plotted(tiny_run, shapes, inception_weights, tmp_path):
    out = str(tmp_path / "samples.npz")
    common = ["--ckpt", tiny_run, "--num", "6", "--steps", "2", "--batch", "4", "--device", "cpu"]
    sample.main(common + ["--cfg-scale", "1,2.5", "--out", out])
    sweep = [str(tmp_path / "samples-cfg1.npz"), str(tmp_path / "samples-cfg2.5.npz")]
    sample.main(common + ["--cfg-scale", "2.5", "--out", str(tmp_path / "single.npz")])
    assert np.array_equal(np.load(sweep[1])["arr_0"], np.load(tmp_path / "single.npz")["arr_0"])  # same as alone
    assert not np.array_equal(np.load(sweep[0])["arr_0"], np.load(sweep[1])["arr_0"])
    with pytest.raises(ValueError, match="samples-cfg1.npz exists"):  # the same files from other settings
        sample.main(common + ["--cfg-scale", "1,2.5", "--out", out, "--steps", "3"])
    with pytest.raises(ValueError, match=r"--cfg-scale must be in \[0, inf\), got -1"):
        sample.main(common + ["--cfg-scale", "1,-1", "--out", str(tmp_path / "bad.npz")])
    evaluate.main(["--samples", *sweep, "--ref", f"{shapes}/test", "--inception-weights", inception_weights,
                   "--allow-small", "--batch", "50"])
    scored = {json.load(open(tmp_path / f))["settings"]["cfg_scale"] for f in ("metrics-cfg1.json",
                                                                              "metrics-cfg2.5.json")}
    assert scored == {1.0, 2.5}
    from tiny_vae import make_autoencoder
    pytest.importorskip("diffusers")
    make_autoencoder("vq", str(tmp_path / "vq"))
    feat = str(tmp_path / "feat.pt")  # a 6-dimensional TorchScript feature (channel means and stds): fast to invert
    torch.jit.save(torch.jit.script(MeanStd()), feat)
    for f in sweep:  # Fig. 4's measures of the same files: diversity-cfg1.json ...
        evaluate.main(["diversity", "--samples", f, "--ref", f"{shapes}/train", "--features", feat, "--feat-size",
                       "32", "--feat-norm", "none", "--vq", str(tmp_path / "vq")])
    rows = evaluate.main(["report", str(tmp_path), "--out", str(tmp_path / "report")])
    assert sorted(r["cfg"] for r in rows) == [1.0, 2.5] and all(r["entropy"] > 0 for r in rows)
    for png in ("report-guidance.png", "report-rmd.png", "report-entropy.png"):
        assert os.path.isfile(tmp_path / png), png
    assert "| top-1% RMD | NN L2 | mem. ratio | TopPR F1 | entropy |" in open(tmp_path / "report.md").read()


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP (transformers) built from a config, with a character-level tokenizer: offline."""
    transformers = pytest.importorskip("transformers")
    import string
    path = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    transformers.CLIPModel(transformers.CLIPConfig(
        text_config=dict(small, vocab_size=60, max_position_embeddings=32),
        vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)).save_pretrained(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in list(string.ascii_lowercase) + [c + "</w>" for c in string.ascii_lowercase]:
        vocab[c] = len(vocab)
    json.dump(vocab, open(path / "vocab.json", "w"))
    (path / "merges.txt").write_text("#version: 0.2\n")
    transformers.CLIPTokenizer(vocab_file=str(path / "vocab.json"), merges_file=str(path / "merges.txt")) \
        .save_pretrained(path)
    return str(path)


def test_clip_features_and_clip_score_by_hand(tiny_clip, shapes16, tmp_path):
    import transformers
    net = transformers.CLIPModel.from_pretrained(tiny_clip).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tiny_clip)
    images = np.load(f"{shapes16}/train/images.npy")[:6]
    captions = np.array([json.loads(l)[0] for l in open(f"{shapes16}/train/captions.jsonl")][:6])
    np.savez(tmp_path / "samples.npz", arr_0=images, captions=captions)
    r = evaluate.main(["clipscore", "--samples", str(tmp_path / "samples.npz"), "--clip", tiny_clip])
    with torch.no_grad():  # by hand: CLIP's preprocessing, both embeddings, 100 max(cos, 0)
        x = torch.nn.functional.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, size=(32, 32),
                                            mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        x = (x - torch.tensor(measures.CLIP_MEAN)[:, None, None]) / torch.tensor(measures.CLIP_STD)[:, None, None]
        i = measures.embeds(net.get_image_features(pixel_values=x))
        t = measures.embeds(net.get_text_features(**tok(list(captions), padding=True, return_tensors="pt")))
    want = (100 * torch.cosine_similarity(i, t).clamp_min(0)).mean().item()
    assert r["clip_score"] == pytest.approx(want, rel=1e-4)
    np.savez(tmp_path / "labels.npz", arr_0=images, arr_1=np.load(f"{shapes16}/train/labels.npy")[:6])
    d = evaluate.main(["diversity", "--samples", str(tmp_path / "labels.npz"), "--ref", f"{shapes16}/train",
                       "--features", f"clip:{tiny_clip}"])
    assert d["memorization_ratio"] == 1.0 and d["features"] == f"clip:{tiny_clip}"  # copies: nearest L2 0


def test_missing_transformers_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8), captions=np.array(["a", "b"]))
    with pytest.raises(ValueError, match="CLIP needs transformers: pip install -r requirements-clip.txt"):
        evaluate.main(["clipscore", "--samples", str(tmp_path / "s.npz"), "--clip", "x"])


# ----------------------------------------------------------------------------- Sec. 4: the Gaussian mixture

def test_w2_and_entropy_of_gaussians_by_hand():
    one = lambda v: np.array([[v]])
    assert gmm.w2_gaussian(np.zeros(1), one(1.0), np.ones(1), one(4.0)) == pytest.approx(2.0)  # 1 + (1 - 2)^2
    c = np.diag([1.0, 9.0])  # independent coordinates: the squared distances add up
    assert gmm.w2_gaussian(np.zeros(2), c, np.array([3.0, 0]), np.eye(2)) == pytest.approx(9 + 0 + 4)
    assert gmm.gaussian_entropy(one(1.0)) == pytest.approx(0.5 * math.log(2 * math.pi * math.e))
    assert gmm.gaussian_entropy(c) - gmm.gaussian_entropy(np.eye(2)) == pytest.approx(math.log(3))


def test_the_simulated_linear_model_generates_the_closed_forms():
    rng, times = np.random.default_rng(0), np.geomspace(8, 1e-3, 800)
    mu = 2 * rng.standard_normal(3)
    x0 = mu + rng.standard_normal((40, 3))
    m, s = x0.mean(0), np.cov(x0.T, bias=True)
    made = lambda g: gmm.generated_gaussian(*gmm.fit_denoiser(x0, np.exp(-times), g), times)
    mean, cov = made(0.0)  # App. A Lemma 3: clean training generates the empirical Gaussian
    np.testing.assert_allclose(mean, m, atol=1e-3)
    np.testing.assert_allclose(cov, s, atol=1e-2)
    (fit_mean, fit_cov), (lemma_mean, lemma_cov) = gmm.gmm_forms(m, s, 0.5)
    mean_g, cov_g = made(0.5)
    np.testing.assert_allclose(mean_g, m / 1.25, atol=1e-3)  # mu_hat / (1 + gamma^2), as Lemma 4
    np.testing.assert_allclose(fit_mean, lemma_mean)
    np.testing.assert_allclose(cov_g - cov, fit_cov - s, rtol=1e-2, atol=1e-3)  # the extra covariance: 0.2 m m^T
    extra = np.linalg.eigvalsh(cov_g - cov)  # rank one along m, not Lemma 4's |m|^2 I (equal along m only)
    assert extra[-1] == pytest.approx(0.2 * m @ m, rel=1e-2) and abs(extra[:-1]).max() < 1e-2
    u = m / np.linalg.norm(m)
    assert u @ (lemma_cov - s) @ u == pytest.approx(u @ (fit_cov - s) @ u)
    assert np.trace(lemma_cov - s) == pytest.approx(3 * np.trace(fit_cov - s))


def test_gmm_command_measures_the_gains_it_predicts(tmp_path):
    rows = evaluate.main(["gmm", "--dims", "2,8", "--gammas", "0.05,0.5", "--trials", "3", "--steps", "300",
                          "--out", str(tmp_path / "gmm")])
    assert [(r["d"], r["gamma"]) for r in rows] == [(2, 0.05), (2, 0.5), (8, 0.05), (8, 0.5)]
    for r in rows:
        assert r["entropy_gain"] > 0 and r["entropy_gain"] == pytest.approx(r["entropy_gain_fit"], rel=0.05)
        assert r["w2_gain"] == pytest.approx(r["w2_gain_fit"], rel=0.15, abs=2e-3)
    assert rows[3]["w2_gain"] < 0  # gamma 0.5 >> 1/sqrt(n_k): the gain has turned into a loss
    assert json.load(open(tmp_path / "gmm.json"))["rows"][0]["d"] == 2 and (tmp_path / "gmm.png").stat().st_size


def test_toppr_kde_and_bandwidth_by_hand():
    kde = measures.cosine_kde(torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [3.5]]), 2.0)
    assert kde[0, 0].item() == pytest.approx(0.5 * math.pi / 8 * (1 + math.cos(math.pi / 4)))  # 1 is within h
    assert kde[1, 0].item() == 0  # 3.5 is farther than h from both
    pts = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])  # nearest later point: 1, 2, 3, 4 -> the median's 2
    assert measures.balloon_bandwidth(pts, 1) == pytest.approx(2.0)


def test_toppr_on_sets_with_known_overlap():
    g = torch.Generator().manual_seed(0)
    real, same, far = (torch.randn(400, 8, generator=g) + shift for shift in (0, 0, 8))
    assert min(measures.top_pr(real, same)) > 0.85
    assert measures.top_pr(real, far) == (0.0, 0.0, 0.0)
    precision, recall, f1 = measures.top_pr(real, torch.cat([same[:200], far[:200]]))  # half the fakes off-support
    assert 0.4 < precision < 0.6 and recall > 0.9 and f1 == pytest.approx(2 * precision * recall / (precision + recall))
    with pytest.raises(ValueError, match="more than 40 samples"):
        measures.top_pr(real[:40], same)


def test_toppr_projects_wide_features_as_its_authors_do():
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g) + 0.3
    proj = torch.nn.Linear(64, 32, bias=False)
    torch.manual_seed(99)  # Kim et al.'s top_pr: torch.manual_seed(99), then xavier_normal_ on the projection
    torch.nn.init.xavier_normal_(proj.weight)
    with torch.no_grad():
        assert measures.top_pr(real, fake) == measures.top_pr(proj(real), proj(fake))
