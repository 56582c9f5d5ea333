"""UnCLIPPipeline and sample.py on tiny checkpoints trained in the session."""

from __future__ import annotations

import json

import pytest
import torch

from unclip.generate import SamplerConfig
from unclip.pipeline import UnCLIPPipeline, slerp
from unclip.sample import safe_filename, sample

PROMPTS = ["a red circle", "a small blue star above a green square"]


@pytest.fixture(scope="module")
def pipe(tiny_checkpoints) -> UnCLIPPipeline:
    return UnCLIPPipeline.from_checkpoints(decoder=tiny_checkpoints["decoder"], prior=tiny_checkpoints["prior"],
                                           upsamplers=[tiny_checkpoints["upsampler"]], device="cpu")


def fast(pipe: UnCLIPPipeline, prompts, seeds, **kw):
    return pipe.text_to_image(prompts, seeds, prior_sampler={"num_steps": 4}, decoder_sampler={"num_steps": 4},
                              upsampler_samplers=[{"num_steps": 3}], **kw)


def test_text_to_image_sizes_range_and_seeds(pipe):
    out = fast(pipe, PROMPTS, [0, 1])
    assert out["image_embed"].shape == (2, 32)
    assert torch.allclose(out["image_embed"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert out["decoder"].shape == (2, 3, 32, 32) and out["upsampler"].shape == (2, 3, 64, 64)
    assert out["images"] is out["upsampler"]
    assert out["images"].min() >= -1 and out["images"].max() <= 1
    again = fast(pipe, PROMPTS, [0, 1])
    assert torch.equal(again["images"], out["images"])
    other = fast(pipe, PROMPTS, [7, 8])
    assert not torch.equal(other["images"], out["images"])
    alone = fast(pipe, PROMPTS[1:], [1])  # a seed gives the same image whatever else is in the batch
    assert torch.allclose(alone["images"][0], out["images"][1], atol=1e-5)
    preview = fast(pipe, PROMPTS, [0, 1], stop_at="decoder")
    assert "upsampler" not in preview and preview["images"].shape == (2, 3, 32, 32)
    assert torch.equal(preview["images"], out["decoder"])


def conv_weight_formats(net: torch.nn.Module) -> set[bool]:
    """For each 4-D weight of `net`: is it channels_last (and not merely NCHW-contiguous)?"""
    return {p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
            for p in net.parameters() if p.ndim == 4 and p.shape[1] > 1 and p.shape[2:] != (1, 1)}


def test_unet_stages_take_their_device_layout(tiny_checkpoints):
    """A UNet's conv weights run NCHW on the CPU (faster there) and channels_last on a GPU, as in training."""
    from unclip.nets.unet import conv_memory_format
    from unclip.pipeline import LoadedStage

    assert conv_memory_format("cpu") == torch.contiguous_format
    assert conv_memory_format(torch.device("cuda", 0)) == torch.channels_last
    stage = LoadedStage.load(tiny_checkpoints["decoder"], "decoder")
    stage.net.to(memory_format=torch.channels_last)
    assert conv_weight_formats(stage.to("cpu").net) == {False}
    if torch.cuda.is_available():
        assert conv_weight_formats(stage.to("cuda").net) == {True}


def test_empty_prompt_is_refused(pipe):
    with pytest.raises(ValueError, match="empty prompt"):
        fast(pipe, ["a red circle", "  "], [0, 1])


def test_wrong_stage_and_clip_mismatch_fail_with_the_reason(tiny_checkpoints):
    with pytest.raises(ValueError, match="is a 'prior' checkpoint, but a 'decoder' checkpoint is expected"):
        UnCLIPPipeline.from_checkpoints(decoder=tiny_checkpoints["prior"], device="cpu")
    import yaml

    from unclip.clip.encoder import ClipEncoder

    from .conftest import CONF

    cfg = yaml.safe_load((CONF / "clip" / "tiny.yaml").read_text())
    cfg.pop("_target_")
    other = ClipEncoder(**{**cfg, "init_seed": 123})
    with pytest.raises(ValueError, match="CLIP mismatch: the decoder checkpoint .* weights_sha256.*pipeline.clip="):
        UnCLIPPipeline.from_checkpoints(decoder=tiny_checkpoints["decoder"], clip=other, device="cpu")


def test_variations_interpolation_and_text_diff(pipe):
    images = fast(pipe, PROMPTS, [0, 1], stop_at="decoder")["images"]
    var = pipe.variations(images, num_variations=2, num_steps=4)
    assert var.shape == (2, 2, 3, 32, 32) and var.min() >= -1 and var.max() <= 1
    assert not torch.equal(var[:, 0], var[:, 1])

    inter = pipe.interpolate(images[0], images[1], num_frames=4, num_steps=4)
    z0, z1 = pipe.image_embeds(images[:1])[0], pipe.image_embeds(images[1:])[0]
    assert inter["images"].shape == (4, 3, 32, 32)
    assert torch.allclose(inter["image_embed"][0], z0, atol=1e-6)
    assert torch.allclose(inter["image_embed"][-1], z1, atol=1e-6)
    between = inter["image_embed"][1:-1]
    assert torch.allclose(between.norm(dim=-1), torch.ones(2), atol=1e-5)
    prompts = pipe.interpolate("a red circle", "a blue square", num_frames=3, num_steps=4)
    assert prompts["images"].shape == (3, 3, 32, 32)

    diff = pipe.text_diff(images[0], "a red circle", "a blue circle", thetas=[0.0, 0.3], num_steps=4)
    assert diff["images"].shape == (2, 3, 32, 32)
    x_T = pipe.invert(images[:1], num_steps=4)
    recon = pipe.decode(pipe.image_embeds(images[:1]), None, [0], pipe._ddim(0.0, 4, 1.0, "none"), x_T=x_T)
    assert torch.allclose(diff["images"][0], recon[0], atol=1e-5)  # theta = 0: the inversion's reconstruction
    assert not torch.allclose(diff["images"][1], recon[0])


def test_slerp_endpoints_and_norm():
    a, b = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    assert torch.allclose(slerp(a, b, 0.0), a, atol=1e-6) and torch.allclose(slerp(a, b, 1.0), b, atol=1e-6)
    mid = slerp(a, b, 0.5)
    assert torch.allclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid @ a, mid @ b, atol=1e-5)
    assert torch.allclose(slerp(a, a, 0.3), a, atol=1e-6)


@pytest.mark.parametrize("prompt", ["../../x", "/etc/passwd", "a\nb", "x" * 10_000, "..", "\x00\x1b[31m", "",
                                    "C:\\Windows\\system32", "ümlaut ☃ 图像"])
def test_prompt_file_names_are_safe(prompt, tmp_path):
    name = safe_filename(prompt, 3)
    assert name.startswith("0003_") and name.endswith(".png") and len(name) <= 90
    assert "/" not in name and "\\" not in name and not any(ord(c) < 32 for c in name) and ".." not in name
    assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_sample_script_writes_images_sidecars_and_a_grid(tiny_checkpoints, compose_cfg, tmp_path):
    prompts = ["../../x", "/etc/passwd", "a\nb", "a red circle " * 800]
    cfg = compose_cfg("sample", [
        f"pipeline.prior={tiny_checkpoints['prior']}", f"pipeline.decoder={tiny_checkpoints['decoder']}",
        f"pipeline.upsamplers=[{tiny_checkpoints['upsampler']}]", "prior_sampler.num_steps=3",
        "decoder_sampler.num_steps=3", "decoder_sampler.text_scale=4", "upsampler_samplers=[{num_steps: 2}]",
        "seed=10",
    ], tmp_path / "run")
    cfg.prompts = prompts
    result = sample(cfg)
    images = tmp_path / "run" / "images"
    pngs = sorted(images.glob("*.png"))
    assert len(pngs) == 4 and (tmp_path / "run" / "grid.png").is_file()
    for png in pngs:
        assert png.resolve().parent == images.resolve()
        record = json.loads(png.with_suffix(".json").read_text())
        assert record["prompt"] in prompts and record["image"] == png.name
        assert set(record["checkpoints"]) == {"prior", "decoder", "upsampler"}
        assert len(record["checkpoints"]["decoder"]["sha256"]) == 64
        assert record["settings"]["samplers"]["decoder"]["num_steps"] == 3
        assert record["settings"]["samplers"]["decoder"]["text_scale"] == 4
    long = [json.loads(p.with_suffix(".json").read_text()) for p in pngs]
    assert [r["truncated"] for r in sorted(long, key=lambda r: r["index"])] == [False, False, False, True]
    assert [r["seed"] for r in sorted(long, key=lambda r: r["index"])] == [10, 11, 12, 13]
    assert len(result["files"]) == 4
    from PIL import Image

    assert Image.open(pngs[0]).size == (64, 64)


def test_the_captions_own_guidance_scale_changes_only_the_decoder(pipe):
    """decoder_sampler.text_scale: equal to cond_scale it is the one-scale rule; otherwise the caption is guided
    apart from the image embedding (three branches), and the prior's embedding is untouched."""
    assert pipe.decoder.meta["system"]["use_text"]

    def run(**decoder):
        return pipe.text_to_image(PROMPTS, [0, 1], prior_sampler={"num_steps": 4}, stop_at="decoder",
                                  decoder_sampler={"num_steps": 4, "cond_scale": 3.0, **decoder})

    batches = []
    hook = pipe.decoder.net.register_forward_hook(lambda net, args, out: batches.append(args[0].shape[0]))
    try:
        plain, same, apart = run(), run(text_scale=3.0), run(text_scale=8.0)
    finally:
        hook.remove()
    assert batches == [4] * 4 + [4] * 4 + [6] * 4  # 2 captions: [cond; uncond], then [both; image only; none]
    assert torch.allclose(same["decoder"], plain["decoder"], atol=1e-5)
    assert torch.equal(apart["image_embed"], plain["image_embed"])


def test_sample_script_rejects_empty_prompts(tiny_checkpoints, compose_cfg, tmp_path):
    cfg = compose_cfg("sample", [f"pipeline.prior={tiny_checkpoints['prior']}",
                                 f"pipeline.decoder={tiny_checkpoints['decoder']}", "prompts=[a,'']"], tmp_path)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        sample(cfg)


@pytest.mark.parametrize("mode", ["variations", "interpolate", "text_diff"])
def test_sample_script_manipulation_modes(mode, pipe, tiny_checkpoints, compose_cfg, tmp_path):
    from unclip.utils.images import save_png, to_uint8

    images = fast(pipe, PROMPTS, [0, 1], stop_at="decoder")["images"]
    paths = [save_png(to_uint8(img), tmp_path / f"in{i}.png") for i, img in enumerate(images)]
    overrides = [f"pipeline.decoder={tiny_checkpoints['decoder']}", f"pipeline.prior={tiny_checkpoints['prior']}",
                 f"mode={mode}", "decoder_sampler.num_steps=3"]
    overrides += {
        "variations": [f"images=[{paths[0]},{paths[1]}]", "variations.num=2"],
        "interpolate": [f"interpolate.start={paths[0]}", "interpolate.end='a blue square'", "interpolate.num_frames=3",
                        "prior_sampler.num_steps=2", "num_candidates=3"],
        "text_diff": [f"text_diff.image={paths[0]}", "text_diff.source='a red circle'",
                      "text_diff.target='a blue circle'", "text_diff.thetas=[0.0,0.5]"],
    }[mode]
    cfg = compose_cfg("sample", overrides, tmp_path / "run")
    result = sample(cfg)
    expected = {"variations": 4, "interpolate": 3, "text_diff": 2}[mode]
    pngs = sorted((tmp_path / "run" / "images").glob("*.png"))
    assert len(pngs) == expected and len(result["files"]) == expected
    assert (tmp_path / "run" / "grid.png").is_file()
    record = json.loads(pngs[0].with_suffix(".json").read_text())
    assert record["mode"] == mode and "decoder" in record["checkpoints"]
    assert record["decoder_sampler"]["name"] == "ddim" and record["decoder_sampler"]["num_steps"] == 3
    if mode == "interpolate":  # the prompt end is the prior's draw, with the settings given and recorded
        assert record["prior_sampler"]["num_steps"] == 2 and record["num_candidates"] == 3
    else:
        assert "prior_sampler" not in record
        with pytest.raises(ValueError, match="does not run the prior"):
            sample(compose_cfg("sample", [*overrides, "prior_sampler.num_steps=2"], tmp_path / "r2"))
    # settings these modes cannot honour are refused, not silently dropped
    for bad in ("decoder_sampler.text_scale=5", "decoder_sampler.name=dpmpp", "decoder_sampler.thresholding=none"):
        with pytest.raises(ValueError, match="unset decoder_sampler"):
            sample(compose_cfg("sample", [*overrides, bad], tmp_path / "r3"))


def test_sampler_settings_are_checked_before_any_sampling(pipe):
    for key, value in [("cond_scale", "10"), ("cond_scale", float("nan")), ("text_scale", float("inf")),
                       ("text_scale", True), ("text_scale", [1, 2]), ("eta", None)]:
        with pytest.raises(ValueError, match=f"sampler {key} must be a finite number"):
            SamplerConfig(**{key: value})
    with pytest.raises(ValueError, match="num_steps"):
        SamplerConfig(num_steps=0)
    assert SamplerConfig(cond_scale=2, text_scale=5).to_dict()["cond_scale"] == 2.0
    # a caption scale for a stage that has no caption branch: refused by name, before the prior has run
    with pytest.raises(ValueError, match="text_scale guides the caption"):
        pipe.text_to_image(PROMPTS, [0, 1], prior_sampler={"num_steps": 2, "text_scale": 4.0})
