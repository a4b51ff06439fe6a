"""Cross-check against pytorch-fid (requirements-crosscheck.txt); skipped where it is not installed."""
import numpy as np
import pytest
import torch

import evaluate

pytest.importorskip("pytorch_fid", exc_type=ImportError)


def test_pool_features_match_pytorch_fid(inception_weights, monkeypatch):
    import pytorch_fid.inception as pfi
    state = torch.load(inception_weights, map_location="cpu", weights_only=True)
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)  # their network, our weights
    theirs = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours, _ = evaluate.load_inception(inception_weights, "cpu")
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    with torch.no_grad():
        want = theirs(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0].flatten(1).double().numpy()
    got = evaluate.inception_features(ours, images, batch=4)["pool"]
    rel = np.abs(got - want).max() / np.abs(want).max()
    print(f"pool features: max |ours - pytorch-fid| / max |pytorch-fid| = {rel:.2e}")
    assert rel < 1e-4


def test_frechet_distance_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3000, 256)) @ rng.normal(size=(256, 256)) * 0.1
    b = rng.normal(size=(3000, 256)) @ rng.normal(size=(256, 256)) * 0.1 + 0.05
    stats = [*evaluate.mean_cov(a), *evaluate.mean_cov(b)]
    want = calculate_frechet_distance(*stats)
    got = evaluate.frechet_distance(*stats)
    print(f"FID: ours {got:.8f}, pytorch-fid {want:.8f}, relative difference {abs(got - want) / want:.2e}")
    assert got == pytest.approx(want, rel=1e-4)
