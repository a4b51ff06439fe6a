import numpy as np
import pytest

import corrupt
import plumbing


def imbalanced_labels(n=20000, seed=0):
    prior = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    return np.random.default_rng(seed).choice(5, size=n, p=prior), prior


@pytest.mark.parametrize("eta", [0.0, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.999])
def test_symmetric_flips_exactly_round_eta_n(eta):
    labels = np.random.default_rng(1).integers(0, 10, 1001)
    new, mask = corrupt.corrupt_labels(labels, eta, 10, seed=3)
    assert mask.sum() == round(eta * 1001)
    assert np.all(new[mask] != labels[mask])  # a flipped label is always another class
    assert np.array_equal(new[~mask], labels[~mask])
    assert new.dtype == np.int64 and new.min() >= 0 and new.max() < 10


def test_flip_targets_follow_the_restricted_class_prior():
    labels, prior = imbalanced_labels()
    new, mask = corrupt.corrupt_labels(labels, 0.5, 5, seed=0)
    src = labels[mask] == 0  # samples of class 0 go to 1..4 in proportion to prior[1:]
    got = np.bincount(new[mask][src], minlength=5) / src.sum()
    want = np.r_[0, prior[1:] / prior[1:].sum()]
    assert got[0] == 0
    np.testing.assert_allclose(got, want, atol=0.03)


def test_same_seed_same_corruption_other_seed_differs():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    a = corrupt.corrupt_labels(labels, 0.1, 10, seed=7)
    b = corrupt.corrupt_labels(labels, 0.1, 10, seed=7)
    c = corrupt.corrupt_labels(labels, 0.1, 10, seed=8)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


def test_resample_mode_draws_a_new_corruption_each_epoch():
    labels = np.random.default_rng(0).integers(0, 10, 5000)
    e0 = corrupt.corrupt_labels(labels, 0.1, 10, seed=7, epoch=0)
    e1 = corrupt.corrupt_labels(labels, 0.1, 10, seed=7, epoch=1)
    assert e0[1].sum() == e1[1].sum() == 500
    assert not np.array_equal(e0[1], e1[1])
    assert np.array_equal(e1[0], corrupt.corrupt_labels(labels, 0.1, 10, seed=7, epoch=1)[0])


def test_asymmetric_flips_only_inside_the_subset():
    labels = np.random.default_rng(0).integers(0, 10, 10000)
    subset = np.array([2, 5, 7])
    new, mask = corrupt.corrupt_labels(labels, 0.2, 10, seed=0, classes=subset)
    inside = np.isin(labels, subset)
    assert mask.sum() == round(0.2 * inside.sum())
    assert not mask[~inside].any()
    assert np.isin(new[mask], subset).all() and np.all(new[mask] != labels[mask])
    assert np.array_equal(new[~mask], labels[~mask])


def test_parse_classes_by_index_and_name():
    names = ["cat", "dog", "car"]
    assert corrupt.parse_classes("0,2", names).tolist() == [0, 2]
    assert corrupt.parse_classes("dog, car", names).tolist() == [1, 2]


@pytest.mark.parametrize("eta", [-0.1, 1.0, 1.5])
def test_eta_out_of_range(eta):
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\)"):
        corrupt.corrupt_labels(np.zeros(10, dtype=np.int64), eta, 10, seed=0)


def test_unknown_class_and_small_subset():
    with pytest.raises(ValueError, match="unknown class 12"):
        corrupt.parse_classes("1,12", ["c"] * 10)
    with pytest.raises(ValueError, match="unknown class 'zebra'"):
        corrupt.parse_classes("cat,zebra", ["cat", "dog"])
    with pytest.raises(ValueError, match="at least two classes"):
        corrupt.parse_classes("3", ["c"] * 10)
    with pytest.raises(ValueError, match="at least two classes"):
        corrupt.corrupt_labels(np.zeros(10, dtype=np.int64), 0.1, 10, seed=0, classes=[0])


def test_cli_writes_labels_and_mask(shapes, tmp_path, capsys):
    out = str(tmp_path / "c.npz")
    corrupt.main(["--data", f"{shapes}/train", "--eta", "0.1", "--out", out])
    z = np.load(out)
    assert z["mask"].sum() == 20 and (z["labels"] != z["clean_labels"]).sum() == 20
    assert "corrupted 20 of 200 labels" in capsys.readouterr().out


@pytest.mark.parametrize("n,eta", [(1000, 0.1), (1001, 0.075), (1000, 0.003), (10, 0.5), (7, 0.999)])
def test_caption_swap_counts_and_no_self_swaps(n, eta):
    source, mask = corrupt.corrupt_captions(n, eta, seed=0)
    k = round(eta * n)
    assert mask.sum() == k and np.all(source[mask] != np.flatnonzero(mask))
    assert np.all(source[~mask] == np.flatnonzero(~mask))
    assert sorted(source.tolist()) == list(range(n))  # a permutation: every caption is used exactly once
    swapped = np.flatnonzero(mask)
    pairs = swapped[source[source[swapped]] == swapped]  # two images that took each other's caption
    assert len(pairs) == (k if k % 2 == 0 else k - 3)  # an odd count leaves one rotation of three
    again = corrupt.corrupt_captions(n, eta, seed=0)[0]
    assert np.array_equal(source, again)
    assert k < 2 or not np.array_equal(source, corrupt.corrupt_captions(n, eta, seed=1)[0])


def test_caption_swap_resample_mode_and_impossible_counts():
    e0, e1 = corrupt.corrupt_captions(500, 0.2, 3, epoch=0)[0], corrupt.corrupt_captions(500, 0.2, 3, epoch=1)[0]
    assert not np.array_equal(e0, e1) and (e0 != np.arange(500)).sum() == (e1 != np.arange(500)).sum() == 100
    with pytest.raises(ValueError, match="a swap needs two"):
        corrupt.corrupt_captions(10, 0.1, 0)


def test_read_captions_checks_count_and_encoding(tmp_path):
    (tmp_path / "captions.jsonl").write_bytes(b'"a red disk"\n["two", "captions"]\n')
    assert plumbing.read_captions(str(tmp_path / "captions.jsonl"), 2) == [["a red disk"], ["two", "captions"]]
    with pytest.raises(ValueError, match="has 2 lines for 3 images"):
        plumbing.read_captions(str(tmp_path / "captions.jsonl"), 3)
    (tmp_path / "captions.jsonl").write_bytes(b'"a red disk"\n"\xff\xfe"\n')
    with pytest.raises(ValueError, match="line 2 is not a UTF-8 JSON caption"):
        plumbing.read_captions(str(tmp_path / "captions.jsonl"), 2)
    (tmp_path / "captions.jsonl").write_bytes(b'"a"\n[]\n')
    with pytest.raises(ValueError, match="line 2: want a caption"):
        plumbing.read_captions(str(tmp_path / "captions.jsonl"), 2)


def test_cli_swap_says_how_many_captions_changed(shapes, tmp_path, capsys):
    corrupt.main(["--data", f"{shapes}/train", "--eta", "0.3", "--kind", "swap", "--out", str(tmp_path / "c.npz")])
    out = capsys.readouterr().out
    assert "swapped the captions of 60 of 200 images" in out and "captions changed" in out
    z = np.load(tmp_path / "c.npz")
    assert z["mask"].sum() == 60 and sorted(z["source"].tolist()) == list(range(200))
