import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import sample
from ext import metadata
from helpers import interrupted_sampling, run_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(path):
    z = np.load(path, allow_pickle=False)
    return z["arr_0"], z["arr_1"], json.loads(str(z["settings"]))


def test_samples_npz_layout_and_stored_settings(tiny_run, tmp_path):
    out = str(tmp_path / "s.npz")
    sample.main(["--ckpt", tiny_run, "--num", "12", "--steps", "3", "--batch", "5", "--shard-size", "4",
                 "--cfg-scale", "2", "--out", out])
    images, labels, settings = load(out)
    assert images.shape == (12, 32, 32, 3) and images.dtype == np.uint8
    assert labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # balanced over the classes
    assert settings["cfg_scale"] == 2 and settings["steps"] == 3 and settings["config"]["model"]["preset"] == "tiny"
    assert os.path.exists(tmp_path / "s.png")
    assert sorted(os.listdir(tmp_path)) == ["s.npz", "s.png"]  # shards removed once merged


def test_sample_i_is_the_same_for_any_batch_size(tiny_run, tmp_path, monkeypatch):
    args = ["--ckpt", tiny_run, "--num", "6", "--sampler", "ddim", "--steps", "3", "--ddim-eta", "1.0",
            "--labels", "2,7"]
    sample.main(args + ["--batch", "6", "--out", str(tmp_path / "a.npz")])
    sample.main(args + ["--batch", "4", "--shard-size", "3", "--out", str(tmp_path / "b.npz")])
    a, la, _ = load(tmp_path / "a.npz")
    b, lb, _ = load(tmp_path / "b.npz")
    assert la.tolist() == lb.tolist() == [2, 7, 2, 7, 2, 7]
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # float round-off may move a pixel by one level
    shapes_seen = set()

    def compile_recording_shapes(net):  # stands in for torch.compile: which batch shapes would it compile for?
        def fwd(x, *rest):
            shapes_seen.add(tuple(x.shape))
            return net(x, *rest)
        return fwd
    monkeypatch.setattr(sample.torch, "compile", compile_recording_shapes)
    sample.main(args + ["--batch", "4", "--compile", "--out", str(tmp_path / "p.npz")])  # 6 = 4 + 2 padded to 4
    assert shapes_seen == {(4, 3, 32, 32)}
    assert np.abs(a.astype(int) - load(tmp_path / "p.npz")[0].astype(int)).max() <= 1
    sample.main(args + ["--batch", "6", "--seed", "1", "--out", str(tmp_path / "c.npz")])
    assert np.abs(a.astype(int) - load(tmp_path / "c.npz")[0].astype(int)).mean() > 10


def test_interrupted_run_reuses_finished_shards(tiny_run, tmp_path, monkeypatch):
    out = str(tmp_path / "s.npz")
    args = ["--ckpt", tiny_run, "--num", "8", "--steps", "2", "--shard-size", "4", "--batch", "4", "--out", out]
    sample.main(args)
    full = load(out)[0]
    os.remove(out)
    interrupted_sampling(args, monkeypatch)
    shard_dir = [d for d in os.listdir(tmp_path) if ".shards-" in d]
    assert len(shard_dir) == 1 and os.listdir(tmp_path / shard_dir[0]) == ["000000.npy"] and not os.path.exists(out)
    # mark the finished shard: the resumed run must take it as it is and generate only the rest
    np.save(tmp_path / shard_dir[0] / "000000.npy", np.full((4, 32, 32, 3), 7, np.uint8))
    sample.main(args)
    merged = load(out)[0]
    assert np.all(merged[:4] == 7) and np.array_equal(merged[4:], full[4:])


@pytest.mark.slow
def test_two_process_sampling_matches_one_process(tiny_run, tmp_path):
    args = ["--ckpt", tiny_run, "--num-samples", "6", "--steps", "2", "--shard-size", "2", "--batch", "2"]
    sample.main(args + ["--out", str(tmp_path / "one.npz")])
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        f"{ROOT}/sample.py", *args, "--out", str(tmp_path / "two.npz")], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert np.array_equal(load(tmp_path / "one.npz")[0], load(tmp_path / "two.npz")[0])


@pytest.mark.parametrize("flags,message", [
    (["--labels", "3,10"], r"--labels must be class indices in \[0, 10\)"),
    (["--num", "0"], r"--num must be in \[1, inf\)"),
    (["--ddim-eta", "2"], r"--ddim-eta must be in \[0, 1\]"),
])
def test_bad_flags(tiny_run, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        sample.main(["--ckpt", tiny_run, "--out", str(tmp_path / "s.npz"), *flags])
    assert not os.listdir(tmp_path)
    r = run_cli("sample.py", "--ckpt", tiny_run, *flags) if flags[0] == "--labels" else None  # one line
    assert r is None or (r.returncode == 1 and r.stderr.startswith("sample.py: error:") and
                         r.stderr.count("\n") == 1), r.stderr


def test_missing_checkpoint(tmp_path, tiny_run):
    r = run_cli("sample.py", "--ckpt", tmp_path)
    assert r.returncode == 1 and "has no checkpoint yet" in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("sample.py", "--ckpt", f"{tiny_run}/config.json")
    assert r.returncode == 1 and "config.json is not a checkpoint" in r.stderr and r.stderr.count("\n") == 1


def test_prompts_are_cycled_stored_and_seeded_per_index(tiny_meta_run, tmp_path):
    (tmp_path / "p.txt").write_text("a red disk\n\na blue ring on the left\nun carré\n", encoding="utf-8")
    common = ["--ckpt", tiny_meta_run, "--steps", "2", "--cfg-scale", "2", "--batch", "4"]
    meta = lambda argv: metadata.main(["sample", *argv])  # a model with control metadata (ext/metadata.py)
    meta(common + ["--num", "7", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "a.npz")])
    z = np.load(tmp_path / "a.npz", allow_pickle=False)
    assert z["arr_0"].shape == (7, 32, 32, 3) and "arr_1" not in z.files
    assert z["captions"].tolist() == ["a red disk", "a blue ring on the left", "un carré"] * 2 + ["a red disk"]
    settings = json.loads(str(z["settings"]))
    assert settings["control"] == [0.0, 0.0, 1.0, 1.0, 32.0, 32.0, 0.0]  # no crop, no flip, the training size
    assert os.path.exists(tmp_path / "a.png")
    meta(common + ["--num", "1", "--prompt", "a red disk", "--out", str(tmp_path / "b.npz")])
    assert np.abs(np.load(tmp_path / "b.npz")["arr_0"][0].astype(int) - z["arr_0"][0].astype(int)).max() <= 1
    meta(common + ["--num", "1", "--prompt", "a red disk", "--ctrl-flip", "--out", str(tmp_path / "c.npz")])
    assert json.loads(str(np.load(tmp_path / "c.npz")["settings"]))["control"][6] == 1.0


@pytest.mark.parametrize("content,flags,message", [
    (b"", [], "holds no caption"),
    (b"a red disk\n\xff\xfe\n", [], "is not UTF-8 text"),
    (None, [], "give --prompt TEXT or --prompts FILE"),
    (None, ["--ctrl-crop", "0,0,2,1"], "--ctrl-crop wants"),
])
def test_bad_prompts(tiny_text_run, tiny_meta_run, tmp_path, content, flags, message):
    if content is None:  # the flags alone (--ctrl-crop: a model with control metadata)
        main = (lambda argv: metadata.main(["sample", "--ckpt", tiny_meta_run, *argv])) if flags else \
            (lambda argv: sample.main(["--ckpt", tiny_text_run, *argv]))
        with pytest.raises(ValueError, match=re.escape(message)):
            main(["--out", str(tmp_path / "s.npz"), *flags] + (["--prompt", "x"] if flags else []))
        return
    (tmp_path / "p.txt").write_bytes(content)  # bad files: checked on the command line, one line each
    r = run_cli("sample.py", "--ckpt", tiny_text_run, "--prompts", tmp_path / "p.txt")
    assert r.returncode == 1 and r.stderr.startswith("sample.py: error:") and r.stderr.count("\n") == 1, r.stderr
    assert message in r.stderr, r.stderr


def test_class_model_refuses_prompts(tiny_run, tmp_path):
    with pytest.raises(ValueError, match="class-conditional model"):
        sample.main(["--ckpt", tiny_run, "--prompt", "a red disk", "--out", str(tmp_path / "s.npz")])


@pytest.mark.parametrize("sampler,spacing", [("dpm++", "logsnr"), ("heun", "time")])
def test_every_sampler_writes_samples_seeded_per_index(tiny_run, tmp_path, sampler, spacing):
    args = ["--ckpt", tiny_run, "--num", "3", "--sampler", sampler, "--steps", "3", "--cfg-scale", "2", "--spacing",
            spacing]
    sample.main(args + ["--out", str(tmp_path / "a.npz")])
    images, _, settings = load(tmp_path / "a.npz")
    assert settings["sampler"] == sampler and settings["steps"] == 3 and settings["spacing"] == spacing
    sample.main(args + ["--batch", "2", "--out", str(tmp_path / "b.npz")])
    assert np.abs(images.astype(int) - load(tmp_path / "b.npz")[0].astype(int)).max() <= 1
    r = run_cli("sample.py", "--ckpt", tiny_run, "--sampler", "heun", "--ddim-eta", "0.5")
    assert r.returncode == 1 and "--ddim-eta is for --sampler ddim" in r.stderr and r.stderr.count("\n") == 1
