"""Faults: kill -9 at any point, disk full, damaged and hostile inputs, NaN, a rank that dies. Each case ends in a
complete earlier state and a one-line error, never a traceback or a silently wrong run."""
import io
import importlib
import json
import os
import pickle
import re
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch
from PIL import Image

import model
import plumbing
import prepare_data
import train
from helpers import finish, interrupted_sampling, run_cli
import diffusion  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3", "--grid-steps", "1",
        "--dropout", "0.1", "--eta", "0.1", "--cep", "gaussian", "--log-every", "1"]


def script(name, *args, limit=None, **kw):
    """Run a stage script; limit: a file-size limit in bytes (RLIMIT_FSIZE), a disk that fills up."""
    pre = (lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))) if limit else None
    return subprocess.run([sys.executable, f"{ROOT}/{name}", *map(str, args)], capture_output=True, text=True,
                          preexec_fn=pre, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"), **kw)


def one_line_error(r, script_name, *words):
    last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
    assert r.returncode == 1 and "Traceback" not in r.stderr and last.startswith(f"{script_name}: error:"), r.stderr
    for w in words:
        assert w in last, last


def equal_states(a, b):
    return all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


@pytest.mark.slow
@pytest.mark.faults
def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_weights(shapes16, tmp_path):
    args = ["--data", f"{shapes16}/train", *TINY, "--steps", "12", "--ckpt-every", "3"]
    train.main(args + ["--out", str(tmp_path / "ref")])
    ref = plumbing.load_checkpoint(str(tmp_path / "ref"))
    out = str(tmp_path / "killed")
    fresh = [sys.executable, f"{ROOT}/train.py", *args, "--out", out]
    resume = [sys.executable, f"{ROOT}/train.py", "--resume", out]
    rng = np.random.default_rng()
    points = [int(rng.integers(lo, lo + 4)) for lo in (1, 7)]  # one in each half; before 12, so it is still running
    for at in points:
        assert not finish(fresh, resume, out, at), points  # killed there
    assert finish(fresh, resume, out)
    got = plumbing.load_checkpoint(out)
    assert got["step"] == 12, points
    assert equal_states(ref["model"], got["model"]) and equal_states(ref["ema"], got["ema"]), points
    assert [json.loads(l)["step"] for l in open(os.path.join(out, "log.jsonl"))] == list(range(1, 13))
    assert not [f for f in os.listdir(out) if ".tmp" in f]


@pytest.mark.slow
@pytest.mark.faults
def test_kill_9_while_writing_a_checkpoint(shapes16, tmp_path):
    args = ["--data", f"{shapes16}/train", *TINY, "--steps", "6", "--ckpt-every", "2"]
    train.main(args + ["--out", str(tmp_path / "ref")])
    out = str(tmp_path / "killed")
    # the second checkpoint write dies half way through its bytes, as a power cut would leave it
    code = (f"import os, signal, sys; sys.path.insert(0, {ROOT!r}); import train\n"
            "real, calls = train.save_atomic, []\n"
            "def dying(path, write):\n"
            "    calls.append(path)\n"
            "    if path.endswith('ckpt.pt') and len([c for c in calls if c.endswith('ckpt.pt')]) == 2:\n"
            "        def half(f):\n"
            "            write(f); f.truncate(f.tell() // 2); f.flush(); os.kill(os.getpid(), signal.SIGKILL)\n"
            "        return real(path, half)\n"
            "    return real(path, write)\n"
            "train.save_atomic = dying\n"
            f"train.main({args + ['--out', out]!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == -signal.SIGKILL
    assert plumbing.load_checkpoint(out)["step"] == 2 and any(".tmp" in f for f in os.listdir(out))  # the half file
    train.main(["--resume", out])
    ref, got = plumbing.load_checkpoint(str(tmp_path / "ref")), plumbing.load_checkpoint(out)
    assert got["step"] == 6 and equal_states(ref["model"], got["model"]) and equal_states(ref["ema"], got["ema"])
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # the resumed run swept the half-written file


@pytest.mark.slow
@pytest.mark.faults
def test_kill_9_of_a_two_process_torchrun_then_resume(shapes16, tmp_path):
    args = ["--data", f"{shapes16}/train", *TINY, "--steps", "8", "--ckpt-every", "2", "--batch-gpu", "2"]
    run = lambda out: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       f"{ROOT}/train.py", *args, "--out", out]
    resume = lambda out: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          f"{ROOT}/train.py", "--resume", out]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    assert finish(run(ref), resume(ref), ref)
    at = int(np.random.default_rng().integers(3, 7))
    assert not finish(run(out), resume(out), out, kill_at=at)  # torchrun, its agent and both ranks
    assert finish(run(out), resume(out), out)
    a, b = plumbing.load_checkpoint(ref), plumbing.load_checkpoint(out)
    assert b["step"] == 8 and equal_states(a["model"], b["model"]) and equal_states(a["ema"], b["ema"]), at


@pytest.mark.slow
@pytest.mark.faults
def test_kill_9_of_sample_py_then_rerun_gives_the_same_bytes(tiny_run, tmp_path):
    args = ["--ckpt", tiny_run, "--num", "12", "--steps", "2", "--shard-size", "2", "--batch", "2"]
    assert script("sample.py", *args, "--out", tmp_path / "ref.npz").returncode == 0
    out = tmp_path / "s.npz"
    p = subprocess.Popen([sys.executable, f"{ROOT}/sample.py", *args, "--out", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    shards = lambda: [f for d in tmp_path.iterdir() if ".shards-" in d.name for f in os.listdir(d)
                      if f.endswith(".npy")]
    deadline = time.time() + 60
    while len(shards()) < 2 and time.time() < deadline:
        time.sleep(0.05)
    p.kill()
    p.wait()
    assert 2 <= len(shards()) < 6 and not out.exists()
    assert script("sample.py", *args, "--out", out).returncode == 0
    assert out.read_bytes() == (tmp_path / "ref.npz").read_bytes()


@pytest.mark.slow
@pytest.mark.faults
def test_disk_full_leaves_the_previous_files_and_says_so_in_one_line(shapes, tiny_run, tmp_path):
    # a checkpoint: the step-2 one stays loadable when writing the step-4 one fails
    run = tmp_path / "run"
    train.main(["--data", f"{shapes}/train", *TINY, "--steps", "2", "--ckpt-every", "2", "--out", str(run)])
    r = script("train.py", "--resume", run, "--steps", "4", limit=1 << 20)
    one_line_error(r, "train.py", "cannot write", "ckpt.pt", "unchanged")
    # the OS's EFBIG, or torch's zip writer catching a short write: which depends on where the limit falls
    assert "File too large" in r.stderr or "unexpected pos" in r.stderr, r.stderr
    assert plumbing.load_checkpoint(str(run))["step"] == 2 and not [f for f in os.listdir(run) if ".tmp" in f]
    # a sample shard (and so samples.npz, written the same way)
    r = script("sample.py", "--ckpt", tiny_run, "--num", "4", "--steps", "1", "--out", tmp_path / "s.npz", limit=4000)
    one_line_error(r, "sample.py", "cannot write", "000000.npy", "unchanged")
    assert not (tmp_path / "s.npz").exists() and not any(".tmp" in f for _, _, fs in os.walk(tmp_path) for f in fs)
    # an evaluate.py JSON (metrics.json, repro.json, memorization.json: one writer)
    images = np.load(f"{shapes}/test/images.npy")[:4]
    np.savez(tmp_path / "a.npz", arr_0=images)
    (tmp_path / "r.json").write_text("{}")
    r = script("evaluate.py", "repro", tmp_path / "a.npz", tmp_path / "a.npz", "--features", "pixels", "--out",
               tmp_path / "r.json", limit=64)
    one_line_error(r, "evaluate.py", "cannot write", "r.json")
    assert (tmp_path / "r.json").read_text() == "{}"
    # a dataset folder: the previous one stays
    prepare_data.prepare_shapes(str(tmp_path / "data"), 20, 10)
    before = (tmp_path / "data/shapes/train/images.npy").read_bytes()
    r = script("prepare_data.py", "--dataset", "shapes", "--count", "200", "--out", tmp_path / "data", limit=100_000)
    one_line_error(r, "prepare_data.py", "cannot write", "nothing was changed")
    assert (tmp_path / "data/shapes/train/images.npy").read_bytes() == before
    assert sorted(os.listdir(tmp_path / "data/shapes")) == ["test", "train"]


@pytest.mark.slow
@pytest.mark.faults
def test_damaged_run_and_dataset_files_give_one_line_errors(shapes, tmp_path):
    data, run = tmp_path / "data", tmp_path / "run"
    prepare_data.prepare_shapes(str(data), 100, 10)
    train.main(["--data", f"{data}/shapes/train", *TINY, "--steps", "2", "--ckpt-every", "2", "--out", str(run)])
    ckpt = plumbing.load_checkpoint(str(run))
    # weights of another model under this run's config (another preset, another code version)
    other = model.Denoiser(10, 32, 3, "tiny", ch=16).state_dict()
    torch.save(dict(ckpt, model=other, ema=other), run / "other.pt")
    one_line_error(run_cli("sample.py", "--ckpt", run / "other.pt"), "sample.py", "do not fit the model")
    # a corruption.npz that no longer matches what the dataset and seed give
    z = dict(np.load(run / "corruption.npz"))
    np.savez(run / "corruption.npz", **dict(z, mask=~z["mask"]))
    with pytest.raises(ValueError, match=r"corruption.npz does not match .* \(mask\)"):
        train.main(["--resume", str(run), "--steps", "4"])
    np.savez(run / "corruption.npz", **z)
    # the dataset rebuilt under the run with another count
    prepare_data.prepare_shapes(str(data), 120, 10)
    one_line_error(run_cli("train.py", "--resume", run, "--steps", "4"), "train.py", "not the dataset this run started")
    assert plumbing.load_checkpoint(str(run))["step"] == 2
    # dataset folders whose files disagree
    broken = tmp_path / "broken"
    for case, fix in [("lengths", lambda d: np.save(d / "labels.npy", np.zeros(150, np.int64))),
                      ("classes", lambda d: (d / "meta.json").write_text(json.dumps(
                          dict(json.load(open(d / "meta.json")), num_classes=12)))),
                      ("labels", lambda d: np.save(d / "labels.npy", np.full(200, 10, np.int64))),
                      ("resolution", lambda d: (d / "meta.json").write_text(json.dumps(
                          dict(json.load(open(d / "meta.json")), resolution=64)))),
                      ("json", lambda d: (d / "meta.json").write_text("{num_classes: 10")),
                      ("truncated", lambda d: (d / "images.npy").write_bytes((d / "images.npy").read_bytes()[:5000]))]:
        broken.mkdir(exist_ok=True)
        for f in ("images.npy", "labels.npy", "meta.json"):
            (broken / f).write_bytes(open(f"{shapes}/train/{f}", "rb").read())
        fix(broken)
        with pytest.raises(ValueError, match="rebuild the dataset"):
            train.load_dataset(str(broken), None, 0)
    r = script("train.py", "--data", broken, "--out", tmp_path / "r", "--preset", "tiny", "--steps", "1")
    one_line_error(r, "train.py", "rebuild the dataset")
    assert not (tmp_path / "r").exists()


def evil_batch():
    class Exploit:
        def __reduce__(self):
            return (os.system, ("touch exploited",))
    return pickle.dumps({b"data": Exploit(), b"labels": [0]}, protocol=2)


@pytest.mark.faults
def test_hostile_archives_and_images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, member in [("evil", "cifar-10-batches-py/data_batch_1"), ("escape", "../../data_batch_1")]:
        archive = tmp_path / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            blob = evil_batch()
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        with pytest.raises((pickle.UnpicklingError, ValueError), match="refusing"):
            prepare_data.prepare_cifar10(str(tmp_path / "data"), str(archive), plumbing.file_hash(archive, "md5"))
    assert not (tmp_path / "exploited").exists() and not (tmp_path / "data/cifar10").exists()
    # an image folder with files that are not images, a zero-byte one and one claiming 100000 x 100000 pixels
    src = tmp_path / "src/cls"
    src.mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 0, 0)).save(src / "ok.png")
    (src / "text.jpg").write_text("not an image")
    (src / "empty.png").write_bytes(b"")
    png = io.BytesIO()
    Image.new("RGB", (1, 1)).save(png, "PNG")
    head = bytearray(png.getvalue())
    head[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR width and height (its CRC is not checked on open)
    (src / "huge.png").write_bytes(bytes(head))
    prepare_data.prepare_imagefolder(str(tmp_path / "src"), str(tmp_path / "data"), "toy", "train", 16, 2)
    meta = json.load(open(tmp_path / "data/toy/train/meta.json"))
    assert meta["count"] == 1 and sorted(s.split(":")[0].split("/")[-1] for s in meta["skipped"]) == [
        "empty.png", "huge.png", "text.jpg"]


@pytest.mark.faults
def test_injected_nan_stops_the_run_and_keeps_the_last_good_checkpoint(shapes, tmp_path, monkeypatch):
    real, calls = diffusion.Diffusion.loss, []

    def poisoned(self, *a, **k):
        calls.append(1)
        out = real(self, *a, **k)
        return out * float("nan") if len(calls) == 5 else out  # step 5 of 8
    monkeypatch.setattr(diffusion.Diffusion, "loss", poisoned)
    with pytest.raises(FloatingPointError, match="loss is nan at step 5"):
        train.main(["--data", f"{shapes}/train", *TINY, "--steps", "8", "--ckpt-every", "2", "--out",
                    str(tmp_path / "run")])
    ckpt = plumbing.load_checkpoint(str(tmp_path / "run"))
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.slow
@pytest.mark.faults
def test_a_dead_rank_stops_the_other_instead_of_hanging(shapes, tmp_path):
    port = __import__("ext.bench").bench.free_port()
    out = tmp_path / "run"
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, f"{ROOT}/train.py", "--data", f"{shapes}/train", *TINY,
                                       "--steps", "100000", "--ckpt-every", "100000", "--dist-timeout", "30",
                                       "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    deadline = time.time() + 90
    while not (out / "log.jsonl").exists() and time.time() < deadline:  # both ranks are training
        time.sleep(0.1)
    procs[1].kill()
    t0 = time.time()
    err = procs[0].communicate(timeout=60)[1]
    assert time.time() - t0 < 60 and procs[0].returncode == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("train.py: error: rank 0 lost the other ranks") and "--resume" in last, err[-2000:]


# ----------------------------------------------------------------------------- issue 16: second pass

@pytest.mark.faults
def test_resumed_sampling_never_mixes_two_models_saved_at_one_path(tiny_run, tmp_path, monkeypatch):
    import shutil
    import sample
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    args = ["--ckpt", str(run), "--num", "8", "--steps", "2", "--shard-size", "4", "--batch", "4", "--out",
            str(tmp_path / "s.npz")]
    interrupted_sampling(args, monkeypatch)  # model A's first shard is on disk
    ckpt = torch.load(run / "ckpt.pt", weights_only=True)
    ckpt["ema"]["unet.conv_out.bias"] += 0.5  # model B: same path, same step, other weights
    torch.save(ckpt, run / "ckpt.pt")
    sample.main(args)
    sample.main([*args[:-1], str(tmp_path / "fresh.npz")])
    mixed, fresh = np.load(tmp_path / "s.npz")["arr_0"], np.load(tmp_path / "fresh.npz")["arr_0"]
    assert np.array_equal(mixed, fresh)  # all eight from model B
    assert json.loads(str(np.load(tmp_path / "s.npz")["settings"]))["weights_sha256"] == plumbing.weights_hash(
        ckpt["ema"])


@pytest.mark.slow
@pytest.mark.faults
def test_reference_features_of_a_rebuilt_dataset_are_computed_again(tmp_path, inception_weights):
    import evaluate
    prepare_data.prepare_shapes(str(tmp_path / "a"), 20, 10, res=16)
    prepare_data.prepare_shapes(str(tmp_path / "b"), 40, 10, res=16)  # other images, same shape
    net, sha = evaluate.load_inception(inception_weights, "cpu")
    import shutil
    ref = str(tmp_path / "data")
    shutil.copytree(tmp_path / "a/shapes/train", ref)
    first = evaluate.reference(ref, net, sha, None)
    for f in ("images.npy", "labels.npy", "meta.json"):  # other images copied over: the cache beside them is stale
        shutil.copy(tmp_path / "b/shapes/train" / f, ref)
    second = evaluate.reference(ref, net, sha, None)
    assert first["count"] == 20 and second["count"] == 40 and len(second["pool"]) == 40
    assert np.array_equal(second["mu"], evaluate.reference(ref, net, sha, None)["mu"])  # and now cached


@pytest.mark.faults
@pytest.mark.parametrize("where", ["early", "in a tensor", "zip directory"])
def test_a_checkpoint_write_that_fails_anywhere_is_one_line_and_leaves_nothing(tiny_run, tmp_path, where):
    size = os.path.getsize(os.path.join(tiny_run, "ckpt.pt"))
    limit = {"early": 200, "in a tensor": size // 2, "zip directory": size - 300}[where]
    (tmp_path / "ckpt.pt").write_bytes(b"previous")
    code = (f"import sys, resource, torch; sys.path.insert(0, {ROOT!r}); import plumbing\n"
            f"state = torch.load({os.path.join(tiny_run, 'ckpt.pt')!r}, weights_only=True)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
            f"try:\n    plumbing.save_atomic({str(tmp_path / 'ckpt.pt')!r}, lambda f: torch.save(state, f))\n"
            f"except OSError as e:\n    sys.exit(f'train.py: error: {{e}}')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    one_line_error(r, "train.py", "cannot write", "ckpt.pt", "unchanged")
    assert os.listdir(tmp_path) == ["ckpt.pt"] and (tmp_path / "ckpt.pt").read_bytes() == b"previous"


def numeric_flags(script):
    """(flag dest, int or float, nargs, its interval or None) of every numeric flag of a script's parser(s)."""
    mod = importlib.import_module(script.removesuffix(".py"))
    parsers = mod.get_parser()
    if isinstance(parsers, tuple):  # evaluate.py: one per sub-command, those of ext/ from their modules
        parsers = [*parsers[1].values(), *(mod.extension(m).parser(c) for c, (m, _) in mod.EXTENSIONS.items())]
    else:
        parsers = [parsers]
    out = {}
    for p in parsers:
        for act in p._actions:
            if act.type in (int, float):  # a numeric flag without a range
                out[act.dest] = (act.dest, act.type.__name__, act.nargs is not None, None)
            elif isinstance(act.type, plumbing.Interval):
                out[act.dest] = (act.dest, act.type.kind.__name__, act.nargs is not None, act.type.spec)
    return list(out.values())


def inside(value, spec):  # the test's own reading of an interval
    lo, hi = (float(x) for x in spec[1:-1].split(","))
    return (value >= lo if spec[0] == "[" else value > lo) and (value <= hi if spec[-1] == "]" else value < hi)


SCRIPTS = {"train.py": lambda tmp, shapes: ["--data", f"{shapes}/train", "--out", f"{tmp}/r"],
           "sample.py": lambda tmp, shapes: ["--ckpt", f"{tmp}/none", "--out", f"{tmp}/s.npz"],
           "evaluate.py": lambda tmp, shapes: ["--samples", f"{tmp}/none.npz", "--ref", f"{tmp}/none"],
           "prepare_data.py": lambda tmp, shapes: ["--dataset", "shapes", "--out", f"{tmp}/d"],
           "corrupt.py": lambda tmp, shapes: ["--data", f"{tmp}/none", "--eta", "0.1", "--out", f"{tmp}/c.npz"],
           "ext.bench": lambda tmp, shapes: ["--device", "cpu"]}
EVALUATE_COMMAND = {"feat_size": ["repro", "a", "b"], "threshold": ["repro", "a", "b"],
                    "epochs": ["classify", "--samples", "a", "--ref", "b"],
                    "l2_threshold": ["diversity", "--samples", "a", "--ref", "b"],
                    "tolerance": ["control", "--samples", "a"],
                    **{k: ["gmm"] for k in ("dims", "n_k", "gammas", "classes", "trials", "steps", "t_max", "seed")}}


@pytest.mark.faults
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_numeric_flag_of_every_script_is_range_checked_before_any_work(script, shapes, tmp_path):
    mod = importlib.import_module(script.removesuffix(".py"))
    flags = numeric_flags(script)
    assert flags and all(spec for *_, spec in flags), "a numeric flag without a range"
    refused = 0
    for dest, kind, nargs, spec in flags:  # a list flag (bench's batches): every entry in the range
        for value in ("0", "-1", "nan", "inf"):
            if inside(float(value), spec) and not (kind == "int" and value in ("nan", "inf")):
                continue
            argv = SCRIPTS[script](tmp_path, shapes)
            if script == "evaluate.py" and dest in EVALUATE_COMMAND:
                argv = EVALUATE_COMMAND[dest]
            argv = argv + [f"--{dest.replace('_', '-')}", value]
            if kind == "int" and value in ("nan", "inf"):  # not an integer: argparse's own error, naming the flag
                with pytest.raises(SystemExit):
                    mod.main(argv)
            else:
                with pytest.raises(ValueError, match=re.escape(f"--{dest.replace('_', '-')} must be in {spec}")):
                    mod.main(argv)
            refused += 1
            assert not os.listdir(tmp_path), (script, dest, value)  # nothing written
    assert refused >= 2 * len(flags)  # nan is refused everywhere, and 0 or -1 nearly everywhere


@pytest.mark.faults
def test_nothing_usable_is_an_error_not_an_empty_result(tmp_path, shapes):
    import evaluate
    src = tmp_path / "src"
    for c in ("a", "b"):
        (src / c).mkdir(parents=True)
        (src / c / "x.png").write_bytes(b"not a png")
    r = script("prepare_data.py", "--dataset", "imagefolder", "--src", src, "--out", tmp_path / "data", "--workers", 1)
    one_line_error(r, "prepare_data.py", "none of the 2 files", "decoded as an image")
    assert not (tmp_path / "data/src/train").exists() and not [f for f in os.listdir(tmp_path / "data/src")]
    np.savez(tmp_path / "empty.npz", arr_0=np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="holds 0 samples"):
        evaluate.main(["--samples", str(tmp_path / "empty.npz"), "--ref", f"{shapes}/test", "--allow-small"])


@pytest.mark.faults
def test_a_half_written_log_line_is_dropped_on_resume(shapes16, tmp_path):
    out = tmp_path / "run"
    train.main(["--data", f"{shapes16}/train", *TINY, "--steps", "2", "--ckpt-every", "2", "--out", str(out)])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.9')  # killed in the middle of writing a line
    train.main(["--resume", str(out), "--steps", "3"])
    assert [json.loads(l)["step"] for l in open(out / "log.jsonl")] == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.faults
def test_a_dead_rank_during_sampling_stops_the_other_in_one_line(tiny_run, tmp_path):
    port = __import__("ext.bench").bench.free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, f"{ROOT}/sample.py", "--ckpt", tiny_run, "--num", "8",
                                       "--shard-size", "4", "--batch", "4", "--steps", "300", "--dist-timeout", "30",
                                       "--out", str(tmp_path / "s.npz")], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    assert "shards to do" in procs[0].stdout.readline()  # both ranks are past the first barrier, sampling
    procs[1].kill()
    err = procs[0].communicate(timeout=120)[1]
    last = err.strip().splitlines()[-1]
    assert procs[0].returncode == 1 and "Traceback" not in err, err[-2000:]
    assert last.startswith("sample.py: error: rank 0 lost the other ranks") and "sample.py again" in last, last
    assert not (tmp_path / "s.npz").exists()


# ----------------------------------------------------------------------------- the third pass: the surfaces of ext/

@pytest.mark.slow
def test_every_file_is_read_through_one_reader_that_names_it(shapes16, tiny_run, inception_weights, tmp_path):
    """A truncated sizes.npy (control metadata), a cut-short classify.json under report, a damaged Inception cache
    (computed again, as a stale one is): one line naming the file and how to remake it, or no error at all."""
    from ext import metadata
    data = tmp_path / "data"
    shutil.copytree(f"{shapes16}/train", data)
    np.save(data / "sizes.npy", np.full((200, 2), 64))
    (data / "sizes.npy").write_bytes((data / "sizes.npy").read_bytes()[:-100])
    r = run_cli("ext.metadata", "train", "--data", data, *TINY, "--steps", "1", "--out", tmp_path / "m")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "sizes.npy" in r.stderr and \
        "rebuild the dataset" in r.stderr, r.stderr
    assert not (tmp_path / "m").exists() and metadata
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "classify.json").write_text('{"accuracy": 0.5, "samp')
    r = run_cli("evaluate.py", "report", run)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and f"{run}/classify.json" in r.stderr and \
        "score its samples again" in r.stderr, r.stderr
    images = np.load(f"{shapes16}/test/images.npy")
    import evaluate
    np.savez(tmp_path / "s.npz", arr_0=images)
    args = ["--samples", str(tmp_path / "s.npz"), "--ref", f"{shapes16}/test", "--inception-weights",
            inception_weights, "--allow-small", "--device", "cpu"]
    first = evaluate.main(args)["fid"]
    cache = next(p for p in os.listdir(f"{shapes16}/test") if p.startswith("inception-"))
    blob = open(f"{shapes16}/test/{cache}", "rb").read()
    open(f"{shapes16}/test/{cache}", "wb").write(blob[:len(blob) // 2])
    assert evaluate.main(args)["fid"] == first  # the cut cache is computed again, to the same statistics


def test_labels_are_checked_against_the_classes_they_index(shapes16, tmp_path):
    """Sample labels outside the reference's classes (the null class's index among them): one line, before any
    feature is computed."""
    import evaluate
    images = np.load(f"{shapes16}/test/images.npy")
    for label, shown in ((10, "label 10"), (-1, "label -1")):  # 10 classes: 10 is the null class's index
        labels = np.load(f"{shapes16}/test/labels.npy")
        labels[5] = label
        np.savez(tmp_path / "s.npz", arr_0=images, arr_1=labels)
        for cmd in ("diversity", "classify"):
            extra = ["--features", "pixels"] if cmd == "diversity" else []
            with pytest.raises(ValueError, match=f"has {shown} where there are 10 classes"):
                evaluate.main([cmd, "--samples", str(tmp_path / "s.npz"), "--ref", f"{shapes16}/train", *extra])


def test_every_comparison_checks_the_image_size_the_same_way(shapes16, tmp_path):
    """Grey samples of the reference's size (one channel where it has three): one line from each command that
    compares images pixel by pixel or feature by feature."""
    import evaluate
    grey = np.load(f"{shapes16}/test/images.npy")[..., :1]
    np.savez(tmp_path / "s.npz", arr_0=grey, arr_1=np.load(f"{shapes16}/test/labels.npy"))
    for cmd in (["diversity", "--features", "pixels"], ["memorization", "--features", "pixels"], ["classify"]):
        with pytest.raises(ValueError, match="holds 16x16x3 images but the samples are 16x16x1"):
            evaluate.main([cmd[0], "--samples", str(tmp_path / "s.npz"), "--ref", f"{shapes16}/train", *cmd[1:]])


def test_arguments_that_leave_nothing_to_compute_are_refused(tmp_path):
    r = run_cli("evaluate.py", "gmm", "--gammas", "0,0", "--dims", "2", "--out", tmp_path / "g")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--gammas needs a level above 0" in r.stderr
    r = run_cli("evaluate.py", "report", str(tmp_path / "no-such-run*"))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "give run folders" in r.stderr, r.stderr
    assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_an_unreachable_hub_is_one_line_at_once(shapes16, tmp_path):
    """No network here: an autoencoder given as a hub id fails after one probe, with the local alternative."""
    r = script("prepare_data.py", "--dataset", "latents", "--src", f"{shapes16}/train", "--vae", "some-org/some-vae",
               "--out", tmp_path, timeout=120)
    one_line_error(r, "prepare_data.py", "the hub cannot be reached from here", "--vae", "local folder")
    assert r.stderr.count("\n") == 1, r.stderr
    assert not [p for p in os.listdir(tmp_path) if not p.startswith(".")]


def test_a_guidance_sweep_resumes_and_keeps_the_scales_it_finished(tiny_run, tmp_path, monkeypatch):
    import sample
    args = ["--ckpt", tiny_run, "--num", "6", "--steps", "2", "--cfg-scale", "1,3", "--shard-size", "3", "--batch",
            "3", "--out", str(tmp_path / "a/s.npz")]
    sample.main(args[:-1] + [str(tmp_path / "whole/s.npz")])  # uninterrupted
    generate, calls = sample.generate, []

    def killed_in_the_second_scale(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # scale 1: two batches; scale 3: its first batch is done, then Ctrl-C
            raise KeyboardInterrupt
        return generate(*a, **k)
    monkeypatch.setattr(sample, "generate", killed_in_the_second_scale)
    with pytest.raises(KeyboardInterrupt):
        sample.main(args)
    monkeypatch.setattr(sample, "generate", generate)
    done = (tmp_path / "a/s-cfg1.npz").read_bytes()
    sample.main(args)  # the same command: scale 1 kept as it is, scale 3 resumed from its shard
    assert (tmp_path / "a/s-cfg1.npz").read_bytes() == done
    for s in ("1", "3"):
        assert (tmp_path / f"a/s-cfg{s}.npz").read_bytes() == (tmp_path / f"whole/s-cfg{s}.npz").read_bytes()
    with pytest.raises(ValueError, match="s-cfg1.npz exists, made with other weights or settings"):
        sample.main(args + ["--seed", "1"])


def test_a_mistyped_command_is_named_with_the_commands_there_are(tiny_run):
    r = run_cli("evaluate.py", "reprot", tiny_run)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "unknown command 'reprot'" in r.stderr and \
        "report" in r.stderr and "diversity" in r.stderr, r.stderr
    r = run_cli("ext.adapters", "tran", "--data", "x")
    assert r.returncode == 1 and "'tran' is not one" in r.stderr and "controls,train,sample" in r.stderr, r.stderr
