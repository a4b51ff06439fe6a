"""Released DiTs converted on load (model.load_model): DiT's own checkpoint files and diffusers' DiTTransformer2DModel,
alone or in a DiTPipeline. Randomly initialised small diffusers models are built and saved here, converted, and
compared with diffusers' own forward pass and pipeline on the same inputs: no download."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")  # requirements-latent.txt, installed by CI through requirements-dev.txt

import model  # noqa: E402
import prepare_data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from tiny_vae import make_autoencoder  # noqa: E402
import diffusion  # noqa: E402
import plumbing  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)  # float32 round-off: the same operations in another order (fused qkv, SDPA)


def random_dit(num_classes=10, heads=2, head_dim=16, layers=2, norm_eps=1e-5, seed=0):
    """A diffusers DiT with every weight drawn at random (none left zero), one embedder shared by all blocks as in
    checkpoints converted from DiT's code, in eval mode (no label dropout)."""
    torch.manual_seed(seed)
    net = diffusers.DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4,
                                          out_channels=8, num_layers=layers, sample_size=8, patch_size=2,
                                          num_embeds_ada_norm=num_classes, norm_eps=norm_eps)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
        for block in net.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(net.transformer_blocks[0].norm1.emb.state_dict())
    return net.eval()


def ours(ckpt):
    net = model.build(ckpt["config"])[0]
    net.load_state_dict(ckpt["ema"])
    return net.eval()


def inputs(num_classes, n=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 4, 8, 8, generator=g), torch.tensor([0, 500, 999])[:n],
            torch.tensor([1, num_classes - 1, num_classes])[:n])  # the last: the null class


def test_a_diffusers_dit_converts_exactly(tmp_path):
    theirs = random_dit()
    theirs.save_pretrained(tmp_path / "dit")
    ckpt = model.load_model(str(tmp_path / "dit"))
    x, t, y = inputs(10)
    with torch.no_grad():
        want, got = theirs(x, timestep=t, class_labels=y).sample[:, :4], ours(ckpt)(x, t, y)
    torch.testing.assert_close(got, want, **TOL)  # the variance half of the output dropped
    m = ckpt["config"]["model"]
    assert (m["freq_shift"], m["mlp_eps"], m["depth"], m["dim"], m["heads"], m["num_classes"]) == \
        (1, 1e-5, 2, 32, 2, 10)
    assert ckpt["config"]["source"]["kind"] == "diffusers" and ckpt["step"] == 0


def dit_checkpoint(theirs):
    """The state dict DiT's models.py would hold for the same weights (the names of DiT's convert script for
    diffusers, read backwards): fused qkv, t_embedder, y_embedder, final_layer; a fixed pos_embed."""
    sd, e = theirs.state_dict(), "transformer_blocks.0.norm1.emb."
    out = {"pos_embed": torch.zeros(1, 16, theirs.inner_dim)}
    names = {"x_embedder.proj": "pos_embed.proj", "t_embedder.mlp.0": e + "timestep_embedder.linear_1",
             "t_embedder.mlp.2": e + "timestep_embedder.linear_2", "final_layer.adaLN_modulation.1": "proj_out_1",
             "final_layer.linear": "proj_out_2"}
    for i in range(len(theirs.transformer_blocks)):
        b = f"transformer_blocks.{i}."
        names.update({f"blocks.{i}.attn.proj": b + "attn1.to_out.0", f"blocks.{i}.mlp.fc1": b + "ff.net.0.proj",
                      f"blocks.{i}.mlp.fc2": b + "ff.net.2", f"blocks.{i}.adaLN_modulation.1": b + "norm1.linear"})
        for p in ("weight", "bias"):
            out[f"blocks.{i}.attn.qkv.{p}"] = torch.cat([sd[f"{b}attn1.to_{q}.{p}"] for q in "qkv"])
    out.update({f"{k}.{p}": sd[f"{v}.{p}"] for k, v in names.items() for p in ("weight", "bias")})
    out["y_embedder.embedding_table.weight"] = sd[e + "class_embedder.embedding_table.weight"]
    return out


def test_dits_own_checkpoint_file_converts_exactly(tmp_path):
    # DiT's own model: timestep frequencies without diffusers' shift, every LayerNorm at eps 1e-6 (dit-tiny's shape)
    theirs = random_dit(heads=4, head_dim=32, layers=4, norm_eps=1e-6)
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    torch.save(dit_checkpoint(theirs), tmp_path / "DiT-tiny.pt")
    ckpt = model.load_model(str(tmp_path / "DiT-tiny.pt"))
    x, t, y = inputs(10)
    with torch.no_grad():
        want, got = theirs(x, timestep=t, class_labels=y).sample[:, :4], ours(ckpt)(x, t, y)
    torch.testing.assert_close(got, want, **TOL)
    m = ckpt["config"]["model"]
    assert m["preset"] == "dit-tiny" and (m["freq_shift"], m["mlp_eps"], m["resolution"]) == (0, 1e-6, 8)
    assert ckpt["config"]["source"]["sha256"] == plumbing.file_hash(str(tmp_path / "DiT-tiny.pt"))
    with pytest.raises(ValueError, match="needs? --vae|without its autoencoder"):  # DiT's files hold no autoencoder
        model.latent_decoder(ckpt["config"]["data"]["latent"])


@pytest.mark.slow
def test_the_pipeline_and_sample_py_give_the_same_images(tmp_path, monkeypatch):
    """DiTPipeline with DDIM over all 1000 steps (the one DDIM walk diffusers and slightdiff share exactly: diffusers
    steps from t to t - 1000 // steps, slightdiff to the next of its own timesteps), guidance 1.5 on all latent
    channels, the tiny autoencoder decoding; the same initial noise, slightdiff's draw for sample i."""
    ddim = diffusers.DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                                   set_alpha_to_one=True, timestep_spacing="linspace")
    pipe = diffusers.DiTPipeline(transformer=random_dit(num_classes=1000), scheduler=ddim,
                                 vae=make_autoencoder("kl", str(tmp_path / "v")))
    pipe.save_pretrained(tmp_path / "pipe")
    labels = [3, 999, 42, 7]
    noise = diffusion.sample_noise(0, range(4), (4, 8, 8))
    monkeypatch.setattr(diffusers.pipelines.dit.pipeline_dit, "randn_tensor", lambda *a, **k: noise.clone())
    theirs = pipe(labels, guidance_scale=1.5, num_inference_steps=1000, output_type="np").images
    out = str(tmp_path / "s.npz")
    sample.main(["--ckpt", str(tmp_path / "pipe"), "--num", "4", "--labels", "3,999,42,7", "--steps", "1000",
                 "--cfg-scale", "1.5", "--batch", "4", "--device", "cpu", "--out", out])
    got = np.load(out)["arr_0"].astype(int)
    want = (theirs * 255).round().astype(int)  # their [0, 1] images as slightdiff writes them
    assert got.shape == want.shape == (4, 16, 16, 3)
    assert np.abs(got - want).max() <= 1 and (got != want).mean() < 0.01  # rounding at a .5 boundary, rarely
    settings = json.loads(str(np.load(out)["settings"]))
    assert settings["config"]["source"]["id"] == os.path.abspath(tmp_path / "pipe")


def test_what_cannot_be_represented_is_refused_in_one_line(tmp_path, monkeypatch):
    theirs = random_dit()
    with torch.no_grad():
        theirs.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1e-3)
    theirs.save_pretrained(tmp_path / "differ")
    with pytest.raises(ValueError, match="block 1's timestep_embedder.linear_1.bias differs from block 0's"):
        model.load_model(str(tmp_path / "differ"))
    torch.save(dit_checkpoint(random_dit()), tmp_path / "odd.pt")  # depth 2, width 32: no DiT model has it
    with pytest.raises(ValueError, match="number of heads is unknown"):
        model.load_model(str(tmp_path / "odd.pt"))
    make_autoencoder("kl", str(tmp_path / "vae"))  # a diffusers folder, but not of a DiT
    with pytest.raises(ValueError, match="cannot load .* as a slightdiff run, a DiT checkpoint or a diffusers DiT"):
        model.load_model(str(tmp_path / "vae"))
    monkeypatch.setattr(__import__("huggingface_hub").constants, "HF_HUB_OFFLINE", True)  # no retries for a minute
    with pytest.raises(ValueError, match="hub id reachable from here"):  # no network here: one line, no traceback
        model.load_model("DiffusionNoise/no-such-model-here")
    with pytest.raises(ValueError, match="is a released model, not a run folder: give --out"):
        theirs = random_dit()
        theirs.save_pretrained(tmp_path / "same")
        sample.main(["--ckpt", str(tmp_path / "same"), "--num", "2", "--device", "cpu"])


@pytest.fixture(scope="module")
def latent_data(shapes16, tmp_path_factory):
    """The 16x16 shapes through a tiny KL autoencoder: 8x8x4 latents, the released DiTs' input shape here."""
    root = tmp_path_factory.mktemp("released-latents")
    make_autoencoder("kl", str(root / "ae"))
    prepare_data.prepare_latents(f"{shapes16}/train", str(root), "shapes", "train", str(root / "ae"), batch=100,
                                 shard_size=100)
    return str(root / "shapes/train"), str(root / "ae")


def test_fine_tuning_a_released_dit_with_corruption_and_cep(latent_data, tmp_path):
    data, _ = latent_data
    random_dit().save_pretrained(tmp_path / "released")
    out = str(tmp_path / "run")
    train.main(["--data", data, "--preset", "dit-tiny", "--init-from", str(tmp_path / "released"), "--eta", "0.1",
                "--cep", "uniform", "--batch-size", "8", "--steps", "2", "--warmup", "1", "--ckpt-every", "2",
                "--log-every", "1", "--grid-steps", "1", "--out", out])
    cfg = json.load(open(f"{out}/config.json"))
    assert cfg["source"]["kind"] == "diffusers" and cfg["source"]["id"] == str(tmp_path / "released")
    assert (cfg["model"]["freq_shift"], cfg["model"]["dim"], cfg["train"]["eta"]) == (1, 32, 0.1)
    log = [json.loads(l) for l in open(f"{out}/log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(r["loss"]) for r in log)
    start = model.load_model(str(tmp_path / "released"))["ema"]
    trained = torch.load(f"{out}/ckpt.pt", weights_only=True)["model"]
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)


def test_a_unet_run_cannot_start_a_dit(tiny_run, shapes):
    with pytest.raises(ValueError, match=r"is a UNET \(tiny\) and --preset dit-tiny is not: start from a run"):
        train.main(["--data", f"{shapes}/train", "--preset", "dit-tiny", "--init-from", tiny_run, "--steps", "1"])


def test_a_non_finite_latent_is_named_with_its_row(latent_data, tmp_path):
    data, _ = latent_data
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    z = np.load(bad / "latents.npy")
    z[17, 0, 0, 1, 2, 3] = np.nan
    np.save(bad / "latents.npy", z)
    with pytest.raises(ValueError, match="row 17 of latents.npy is not finite"):
        train.main(["--data", str(bad), "--preset", "dit-tiny", "--batch-size", "8", "--steps", "1",
                    "--out", str(tmp_path / "run")])


def test_an_autoencoder_that_moved_is_named_with_the_flag_that_finds_it(latent_data, tmp_path):
    data, ae = latent_data
    moved_data, moved_ae = tmp_path / "data", tmp_path / "ae"
    shutil.copytree(data, moved_data)
    shutil.copytree(ae, moved_ae)
    meta = json.load(open(moved_data / "meta.json"))
    meta["latent"]["vae"] = str(moved_ae)
    json.dump(meta, open(moved_data / "meta.json", "w"))
    out = str(tmp_path / "run")
    train.main(["--data", str(moved_data), "--preset", "dit-tiny", "--batch-size", "8", "--steps", "1",
                "--ckpt-every", "1", "--grid-steps", "1", "--out", out])
    shutil.move(moved_ae, tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=f"the autoencoder recorded in the run, {moved_ae}, is not there any more.*"
                                         f"give --vae"):
        sample.main(["--ckpt", out, "--num", "2", "--device", "cpu"])
    sample.main(["--ckpt", out, "--num", "2", "--device", "cpu", "--vae", str(tmp_path / "elsewhere")])


def test_a_mistyped_run_path_is_not_looked_up_on_the_hub(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)  # runs/typo looks like a hub id, but runs/ is a folder here: a missing run
    with pytest.raises(FileNotFoundError, match="checkpoint runs/typo not found"):
        model.load_model("runs/typo")
