"""The paper's LDM-4 models (ext/released.py): ldm4 is CompVis' cin256-v2 block for block, and the released
LDMClassToImagePipeline (the authors' diffusers fork) and LDMTextToImagePipeline (CC3M, with a BERT) convert on load.
Small random diffusers models are built and saved here in those layouts, converted, and compared with diffusers' own
forward pass and with the pipelines' loops re-stated: no download."""
import argparse
import json
import shutil
import types

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import diffusion  # noqa: E402
import model  # noqa: E402
import plumbing  # noqa: E402
import prepare_data  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from ext import released  # noqa: E402
from tiny_vae import make_autoencoder  # noqa: E402

UNET = dict(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32, attention_head_dim=1, norm_num_groups=32)
DDIM = dict(beta_schedule="scaled_linear", beta_start=0.0015, beta_end=0.0195, clip_sample=False,
            set_alpha_to_one=True, timestep_spacing="linspace")
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "disk", "ring", "square", "cross",
         "triangle", "small", "large", "on", "the", "left", "right", "in", "centre", "top", "bottom", "corner", "at",
         "dark", "background"]


def randomised(net, seed):
    """Every weight drawn N(0, 0.2^2): zero-initialised layers (proj_out, conv_out) would hide a wrong mapping."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net.eval()


def class_pipeline(path, n_classes=11, width=32, unet=None):
    """An LDMClassToImagePipeline folder in the fork's layout, every weight random; the class embedder's last row is
    the null class."""
    unet = randomised(diffusers.UNet2DConditionModel(**dict(UNET, **(unet or {}))), 0)
    unet.save_pretrained(path / "unet")
    make_autoencoder("vq", str(path / "vqvae"))
    diffusers.DDIMScheduler(**DDIM).save_pretrained(path / "scheduler")
    (path / "class_embedder").mkdir()
    emb = torch.randn(n_classes, width, generator=torch.Generator().manual_seed(1))
    __import__("safetensors.torch").torch.save_file({"embedding.weight": emb},
                                                    str(path / "class_embedder/diffusion_pytorch_model.safetensors"))
    json.dump(dict(_class_name="ClassEmbedder", n_classes=n_classes, embed_dim=width),
              open(path / "class_embedder/config.json", "w"))
    json.dump(dict(_class_name="LDMClassToImagePipeline", _diffusers_version="0.27.0",
                   class_embedder=["latent_diffusion", "ClassEmbedder"], unet=["diffusers", "UNet2DConditionModel"],
                   vqvae=["diffusers", "VQModel"], scheduler=["diffusers", "DDIMScheduler"]),
              open(path / "model_index.json", "w"))
    return unet, emb


def text_pipeline(path):
    """An LDMTextToImagePipeline with a tiny BERT (word-level vocabulary) beside the same UNet, every weight random."""
    (path / "vocab").mkdir(parents=True)
    (path / "vocab/vocab.txt").write_text("\n".join(WORDS) + "\n")
    tok = transformers.BertTokenizer(str(path / "vocab/vocab.txt"))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=64,
                                                          max_position_embeddings=80), add_pooling_layer=False)
    pipe = diffusers.LDMTextToImagePipeline(vqvae=make_autoencoder("vq", str(path / "vq")), bert=randomised(bert, 2),
                                            tokenizer=tok, unet=randomised(diffusers.UNet2DConditionModel(**UNET), 3),
                                            scheduler=diffusers.DDIMScheduler(**DDIM))
    pipe.save_pretrained(path / "pipe")
    return pipe


def ours(ckpt, make=None):
    net = (make or model.build)(ckpt["config"])
    net = net[0] if isinstance(net, tuple) else net
    net.load_state_dict(ckpt["ema"])
    return net.eval()


def pipeline_loop(unet, cond, null, noise, scale, decode):
    """The pipelines' 20-line loop, re-stated: DDIM over all 1000 steps, guidance on [uncond, cond] in one pass."""
    ddim = diffusers.DDIMScheduler(**DDIM)
    ddim.set_timesteps(1000)
    latents = noise.clone()
    with torch.no_grad():
        for t in ddim.timesteps:
            u, c = unet(torch.cat([latents] * 2), t, encoder_hidden_states=torch.cat([null, cond])).sample.chunk(2)
            latents = ddim.step(u + scale * (c - u), t, latents).prev_sample
        image = (decode(latents) / 2 + 0.5).clamp(0, 1)
    return (image.permute(0, 2, 3, 1).numpy() * 255).round().astype(int)


def test_ldm4_is_cin256_v2_block_for_block():
    with torch.device("meta"):
        net = model.Denoiser(1000, 64, 3, "ldm4")
        theirs = diffusers.UNet2DConditionModel(**dict(UNET, sample_size=64, layers_per_block=2, cross_attention_dim=512,
                                                       block_out_channels=(192, 384, 576, 960),
                                                       down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3,
                                                       up_block_types=("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",)))
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(net.unet) == count(theirs) == 400_920_579 and count(net) == 400_920_579 + 512_512  # 1001 x 512
    assert net.class_ctx == 512 and net.unet.down[-1].attn.heads == 1 and net.unet.mid[0].attn.proj_in is not None


def test_an_ldm4_checkpoint_of_the_old_block_loads_as_it_was(tmp_path):
    torch.manual_seed(0)
    old = model.Denoiser(10, 8, 3, "ldm4", ch=32, transformer=False, ff=True).eval()  # the block before cin256-v2
    config = dict(model=dict(num_classes=10, resolution=8, channels=3, preset="ldm4", cond="class", ch=32),
                  diffusion=dict(schedule="scaled_linear", clip=False), train={}, data={})  # as the old train.py wrote
    torch.save(dict(format=plumbing.CKPT_FORMAT, model=old.state_dict(), ema=old.state_dict(), opt={}, step=1,
                    config=config), tmp_path / "old.pt")
    ckpt = model.load_model(str(tmp_path / "old.pt"))
    assert ckpt["config"]["model"]["transformer"] is False
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([3, 900]), torch.tensor([1, 10])
    with torch.no_grad():
        assert torch.equal(ours(ckpt)(x, t, y), old(x, t, y))


@pytest.mark.slow
def test_a_released_class_ldm_converts_exactly_and_samples_as_its_pipeline(tmp_path):
    theirs, emb = class_pipeline(tmp_path / "ldm")
    ckpt = model.load_model(str(tmp_path / "ldm"))
    m = ckpt["config"]["model"]
    assert (m["preset"], m["num_classes"], m["class_ctx"], m["ch_mult"], m["attn_res"]) == ("ldm4", 10, 32, [1, 2], [4])
    assert ckpt["config"]["data"]["latent"]["scale"] == 1.0 and ckpt["config"]["data"]["latent"]["kind"] == "vq"
    x, t, y = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999]), torch.tensor([3, 7, 10])  # 10: the null class
    with torch.no_grad():
        want, got = theirs(x, t, encoder_hidden_states=emb[y][:, None]).sample, ours(ckpt)(x, t, y)
    assert (got - want).abs().max() < 1e-4
    labels, noise = [3, 7, 0, 9], diffusion.sample_noise(0, range(4), (3, 8, 8))
    vq = diffusers.VQModel.from_pretrained(tmp_path / "ldm/vqvae")
    want = pipeline_loop(theirs, emb[labels][:, None], emb[[10] * 4][:, None], noise, 1.5,
                         lambda z: vq.decode(z).sample)  # the fork: no latent scale, the decoder re-quantises
    out = str(tmp_path / "s.npz")
    sample.main(["--ckpt", str(tmp_path / "ldm"), "--num", "4", "--labels", "3,7,0,9", "--steps", "1000",
                 "--cfg-scale", "1.5", "--batch", "4", "--device", "cpu", "--out", out])
    got = np.load(out)["arr_0"].astype(int)
    assert got.shape == want.shape == (4, 16, 16, 3) and np.abs(got - want).max() <= 1


@pytest.mark.slow
def test_a_released_text_ldm_converts_exactly_and_samples_as_its_pipeline(tmp_path):
    pipe = text_pipeline(tmp_path)
    spec = str(tmp_path / "pipe")
    with pytest.raises(ValueError, match="text LDM with a BERT: .* python -m ext.released"):
        model.load_model(spec)  # sample.py and train.py: one line
    ckpt = model.load_model(spec, ext=True)
    net = ours(ckpt, lambda config: released.BertDenoiser(**config["model"]))
    prompts = ["a red disk", "a small blue ring on the left", ""]  # "": the null prompt
    ids = released.tokens(prompts, ckpt["config"]["model"]["tokenizer"])
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([0, 500, 999])
    with torch.no_grad():
        want = pipe.unet(x, t, encoder_hidden_states=pipe.bert(ids)[0]).sample
        assert (net(x, t, ids) - want).abs().max() < 1e-4
        assert torch.equal(net.null_cond(ids[:1])[0], ids[2])
        noise, scale = diffusion.sample_noise(0, range(2), (3, 8, 8)), pipe.vqvae.config.scaling_factor
        want = pipeline_loop(pipe.unet, pipe.bert(ids[:2])[0], pipe.bert(ids[2:].expand(2, -1))[0], noise, 2.0,
                             lambda z: pipe.vqvae.decode(z / scale).sample)  # upstream divides by the scale
    (tmp_path / "p.txt").write_text("a red disk\na small blue ring on the left\n")
    out = str(tmp_path / "s.npz")
    released.main(["sample", "--ckpt", spec, "--num", "2", "--prompts", str(tmp_path / "p.txt"), "--steps", "1000",
                   "--cfg-scale", "2", "--batch", "2", "--device", "cpu", "--out", out])
    got = np.load(out)["arr_0"].astype(int)
    assert got.shape == want.shape and np.abs(got - want).max() <= 1


def test_fine_tuning_the_released_ldms_changes_them_and_records_their_source(shapes16, tmp_path):
    class_pipeline(tmp_path / "ldm")
    text_pipeline(tmp_path / "text")
    prepare_data.prepare_latents(f"{shapes16}/train", str(tmp_path), "shapes", "train", str(tmp_path / "ldm/vqvae"),
                                 batch=100, shard_size=100)  # 8x8x3 latents with the 16x16 shapes' captions
    common = ["--data", str(tmp_path / "shapes/train"), "--preset", "ldm4", "--batch-size", "4", "--steps", "2",
              "--warmup", "1", "--ckpt-every", "2", "--grid-steps", "1", "--eta", "0.1", "--cep", "uniform"]
    train.main(common + ["--init-from", str(tmp_path / "ldm"), "--out", str(tmp_path / "run")])
    released.main(["train", *common, "--cond", "text", "--init-from", str(tmp_path / "text/pipe"), "--out",
                   str(tmp_path / "text-run")])
    for spec, run, ext in ((tmp_path / "ldm", tmp_path / "run", False), (tmp_path / "text/pipe", tmp_path / "text-run",
                                                                          True)):
        start, done = model.load_model(str(spec), ext=True)["ema"], plumbing.load_checkpoint(str(run), ext=True)
        assert done["config"]["source"]["id"] == str(spec) and start.keys() == done["model"].keys()
        assert any(not torch.equal(start[k], done["model"][k]) for k in start)
    assert any(k.startswith("text.encoder.") for k in done["model"])  # the BERT trains with the network
    with pytest.raises(ValueError, match="give --text-encoder BERT, or --init-from a text LDM"):
        released.main(["train", *common, "--cond", "text", "--out", str(tmp_path / "no-bert")])
    assert not (tmp_path / "no-bert").exists()


def test_what_the_ldm4_block_cannot_take_is_refused_in_one_line(tmp_path):
    cases = [("width", dict(width=16), "class embedder is 16 wide"),
             ("linear", dict(unet=dict(use_linear_projection=True)), "use_linear_projection = True"),
             ("heads", dict(unet=dict(attention_head_dim=2)), "attention_head_dim = 2")]
    for name, kw, message in cases:
        class_pipeline(tmp_path / name, **kw)
        with pytest.raises(ValueError, match=message):
            model.load_model(str(tmp_path / name))
    shutil.copytree(tmp_path / "width", tmp_path / "vq")
    shutil.rmtree(tmp_path / "vq/vqvae")
    make_autoencoder("kl", str(tmp_path / "vq/vqvae"))  # an AutoencoderKL where the VQ belongs
    with pytest.raises(ValueError, match="is not a VQ of its UNet's 3 latent channels"):
        model.load_model(str(tmp_path / "vq"))
    class_pipeline(tmp_path / "schedule")
    diffusers.DDIMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(tmp_path / "schedule/scheduler")
    with pytest.raises(ValueError, match="scheduler .* is not a schedule slightdiff has"):
        model.load_model(str(tmp_path / "schedule"))
    index = json.load(open(tmp_path / "schedule/model_index.json"))
    index.pop("class_embedder")
    json.dump(dict(index, bert=["diffusers", "LDMBertModel"]), open(tmp_path / "schedule/model_index.json", "w"))
    with pytest.raises(ValueError, match="not a transformers BertModel"):  # a text model without a BERT
        model.load_model(str(tmp_path / "schedule"), ext=True)


def test_a_dit_training_checkpoint_is_accepted_and_other_pickles_are_not(tmp_path):
    from test_released import dit_checkpoint, random_dit
    theirs = dit_checkpoint(random_dit(heads=4, head_dim=32, layers=4, norm_eps=1e-6))
    torch.save(dict(model=theirs, ema=theirs, opt={}, args=argparse.Namespace(model="DiT-XL/2", lr=1e-4)),
               tmp_path / "0400000.pt")  # what DiT's train.py writes
    ckpt = model.load_model(str(tmp_path / "0400000.pt"))
    assert ckpt["config"]["source"]["kind"] == "dit-pt" and ckpt["config"]["model"]["preset"] == "dit-tiny"
    torch.save(dict(ema=theirs, args=types.SimpleNamespace(lr=1e-4)), tmp_path / "other.pt")  # any other object
    with pytest.raises(ValueError, match="refusing .*pickled objects"):
        model.load_model(str(tmp_path / "other.pt"))
