"""What a new user meets (issue 19): messages that say what exists and what to do, outputs that say where they went."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import corrupt
import evaluate
import plumbing
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--preset", "tiny", "--batch-size", "8", "--warmup", "1", "--lr", "1e-3", "--grid-steps", "1"]


def interrupted_at(monkeypatch, step):
    """train_step raising KeyboardInterrupt (Ctrl-C) at the given step."""
    calls, real = [], train.train_step

    def step_fn(*a, **k):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "train_step", step_fn)


@pytest.mark.slow
def test_ctrl_c_says_what_there_is_to_continue_from(shapes, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "r")
    interrupted_at(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt, match=r"no checkpoint yet \(the first is written at step 5\)"):
        train.main(["--data", f"{shapes}/train", *TINY, "--steps", "10", "--ckpt-every", "5", "--out", out])
    interrupted_at(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt, match=rf"{out}/ckpt.pt holds step 2: continue with --resume {out}"):
        train.main(["--data", f"{shapes}/train", *TINY, "--steps", "10", "--ckpt-every", "2", "--out", out])
    monkeypatch.undo()
    capsys.readouterr()
    train.main(["--resume", out, "--steps", "4"])
    printed = capsys.readouterr().out
    assert f"resuming {out} from step 2" in printed and f"trained to step 4: {out}/ckpt.pt" in printed
    assert f"grid {out}/grid-0000004.png" in printed
    train.main(["--resume", out, "--steps", "4"])
    assert "is at step 4 of --steps 4 already" in capsys.readouterr().out
    r = subprocess.run([sys.executable, f"{ROOT}/train.py", "--help"], capture_output=True, text=True)
    assert "runs/<dataset>-<preset>[-text]-eta<eta>[-cep<kind>]" in " ".join(r.stdout.split())


def test_labels_by_name_and_what_labels_are_wanted(tiny_run, tmp_path, capsys):
    sample.main(["--ckpt", tiny_run, "--num", "4", "--steps", "1", "--labels", "red disk,7", "--out",
                 str(tmp_path / "a.npz")])
    assert np.load(tmp_path / "a.npz")["arr_1"].tolist() == [0, 7, 0, 7]
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'a.npz'}" in out and f"and {tmp_path / 'a.png'}" in out
    with pytest.raises(ValueError, match=r"class indices in \[0, 10\) or names \(red disk, red square"):
        sample.main(["--ckpt", tiny_run, "--labels", "red", "--out", str(tmp_path / "b.npz")])
    preview = Image.open(tmp_path / "a.png")  # one row per class, its name at the row's start
    assert preview.size == (100 + 2 * 32, 2 * 32)


def test_an_existing_samples_file_is_not_replaced_silently(tiny_run, tmp_path, capsys):
    args = ["--ckpt", tiny_run, "--num", "2", "--steps", "1", "--out", str(tmp_path / "s.npz")]
    sample.main(args)
    (tmp_path / "classify.json").write_text(json.dumps(dict(accuracy=1.0, samples=str(tmp_path / "s.npz"))))
    (tmp_path / "other.json").write_text(json.dumps(dict(samples=str(tmp_path / "t.npz"))))
    before = (tmp_path / "s.npz").read_bytes()
    sample.main(args)  # the same command again: the finished file is kept (its key is this run's)
    assert (tmp_path / "s.npz").read_bytes() == before and "is done" in capsys.readouterr().out
    with pytest.raises(ValueError, match="s.npz exists, made with other weights or settings: pass --overwrite"):
        sample.main(args + ["--seed", "1"])  # another seed: other samples, never mixed in
    sample.main(args + ["--overwrite"])
    assert not (tmp_path / "classify.json").exists() and (tmp_path / "other.json").exists()
    assert "removed" in capsys.readouterr().out


def test_corrupt_prints_and_writes_only_with_out(shapes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corrupt.main(["--data", f"{shapes}/train", "--eta", "0.1"])
    assert "nothing written" in capsys.readouterr().out and not os.listdir(tmp_path)


def test_long_captions_are_wrapped_whole_beside_their_row(tmp_path):
    images = np.zeros((4, 16, 16, 3), np.uint8)
    caption = "a small red disk in the top left corner of the image"
    plumbing.save_grid(str(tmp_path / "g.png"), images, nrow=2, labels=[caption, "x"])
    img = Image.open(tmp_path / "g.png")
    assert img.size[0] == 100 + 2 * 16 and img.size[1] > 2 * 16  # the first row grew to hold every word


def test_report_goes_beside_the_runs_and_says_so(tmp_path, capsys):
    runs = tmp_path / "runs"
    for eta in (0.0, 0.1):
        d = runs / f"e{eta}"
        d.mkdir(parents=True)
        train_cfg = dict(cond="class", eta=eta, corruption="symmetric", corruption_mode="fixed", cep="none",
                         cep_gamma=1.0)
        (d / "metrics.json").write_text(json.dumps(dict(fid=10 - eta, sfid=1, is_mean=2, precision=0.5, recall=0.4,
                                                        num_samples=10, settings=dict(config=dict(train=train_cfg)))))
    evaluate.main(["report", str(runs / "e0.0"), str(runs / "e0.1")])
    assert (runs / "report.md").exists() and (runs / "report.png").exists()
    assert f"wrote {runs / 'report'}.md" in capsys.readouterr().out
