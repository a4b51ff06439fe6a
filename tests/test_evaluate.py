import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import torch

import evaluate
from ext import measures  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_samples(path, images, labels=None):
    np.savez(path, arr_0=images, arr_1=np.zeros(len(images), np.int64) if labels is None else labels)
    return str(path)


def cli(*args):
    return subprocess.run([sys.executable, f"{ROOT}/evaluate.py", *map(str, args)], capture_output=True, text=True)


def test_inception_layout_matches_the_published_weight_file():
    sd = evaluate.FIDInception().state_dict()
    tensors = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    assert len(tensors) == 472  # the tensors of pt_inception-2015-12-05-6726825d.pth
    assert sd["fc.weight"].shape == (1008, 2048) and sd["fc.bias"].shape == (1008,)
    assert sd["Conv2d_1a_3x3.conv.weight"].shape == (32, 3, 3, 3)
    assert sd["Mixed_7c.branch3x3dbl_3b.conv.weight"].shape == (384, 384, 3, 1)
    assert sd["Mixed_6e.branch7x7dbl_5.bn.running_var"].shape == (192,)
    assert not any("AuxLogits" in k or k.endswith(".conv.bias") for k in sd)
    bn = evaluate.FIDInception().Mixed_5b.branch1x1.bn
    assert bn.eps == 1e-3


def test_feature_shapes_and_input_range(inception_weights):
    net, sha = evaluate.load_inception(inception_weights, "cpu")
    assert len(sha) == 64 and not sha.startswith(evaluate.WEIGHTS_SHA_PREFIX)
    images = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    f = evaluate.inception_features(net, images, batch=2)
    assert f["pool"].shape == (3, 2048) and f["logits"].shape == (3, 1008) and f["spatial"].shape == (3, 2023)
    assert f["pool"].dtype == np.float64 and np.all(f["pool"] >= 0)  # after ReLU and the average pool
    gray = evaluate.inception_features(net, images[..., :1], batch=3)  # one channel is repeated to three
    same = evaluate.inception_features(net, np.repeat(images[..., :1], 3, -1), batch=3)
    np.testing.assert_allclose(gray["pool"], same["pool"], rtol=1e-5, atol=1e-6 * same["pool"].max())
    assert np.abs(f["pool"][0] - f["pool"][1]).max() > 1e-3 * f["pool"].max()  # features depend on the image


def test_wrong_weight_files(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="not the FID Inception weight file"):
        evaluate.load_inception(str(tmp_path / "w.pth"), "cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate.load_inception(str(tmp_path / "none.pth"), "cpu")


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(500, 32)), rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32)) * 0.3 + 0.2
    mu1, s1 = evaluate.mean_cov(a)
    mu2, s2 = evaluate.mean_cov(b)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    want = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
    assert evaluate.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)
    assert evaluate.frechet_distance(mu1, s1, mu1 + 2, s1) == pytest.approx(4 * 32, rel=1e-8)


def test_frechet_distance_of_rank_deficient_covariances_is_finite():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))  # fewer samples than dimensions
    fid = evaluate.frechet_distance(*evaluate.mean_cov(a), *evaluate.mean_cov(b))
    assert np.isfinite(fid) and fid > 0


def test_inception_score_limits():
    assert evaluate.inception_score(np.zeros((100, 10)))[0] == pytest.approx(1.0)
    confident = np.full((100, 10), -50.0)
    confident[np.arange(100), np.arange(100) % 10] = 50
    mean, std = evaluate.inception_score(confident)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0, abs=1e-6)


def brute_force_precision_recall(real, fake, k=3):
    d = lambda x, y: ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    radii = lambda x: np.sort(d(x, x), axis=1)[:, k]
    precision = np.mean([(d(f[None], real)[0] <= radii(real)).any() for f in fake])
    recall = np.mean([(d(r[None], fake)[0] <= radii(fake)).any() for r in real])
    return precision, recall


def test_precision_recall_matches_brute_force():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(300, 8))
    fake = rng.normal(size=(250, 8)) * 1.3 + 0.4
    got = evaluate.precision_recall(real, fake, device="cpu")
    want = brute_force_precision_recall(real, fake)
    assert got == pytest.approx(want, abs=1e-9)
    assert 0 < want[0] < 1 and 0 < want[1] < 1
    small_batches = (evaluate.coverage(torch.tensor(fake, dtype=torch.float32), torch.tensor(real, dtype=torch.float32),
                                       evaluate.knn_radii(torch.tensor(real, dtype=torch.float32), batch=7), batch=11))
    assert small_batches == pytest.approx(want[0], abs=1e-9)


@pytest.mark.slow
def test_metrics_end_to_end_with_cache(shapes, inception_weights, tmp_path):
    images = np.load(f"{shapes}/train/images.npy")[:8]
    samples = write_samples(tmp_path / "samples.npz", images)
    with pytest.raises(ValueError, match="pass --allow-small") as e:  # the CLI prints it as one line
        evaluate.main(["--samples", samples, "--ref", f"{shapes}/test", "--inception-weights", inception_weights])
    assert "\n" not in str(e.value)
    m = evaluate.main(["--samples", samples, "--ref", f"{shapes}/test", "--inception-weights", inception_weights,
                       "--allow-small", "--batch", "16", "--save-features", str(tmp_path / "f.npz")])
    saved = json.load(open(tmp_path / "metrics.json"))
    assert saved["fid"] == pytest.approx(m["fid"]) and saved["small"] and not saved["standard_weights"]
    for k in ("fid", "sfid", "is_mean", "is_std", "precision", "recall"):
        assert np.isfinite(saved[k]), k
    assert saved["num_samples"] == 8 and saved["num_ref"] == 24
    assert np.load(tmp_path / "f.npz")["pool"].shape == (8, 2048)
    cache = [f for f in os.listdir(f"{shapes}/test") if f.startswith("inception-")]
    assert len(cache) == 1
    mtime = os.path.getmtime(f"{shapes}/test/{cache[0]}")
    again = evaluate.main(["--samples", samples, "--ref", f"{shapes}/test", "--inception-weights", inception_weights,
                           "--allow-small", "--out", str(tmp_path / "m2.json")])
    assert os.path.getmtime(f"{shapes}/test/{cache[0]}") == mtime and again["fid"] == pytest.approx(m["fid"])
    # a pytorch-fid statistics file is accepted as --ref (FID only)
    z = np.load(f"{shapes}/test/{cache[0]}")
    np.savez(tmp_path / "stats.npz", mu=z["mu"], sigma=z["sigma"])
    only = evaluate.main(["--samples", samples, "--ref", str(tmp_path / "stats.npz"), "--inception-weights",
                          inception_weights, "--allow-small", "--out", str(tmp_path / "m3.json")])
    assert only["fid"] == pytest.approx(m["fid"], rel=1e-6) and "precision" not in only


@pytest.mark.slow
def test_fid_of_a_set_against_itself_is_zero(shapes, inception_weights, tmp_path):
    images = np.load(f"{shapes}/test/images.npy")[:20]
    np.savez(tmp_path / "ref.npz", arr_0=images)  # an ADM-style reference batch
    m = evaluate.main(["--samples", write_samples(tmp_path / "s.npz", images), "--ref", str(tmp_path / "ref.npz"),
                       "--inception-weights", inception_weights, "--allow-small"])
    cache = np.load([str(p) for p in tmp_path.iterdir() if ".inception-" in p.name][0])
    assert abs(m["fid"]) < 1e-6 * np.trace(cache["sigma"])  # 0 up to round-off (20 images: rank-deficient)
    assert m["precision"] == 1.0 and m["recall"] == 1.0


@pytest.mark.parametrize("case", ["missing", "garbled", "float", "shape", "resolution"])
def test_bad_sample_files(shapes, inception_weights, tmp_path, case):
    path = tmp_path / "s.npz"
    if case == "garbled":
        path.write_bytes(b"PK\x03\x04 not really a zip")
    elif case == "float":
        np.savez(path, arr_0=np.zeros((4, 32, 32, 3), np.float32))
    elif case == "shape":
        np.savez(path, arr_0=np.zeros((4, 32, 32), np.uint8))
    elif case == "resolution":
        np.savez(path, arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    r = cli("--samples", path, "--ref", f"{shapes}/test", "--inception-weights", inception_weights, "--allow-small")
    assert r.returncode == 1 and r.stderr.startswith("evaluate.py: error:") and r.stderr.count("\n") == 1, r.stderr
    want = {"missing": "not found", "garbled": "cannot read", "float": "must be uint8", "shape": "must be uint8",
            "resolution": "16x16"}[case]
    assert want in r.stderr


def test_missing_weights_say_where_to_put_them(tmp_path):
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    code = ("import urllib.request, evaluate\n"
            "def offline(*a, **k): raise OSError('no network')\n"
            "urllib.request.urlopen = offline\n"
            "evaluate.weights_path(None)\n")
    r = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r})\n" + code], env=env,
                       capture_output=True, text=True)
    assert "pt_inception-2015-12-05-6726825d.pth" in r.stderr and str(tmp_path) in r.stderr


def scripted_features(tmp_path):
    class Tiny(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    path = str(tmp_path / "feat.pt")
    torch.jit.save(torch.jit.script(Tiny()), path)
    return path


def test_repro_score(inception_weights, tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    b = a.copy()
    b[3:] = 200  # flat images: far from the originals in (mean, std) feature space
    pa, pb = write_samples(tmp_path / "a.npz", a), write_samples(tmp_path / "b.npz", b)
    same = evaluate.main(["repro", pa, pa, "--inception-weights", inception_weights])
    assert same["rp_score"] == 1.0 and same["mean_similarity"] == pytest.approx(1.0)
    feat = scripted_features(tmp_path)
    r = evaluate.main(["repro", pa, pb, "--features", feat, "--feat-size", "16", "--feat-norm", "none",
                       "--threshold", "0.999", "--out", str(tmp_path / "r.json")])
    assert r["rp_score"] == 0.5 and json.load(open(tmp_path / "r.json"))["num"] == 6
    short = write_samples(tmp_path / "c.npz", a[:4])
    bad = cli("repro", pa, short, "--inception-weights", inception_weights)
    assert bad.returncode == 1 and "has 6 samples" in bad.stderr and bad.stderr.count("\n") == 1


def test_memorization_of_copied_training_images(shapes, tmp_path):
    train = np.load(f"{shapes}/train/images.npy")
    feat = scripted_features(tmp_path)
    copies = write_samples(tmp_path / "copies.npz", train[:10])
    m = evaluate.main(["memorization", "--samples", copies, "--ref", f"{shapes}/train", "--features", feat,
                       "--feat-size", "32", "--feat-norm", "none", "--threshold", "0.9999"])
    assert m["memorized_fraction"] == 1.0 and m["generalization_score"] == 0.0
    noise = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    m = evaluate.main(["memorization", "--samples", write_samples(tmp_path / "noise.npz", noise), "--ref",
                       f"{shapes}/train", "--features", feat, "--feat-size", "32", "--feat-norm", "none",
                       "--threshold", "0.9999"])
    assert m["memorized_fraction"] == 0.0 and json.load(open(tmp_path / "memorization.json"))["num_train"] == 200


def test_report_table_and_plot(tmp_path):
    runs = []
    for eta, cep, fid in [(0.0, "none", 5.0), (0.05, "none", 4.5), (0.1, "none", 4.8), (0.0, "uniform", 4.2),
                          (0.05, "uniform", 4.0)]:
        d = tmp_path / f"run-{eta}-{cep}"
        d.mkdir()
        cfg = dict(train=dict(eta=eta, corruption="symmetric", corruption_mode="fixed", cep=cep, cep_gamma=1.0))
        json.dump(cfg, open(d / "config.json", "w"))
        json.dump(dict(fid=fid, sfid=fid + 1, is_mean=9.0 - fid, is_std=0.1, precision=0.6, recall=0.5,
                       num_samples=50000, settings=dict(cfg_scale=1.5)), open(d / "metrics.json", "w"))
        runs.append(str(d))
    (tmp_path / "empty").mkdir()
    rows = evaluate.main(["report", *runs, str(tmp_path / "empty"), "--out", str(tmp_path / "rep")])
    assert [(r["cep"], r["eta"]) for r in rows] == [("none", 0.0), ("none", 0.05), ("none", 0.1), ("uniform", 0.0),
                                                    ("uniform", 0.05)]
    table = open(tmp_path / "rep.md").read()
    assert table.count("\n") == 7 and "| 5 | symmetric/fixed | uniform (gamma 1) | - | 1.5 | 50000 | 4.00 |" in table
    from PIL import Image
    img = Image.open(tmp_path / "rep.png")
    assert img.size[0] == 840 and len(np.unique(np.asarray(img).reshape(-1, 3), axis=0)) > 4  # drawn, not blank
    r = cli("report", str(tmp_path / "empty"), "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and "no run folder with a metrics.json" in r.stderr


def test_memorization_with_inception_features_uses_the_dataset_cache(shapes, inception_weights, tmp_path):
    ref = f"{shapes}/test"
    copies = write_samples(tmp_path / "copies.npz", np.load(f"{ref}/images.npy")[5:9])
    m = evaluate.main(["memorization", "--samples", copies, "--ref", ref, "--inception-weights", inception_weights,
                       "--threshold", "0.9999"])
    assert m["memorized_fraction"] == 1.0 and m["num_train"] == 24
    cache = [f for f in os.listdir(ref) if f.startswith("inception-")]
    assert len(cache) == 1  # the training set's features were computed once and kept beside it


def test_intended_classes_from_labels_or_captions():
    names = ["red disk", "red square", "blue disk"]
    assert measures.intended_classes(np.array([2, 0]), names).tolist() == [2, 0]
    caps = np.array(["a small red disk on the left", "Blue disk", "a red thing", "red disk, red square"])
    assert measures.intended_classes(caps, names).tolist() == [0, 2, -1, -1]


def colour_dataset(root, n=400):
    """Two trivially separable classes (reddish / bluish noise) at 32x32: the classifier judges them right."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    images = rng.integers(0, 120, (n, 32, 32, 3), dtype=np.uint8)
    images[labels == 0, ..., 0] += 120
    images[labels == 1, ..., 2] += 120
    os.makedirs(root)
    np.save(os.path.join(root, "images.npy"), images)
    np.save(os.path.join(root, "labels.npy"), labels)
    json.dump(dict(num_classes=2, class_names=["red", "blue"], resolution=32, channels=3, count=n),
              open(os.path.join(root, "meta.json"), "w"))
    return images, labels


def test_classify_reads_conditioning_accuracy(tmp_path):
    images, labels = colour_dataset(str(tmp_path / "ref"))
    caps = np.array([f"a {'red' if y == 0 else 'blue'} image" for y in labels[:40]])
    np.savez(tmp_path / "right.npz", arr_0=images[:40], captions=caps)
    r = evaluate.main(["classify", "--samples", str(tmp_path / "right.npz"), "--ref", str(tmp_path / "ref"),
                       "--epochs", "2"])
    assert r["classifier_heldout_accuracy"] == 1.0 and r["accuracy"] == 1.0 and r["judged"] == 40
    wrong = np.where(caps == "a red image", "a blue image", "a red image")
    wrong[:4] = "an image"  # names no class: not judged
    np.savez(tmp_path / "wrong.npz", arr_0=images[:40], captions=wrong)
    r = evaluate.main(["classify", "--samples", str(tmp_path / "wrong.npz"), "--ref", str(tmp_path / "ref"),
                       "--epochs", "2", "--out", str(tmp_path / "w.json")])
    assert r["accuracy"] == 0.0 and r["judged"] == 36 and json.load(open(tmp_path / "w.json"))["num_samples"] == 40
    np.savez(tmp_path / "labels.npz", arr_0=images[:10], arr_1=labels[:10])  # class-conditional samples
    assert evaluate.main(["classify", "--samples", str(tmp_path / "labels.npz"), "--ref", str(tmp_path / "ref"),
                          "--epochs", "2"])["accuracy"] == 1.0


def test_report_shows_text_runs_beside_class_runs(tmp_path):
    runs = []
    for cond, corruption in [("class", "symmetric"), ("text", "swap")]:
        d = tmp_path / cond
        d.mkdir()
        cfg = dict(train=dict(cond=cond, eta=0.05, corruption=corruption, corruption_mode="fixed", cep="none",
                              cep_gamma=1.0))
        json.dump(dict(fid=5.0, is_mean=3.0, num_samples=50000, settings=dict(cfg_scale=2.0, config=cfg)),
                  open(d / "metrics.json", "w"))
        runs.append(str(d))
    evaluate.main(["report", *runs, "--out", str(tmp_path / "rep")])
    table = open(tmp_path / "rep.md").read()
    assert "| class | class | - | 5 | symmetric/fixed |" in table and "| text | text | - | 5 | swap/fixed |" in table


def test_repro_matrix_of_several_sample_sets_with_pixel_features(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    b, c = a.copy(), rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    b[:2] = 255 - b[:2]  # two of eight pairs differ (negative pixel correlation)
    paths = [write_samples(tmp_path / f"{n}.npz", x) for n, x in [("a", a), ("b", b), ("c", c)]]
    r = evaluate.main(["repro", *paths, "--features", "pixels", "--out", str(tmp_path / "r.json")])
    m = np.array(r["rp_matrix"])
    assert m.shape == (3, 3) and np.allclose(m, m.T) and np.all(np.diag(m) == 1)
    assert m[0, 1] == 0.75 and m[0, 2] == 0.0 and r["features"] == "pixels"  # unrelated noise images: ~0 correlation
    printed = capsys.readouterr().out
    assert "features: pixels" in printed and printed.count("\n  [") == 3
    assert json.load(open(tmp_path / "r.json"))["rp_score"] == 0.75


def test_memorization_against_the_images_a_run_trained_on(shapes, tmp_path):
    import train
    run = tmp_path / "run"
    train.main(["--data", f"{shapes}/train", "--out", str(run), "--preset", "tiny", "--subset", "16", "--steps", "1",
                "--batch-size", "4", "--grid-steps", "1"])
    index = np.load(run / "corruption.npz")["index"]
    images = np.load(f"{shapes}/train/images.npy")
    inside = write_samples(tmp_path / "in.npz", images[index[:4]])
    outside = write_samples(tmp_path / "out.npz", images[np.setdiff1d(np.arange(200), index)[:4]])
    common = ["--ref", str(run), "--features", "pixels", "--threshold", "0.9999"]
    m = evaluate.main(["memorization", "--samples", inside, *common])
    assert m["memorized_fraction"] == 1.0 and m["num_train"] == 16 and m["features"] == "pixels"
    assert evaluate.main(["memorization", "--samples", outside, *common])["memorized_fraction"] == 0.0
    whole = evaluate.main(["memorization", "--samples", outside, "--ref", f"{shapes}/train", "--features", "pixels",
                           "--threshold", "0.9999"])
    assert whole["memorized_fraction"] == 1.0 and whole["num_train"] == 200  # the whole set holds them


def test_report_draws_the_study(tmp_path):
    runs = []
    for n, width, seed, gl, rp in [(64, 32, 0, 0.0, 0.9), (64, 32, 1, 0.1, None), (1024, 32, 0, 0.8, 0.3),
                                   (64, 64, 0, 0.05, 0.8), (1024, 64, 0, 0.7, 0.4)]:
        d = tmp_path / f"n{n}-w{width}-s{seed}"
        d.mkdir()
        json.dump(dict(train=dict(subset=n, seed=seed), model=dict(preset="tiny", ch=width), data=dict(count=200)),
                  open(d / "config.json", "w"))
        json.dump(dict(generalization_score=gl, features="pixels"), open(d / "memorization.json", "w"))
        if rp is not None:
            json.dump(dict(rp_score=rp), open(d / "repro.json", "w"))
        runs.append(str(d))
    rows = evaluate.main(["report", *runs, "--out", str(tmp_path / "rep")])
    assert [(r["images"], r["width"], r["seed"]) for r in rows][:3] == [(64, 32, 0), (64, 32, 1), (1024, 32, 0)]
    table = open(tmp_path / "rep.md").read()
    assert "| n64-w32-s1 | 64 | 32 | 1 | - | 0.100 | pixels |" in table and not os.path.exists(tmp_path / "rep.png")
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "rep-study.png"))
    assert img.shape[1] == 840 and len(np.unique(img.reshape(-1, 3), axis=0)) > 4
