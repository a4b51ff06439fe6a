import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model
import plumbing
import train
from ext import metadata
from helpers import assert_moments_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_train(data, out, *extra):
    """train.py, or with --control ext/metadata.py's train (control metadata)."""
    base = ["--data", data, "--out", str(out), "--preset", "tiny", "--batch-size", "16", "--warmup", "2",
            "--lr", "1e-3", "--log-every", "2", "--grid-steps", "2"]
    entry(extra)(base + [str(e) for e in extra])
    return plumbing.load_checkpoint(str(out), ext=True)


def entry(flags):
    """The main that takes these flags: train.py's, or ext/metadata.py's train for --control."""
    return (lambda argv: metadata.main(["train", *argv])) if "--control" in flags else train.main


def cli(*args):
    return subprocess.run([sys.executable, f"{ROOT}/train.py", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_loss_falls_on_shapes_and_run_folder_is_complete(shapes16, tmp_path, capsys):
    out = tmp_path / "run"
    ckpt = run_train(f"{shapes16}/train", out, "--steps", "60", "--log-every", "10", "--ckpt-every", "30",
                     "--lr", "2e-3", "--eta", "0.1", "--cep", "uniform")
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], log
    assert all(len(r["loss_q"]) == 4 and r["img_per_s"] > 0 for r in log)
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt", "config.json", "corruption.npz", "grid-0000030.png",
                                                     "grid-0000060.png", "log.jsonl"]
    assert ckpt["step"] == 60 and ckpt["nimg"] == 960
    assert not any("_orig_mod" in k or k.startswith("module.") for k in ckpt["model"])
    cfg = ckpt["config"]
    assert cfg["model"]["preset"] == "tiny" and cfg["train"]["eta"] == 0.1 and cfg["train"]["cep"] == "uniform"
    net, _ = model.build(cfg)
    net.load_state_dict(ckpt["ema"])
    z = np.load(out / "corruption.npz")
    assert z["mask"].sum() == 20 and int(z["seed"]) == 0
    assert "compile=False bf16=False" in capsys.readouterr().out  # the CUDA-only paths are off on the CPU


@pytest.mark.slow
def test_channels_last_gives_the_same_gradients_and_resumes(shapes, tmp_path):
    common = ["--steps", "2", "--ckpt-every", "2", "--dropout", "0"]
    plain = run_train(f"{shapes}/train", tmp_path / "plain", *common)
    nhwc = run_train(f"{shapes}/train", tmp_path / "nhwc", *common, "--channels-last")
    assert nhwc["config"]["train"]["channels_last"] and nhwc["model"]["unet.conv_in.weight"].is_contiguous(
        memory_format=torch.channels_last)
    assert_moments_close(plain, nhwc, rel=1e-4)
    train.main(["--resume", str(tmp_path / "nhwc"), "--steps", "3"])  # optimizer state keeps the weights' layout
    assert plumbing.load_checkpoint(str(tmp_path / "nhwc"))["step"] == 3
    net, _ = model.build(nhwc["config"])  # sampling loads NHWC weights into the default layout
    net.load_state_dict(nhwc["ema"])


TEXT_CROP = ["--cond", "text", "--crop-scale", "0.7", "--max-len", "24"]
TEXT = TEXT_CROP + ["--control", "phased"]  # ext/metadata.py's train


@pytest.mark.slow
@pytest.mark.parametrize("cond", [[], TEXT], ids=["class", "text"])
def test_resume_ends_with_identical_weights(shapes16, tmp_path, cond):
    common = ["--dropout", "0.1", "--eta", "0.05", "--corruption-mode", "resample", "--cep", "gaussian",
              "--ckpt-every", "4", "--batch-size", "48", *cond]  # 200 images: batches cross epoch boundaries
    full = run_train(f"{shapes16}/train", tmp_path / "full", "--steps", "8", *common)
    run_train(f"{shapes16}/train", tmp_path / "cut", "--steps", "4", *common)
    with open(tmp_path / "cut/log.jsonl", "a") as f:  # a line the killed run wrote after its last checkpoint
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n")
    entry(cond)(["--resume", str(tmp_path / "cut"), "--steps", "8"])
    resumed = plumbing.load_checkpoint(str(tmp_path / "cut"), ext=True)
    assert resumed["step"] == 8
    assert states_equal(full["model"], resumed["model"]) and states_equal(full["ema"], resumed["ema"])
    steps = [json.loads(l)["step"] for l in open(tmp_path / "cut/log.jsonl")]
    assert steps == [2, 4, 6, 8]


@pytest.mark.slow
@pytest.mark.parametrize("cond", [[], TEXT], ids=["class", "text"])
def test_two_process_ddp_matches_one_process(shapes16, tmp_path, cond):
    args = ["--data", f"{shapes16}/train", "--preset", "tiny", "--batch-size", "16", "--steps", "3", "--warmup", "1",
            "--lr", "1e-3", "--ckpt-every", "3", "--grid-steps", "1", "--eta", "0.1", "--cep", "uniform", *cond]
    entry(cond)(args + ["--out", str(tmp_path / "one")])
    script = ["-m", "ext.metadata", "train"] if cond else [f"{ROOT}/train.py"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *script, *args, "--out", str(tmp_path / "two"), "--batch-gpu", "4"],
                         capture_output=True, text=True, cwd=ROOT)
    assert two.returncode == 0, two.stderr
    a, b = plumbing.load_checkpoint(str(tmp_path / "one"), ext=True), plumbing.load_checkpoint(str(tmp_path / "two"),
                                                                                               ext=True)
    assert b["config"]["train"]["world_size"] == 2 and b["config"]["train"]["accum"] == 2
    assert_moments_close(a, b)
    assert not states_equal(a["model"], plumbing.load_checkpoint(str(tmp_path / "one"), ext=True)["ema"])


@pytest.mark.parametrize("flags,message", [
    (["--eta", "1.0"], r"eta must be in \[0, 1\)"),
    (["--eta", "-0.5"], r"eta must be in \[0, 1\)"),
    (["--batch-size", "10", "--batch-gpu", "4"], "must split into 1 ranks x --batch-gpu 4"),
    (["--corruption", "asymmetric"], "needs --corrupt-classes"),
    (["--corruption", "asymmetric", "--corrupt-classes", "1,99"], "unknown class 99"),
    (["--label-dropout", "1.0"], r"--label-dropout must be in \[0, 1\)"),
])
def test_bad_flags_are_refused_before_anything_is_written(shapes, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        train.main(["--data", f"{shapes}/train", "--out", str(tmp_path / "r"), "--preset", "tiny", "--steps", "1",
                    *flags])
    assert not (tmp_path / "r").exists()


def test_a_bad_flag_is_one_line_on_the_command_line(shapes, tmp_path):
    r = cli("--data", f"{shapes}/train", "--out", tmp_path / "r", "--preset", "tiny", "--eta", "1.0")
    assert r.returncode == 1 and r.stderr.startswith("train.py: error:") and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
def test_missing_data_and_bad_checkpoints(shapes, tmp_path):
    r = cli("--data", tmp_path / "nothing", "--preset", "tiny")  # the command line: one line
    assert r.returncode == 1 and "prepare_data.py" in r.stderr and r.stderr.count("\n") == 1
    run_train(f"{shapes}/train", tmp_path / "run", "--steps", "2", "--ckpt-every", "2")
    with pytest.raises(ValueError, match="already holds a run"):
        train.main(["--data", f"{shapes}/train", "--out", str(tmp_path / "run"), "--preset", "tiny"])
    with pytest.raises(ValueError, match="--lr differs from the checkpoint"):
        train.main(["--resume", str(tmp_path / "run"), "--steps", "4", "--lr", "0.5"])
    blob = (tmp_path / "run/ckpt.pt").read_bytes()
    (tmp_path / "run/ckpt.pt").write_bytes(blob[: len(blob) // 3])
    r = cli("--resume", tmp_path / "run", "--steps", "4")
    assert r.returncode == 1 and "truncated" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    torch.save({"model": {}}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="not a slightdiff checkpoint"):
        train.main(["--resume", str(tmp_path / "foreign.pt")])


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(shapes, tmp_path):
    r = cli("--data", f"{shapes}/train", "--out", tmp_path / "run", "--preset", "tiny", "--batch-size", "8",
            "--steps", "20", "--lr", "1e30", "--warmup", "0", "--log-every", "1", "--ckpt-every", "1",
            "--grid-steps", "1")
    last = r.stderr.strip().splitlines()[-1]  # the progress bar shares stderr
    assert r.returncode == 1 and "Traceback" not in r.stderr and last.startswith("train.py: error: loss is"), last
    ckpt = plumbing.load_checkpoint(str(tmp_path / "run"))
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())
    failed_at = int(last.split(" at step ")[1].split(":")[0])
    assert ckpt["step"] < failed_at


@pytest.mark.slow
def test_text_model_loss_falls_and_run_folder_records_the_swap(shapes16, tmp_path, capsys):
    out = tmp_path / "text"
    ckpt = run_train(f"{shapes16}/train", out, "--steps", "60", "--log-every", "10", "--ckpt-every", "60",
                     "--lr", "2e-3", "--eta", "0.3", "--cep", "uniform", "--cond", "text", "--control", "phased")
    log = [json.loads(l) for l in open(out / "log.jsonl")]
    assert log[-1]["loss"] < 0.5 * log[0]["loss"], log
    printed = capsys.readouterr().out
    assert "cond text" in printed and "60 captions swapped" in printed, printed
    z = np.load(out / "corruption.npz")
    assert z["mask"].sum() == 60 and str(z["kind"]) == "swap" and sorted(z["source"].tolist()) == list(range(200))
    cfg = ckpt["config"]
    assert cfg["model"]["cond"] == "text" and cfg["model"]["control"] == "phased"
    assert cfg["data"]["control_size"] == [16, 16]
    net = metadata.MetadataDenoiser(**cfg["model"])
    net.load_state_dict(ckpt["ema"])
    assert any(k.startswith("text.") for k in ckpt["model"]) and any(k.startswith("control.") for k in ckpt["model"])


def test_precomputed_caption_embeddings(shapes, tmp_path):
    emb = np.random.default_rng(0).normal(size=(200, 3, 10)).astype(np.float32)  # any external encoder's output
    np.save(tmp_path / "emb.npy", emb)
    ckpt = run_train(f"{shapes}/train", tmp_path / "ext", "--steps", "2", "--ckpt-every", "2", "--cond", "text",
                     "--text-emb", tmp_path / "emb.npy", "--eta", "0.1")
    assert ckpt["config"]["model"]["ext_dim"] == 10 and ckpt["config"]["model"]["max_len"] == 3
    np.save(tmp_path / "bad.npy", emb[:150])
    r = cli("--data", f"{shapes}/train", "--out", tmp_path / "bad", "--preset", "tiny", "--cond", "text",
            "--text-emb", tmp_path / "bad.npy")
    assert r.returncode == 1 and "one row per image" in r.stderr and r.stderr.count("\n") == 1, r.stderr


@pytest.mark.slow
def test_init_from_a_lower_resolution(shapes, tmp_path):
    low = tmp_path / "low"
    low.mkdir()
    images = np.load(f"{shapes}/train/images.npy")
    np.save(low / "images.npy", images.reshape(200, 16, 2, 16, 2, 3).mean((2, 4)).astype(np.uint8))
    (low / "labels.npy").write_bytes(open(f"{shapes}/train/labels.npy", "rb").read())
    (low / "meta.json").write_text(json.dumps(dict(json.load(open(f"{shapes}/train/meta.json")), resolution=16)))
    src = run_train(str(low), tmp_path / "r16", "--steps", "2", "--ckpt-every", "2")
    # attention at 8x8 in a 16x16 run sits at the same level as 16x16 attention in a 32x32 run
    dst = run_train(f"{shapes}/train", tmp_path / "r32", "--steps", "1", "--ckpt-every", "1", "--lr", "1e-30",
                    "--init-from", tmp_path / "r16")
    assert dst["config"]["model"]["attn_res"] == [8 * 2] and dst["config"]["diffusion"]["shift"] == 2.0
    assert all(torch.allclose(src["ema"][k], dst["model"][k], atol=1e-6) for k in src["ema"])  # every weight
    train.main(["--resume", str(tmp_path / "r32"), "--steps", "2"])  # resumes without the source run
    r = cli("--data", f"{shapes}/train", "--out", tmp_path / "bad", "--preset", "tiny", "--cond", "text",
            "--init-from", tmp_path / "r16")
    assert r.returncode == 1 and "its weights do not fit this model" in r.stderr and r.stderr.count("\n") == 1


@pytest.mark.slow
def test_captions_file_that_does_not_match_the_images(shapes, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in ("images.npy", "labels.npy", "meta.json"):
        (data / f).write_bytes(open(f"{shapes}/train/{f}", "rb").read())
    lines = open(f"{shapes}/train/captions.jsonl", "rb").readlines()
    (data / "captions.jsonl").write_bytes(b"".join(lines[:150]))
    r = cli("--data", data, "--out", tmp_path / "r", "--preset", "tiny", "--cond", "text")
    assert r.returncode == 1 and "has 150 lines for 200 images" in r.stderr and r.stderr.count("\n") == 1
    (data / "captions.jsonl").write_bytes(b"".join(lines[:199]) + b'"caf\xe9"\n')
    r = cli("--data", data, "--out", tmp_path / "r", "--preset", "tiny", "--cond", "text")
    assert r.returncode == 1 and "line 200 is not a UTF-8 JSON caption" in r.stderr and r.stderr.count("\n") == 1
    r = cli("--data", data, "--out", tmp_path / "r", "--preset", "tiny", "--cond", "text", "--corruption", "symmetric")
    assert r.returncode == 1 and "does not go with --cond text" in r.stderr
    assert not (tmp_path / "r").exists()


def test_step_randomness_comes_from_seed_and_step_alone_for_any_rank_layout(shapes16):
    cfg = train.resolve_config(train.parse_args(["--data", f"{shapes16}/train", "--preset", "tiny", *TEXT_CROP, "--cep",
                                                 "uniform", "--label-dropout", "0.5", "--batch-size", "12"]), 1)
    cpu = torch.device("cpu")
    data = train.load_data(cfg, cpu)
    net = model.Denoiser(**train.model_config(cfg, data, None)[0])
    draw = lambda step, rank=0, world=1: train.draw_step(step, cfg, data, net, cpu, rank, world)
    fields = lambda d: [torch.as_tensor(d.idx), d.t, d.noise, d.cond, d.flip, d.delta, *d.crop.unbind(1)]
    a, b, other = fields(draw(5)), fields(draw(5)), fields(draw(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a[1:], other[1:]))  # every draw changes with the step
    halves = [fields(draw(5, rank, 2)) for rank in (0, 1)]  # two ranks: each its half of the same global batch
    assert all(torch.equal(x, torch.cat([h0, h1])) for x, h0, h1 in zip(a, *halves))
    assert train.seed_of(cfg.seed, 5, 0, 3) != train.seed_of(cfg.seed, 5, 1, 3)  # dropout masks differ per rank
