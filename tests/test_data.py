import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import plumbing
import prepare_data
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shapes_split_format_and_determinism(shapes, tmp_path):
    images = np.load(f"{shapes}/train/images.npy", mmap_mode="r")
    labels = np.load(f"{shapes}/train/labels.npy")
    meta = json.load(open(f"{shapes}/train/meta.json"))
    assert isinstance(images, np.memmap) and images.dtype == np.uint8 and images.shape == (200, 32, 32, 3)
    assert labels.dtype == np.int64 and np.bincount(labels).tolist() == [20] * 10
    assert meta["num_classes"] == 10 and meta["count"] == 200 and meta["resolution"] == 32
    assert meta["source_checksum"].startswith("sha256:") and meta["skipped"] == []
    again, _, captions = prepare_data.make_shapes(200, seed=0)
    assert np.array_equal(again, images)
    stored = [json.loads(l) for l in open(f"{shapes}/train/captions.jsonl", encoding="utf-8")]
    assert stored == captions and len(stored) == 200


def test_shapes_captions_name_colour_and_shape_in_varied_wording():
    _, labels, captions = prepare_data.make_shapes(500, seed=0)
    for y, caps in zip(labels, captions):
        assert len(caps) == 2 and all(prepare_data.SHAPES_CLASSES[y] in c for c in caps), caps
    flat = [c for caps in captions for c in caps]
    assert len({c.replace("red", "blue") for c in flat}) > 30  # sizes, positions, templates
    assert any(" left" in c for c in flat) and any("top right" in c for c in flat) and "a red disk" in flat


def test_shapes_classes_differ_in_colour():
    images, labels, _ = prepare_data.make_shapes(200, seed=0)
    mean_rgb = np.array([images[labels == c].reshape(-1, 3).mean(0) for c in range(10)])
    assert np.all(mean_rgb[:5, 0] > mean_rgb[:5, 2])  # red classes
    assert np.all(mean_rgb[5:, 2] > mean_rgb[5:, 0])  # blue classes


def fake_cifar_tarball(path):
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
            d = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist(),
                 b"batch_label": b"x", b"filenames": [b"f.png"] * n}
            blob = pickle.dumps(d, protocol=3)  # bytes opcodes, as Python 2 str loads
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return plumbing.file_hash(path, "md5")


def test_cifar_reader_and_md5_check(tmp_path):
    archive = str(tmp_path / "cifar.tar.gz")
    md5 = fake_cifar_tarball(archive)
    with pytest.raises(ValueError, match="has md5 .* expected c58f30108f718f92721af3b95e74349a"):
        prepare_data.prepare_cifar10(str(tmp_path / "data"), archive)
    prepare_data.prepare_cifar10(str(tmp_path / "data"), archive, expected_md5=md5)
    train_imgs = np.load(tmp_path / "data/cifar10/train/images.npy")
    assert train_imgs.shape == (20, 32, 32, 3) and np.load(tmp_path / "data/cifar10/test/labels.npy").shape == (3,)
    # channel-first rows of 1024 red, then green, then blue values become HWC pixels
    raw = tarfile.open(archive).extractfile("cifar-10-batches-py/data_batch_1").read()
    first = pickle.loads(raw, encoding="bytes")[b"data"][0]
    assert train_imgs[0, 0, 1].tolist() == [first[1], first[1025], first[2049]]


def test_restricted_unpickler_refuses_code():
    evil = pickle.dumps({b"data": os.getcwd}, protocol=2)  # references posix.getcwd
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle"):
        prepare_data.read_cifar_batch(evil)


def test_missing_archive_and_no_network_messages(tmp_path):
    r = subprocess.run([sys.executable, f"{ROOT}/prepare_data.py", "--dataset", "cifar10", "--archive",
                        str(tmp_path / "none.tar.gz"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_center_crop_matches_adm_sizes():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8))
    out = prepare_data.center_crop_arr(img, 64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    flat = Image.new("RGB", (97, 131), (10, 200, 30))
    assert np.all(prepare_data.center_crop_arr(flat, 32) == [10, 200, 30])


def test_imagefolder_skips_unreadable_files(tmp_path):
    src = tmp_path / "src"
    for c, colour in [("ants", (255, 0, 0)), ("bees", (0, 0, 255))]:
        (src / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40 + i, 50), colour).save(src / c / f"{i}.png")
    (src / "bees" / "broken.jpg").write_bytes(b"not an image")
    prepare_data.prepare_imagefolder(str(src), str(tmp_path / "data"), "toy", "train", 16, workers=1)
    out = tmp_path / "data/toy/train"
    images, labels = np.load(out / "images.npy"), np.load(out / "labels.npy")
    meta = json.load(open(out / "meta.json"))
    assert images.shape == (6, 16, 16, 3) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert meta["class_names"] == ["ants", "bees"] and meta["count"] == 6
    assert len(meta["skipped"]) == 1 and "broken.jpg" in meta["skipped"][0]
    assert np.all(images[:3, ..., 0] == 255) and np.all(images[3:, ..., 2] == 255)
    assert sorted(os.listdir(tmp_path / "data/toy")) == ["train"]  # no temp files left


def test_subset_is_seeded_and_sized(shapes):
    _, labels, index, _ = train.load_dataset(f"{shapes}/train", 64, data_seed=0)
    _, _, again, _ = train.load_dataset(f"{shapes}/train", 64, data_seed=0)
    _, _, other, _ = train.load_dataset(f"{shapes}/train", 64, data_seed=1)
    assert len(index) == len(labels) == 64 and len(set(index)) == 64
    assert np.array_equal(index, again) and not np.array_equal(index, other)
    with pytest.raises(ValueError, match="--subset must be in"):
        train.load_dataset(f"{shapes}/train", 201, data_seed=0)


def test_cifar_download_without_network_says_where_to_put_the_tarball(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise OSError("network is unreachable")
    monkeypatch.setattr(__import__("urllib.request").request, "urlopen", offline)
    with pytest.raises(OSError, match="pass --archive PATH") as e:
        prepare_data.prepare_cifar10(str(tmp_path))
    assert "cifar-10-python.tar.gz" in str(e.value) and "\n" not in str(e.value)
    assert not any(p.name.endswith(".part") for p in (tmp_path / "downloads").iterdir())


def caption_folder(tmp_path):
    src = tmp_path / "src"
    (src / "00000").mkdir(parents=True)
    for i, (w, h) in enumerate([(40, 30), (20, 50), (33, 33)]):
        Image.new("RGB", (w, h), (40 * i, 0, 0)).save(src / "00000" / f"{i}.jpg")
    (src / "00000" / "3.jpg").write_bytes(b"")  # zero bytes: skipped, its caption dropped
    return src


@pytest.mark.parametrize("fmt", ["tsv", "jsonl"])
def test_imagefolder_with_captions_keeps_pairs_in_order(tmp_path, fmt):
    src = caption_folder(tmp_path)
    rows = [("00000/1.jpg", "a tall image"), ("00000/0.jpg", "a wide image"), ("00000/3.jpg", "empty file"),
            ("00000/1.jpg", "it is tall"), ("00000/2.jpg", "un carré rouge")]
    path = tmp_path / f"caps.{fmt}"
    if fmt == "tsv":
        path.write_text("image\tcaption\n" + "".join(f"{p}\t{c}\n" for p, c in rows), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps({"image": p, "caption": c}) + "\n" for p, c in rows), encoding="utf-8")
    prepare_data.prepare_imagefolder(str(src), str(tmp_path / "data"), "cc", "train", 16, 1, str(path))
    out = tmp_path / "data/cc/train"
    captions = [json.loads(l) for l in open(out / "captions.jsonl", encoding="utf-8")]
    assert captions == [["a tall image", "it is tall"], ["a wide image"], ["un carré rouge"]]
    assert np.load(out / "images.npy").shape == (3, 16, 16, 3) and np.load(out / "labels.npy").tolist() == [0, 0, 0]
    assert np.load(out / "sizes.npy").tolist() == [[50, 20], [30, 40], [33, 33]]  # original (height, width)
    meta = json.load(open(out / "meta.json"))
    assert meta["num_classes"] == 1 and len(meta["skipped"]) == 1 and "3.jpg" in meta["skipped"][0]


@pytest.mark.parametrize("content,message", [
    (b"00000/0.jpg\ta wide image\n00000/1.jpg\t\xff\xfe caption\n", "line 2 is not UTF-8"),
    (b"00000/0.jpg\n", "line 1: want an image path and a non-empty caption"),
    (b"\n\n", "holds no image-caption pairs"),
])
def test_bad_caption_files_give_one_line_errors(tmp_path, content, message):
    src = caption_folder(tmp_path)
    (tmp_path / "caps.tsv").write_bytes(content)
    r = subprocess.run([sys.executable, f"{ROOT}/prepare_data.py", "--dataset", "imagefolder", "--src", str(src),
                        "--captions", str(tmp_path / "caps.tsv"), "--out", str(tmp_path / "data")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.npy"))
