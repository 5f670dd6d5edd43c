"""DSAS on text-to-image diffusion: sites, fitting from prompts, steered generation, CFG, recipes.

Everything runs on tiny random pipelines built from configs (steerwise.diffusion.testing):
no weights are downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers", reason="diffusion tests need diffusers: pip install 'steerwise[diffusion]'")

from steerwise.diffusion import (
    DiffusionFitOptions,
    fit_diffusion,
    fit_from_activations,
    generate_images,
    resolve_diffusion_sites,
    steer,
    without_gates,
)
from steerwise.diffusion.collect import bucket_edges, bucket_of
from steerwise.diffusion.fit import fit_entry
from steerwise.diffusion.testing import (
    tiny_flux_transformer,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
)
from steerwise.gates import DSASGate, DSASOptions
from steerwise.hooks import SiteSteering, SteeringHandle
from steerwise.maps import CAAMap
from steerwise.recipe import ModelIdentity, Recipe, RecipeMismatchError
from steerwise.sites import Site, SiteError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

IMG = {"num_inference_steps": 3, "height": 32, "width": 32}
CONCEPT = ["a photo of a banana on a table", "bananas in a bowl", "a ripe banana on a desk",
           "a bunch of bananas in a basket", "a banana in the grass", "two bananas on a plate"]
OTHER = ["a photo of a car on a road", "a cat in a bowl", "a red apple on a desk",
         "a book in a basket", "a dog in the grass", "a coffee mug on a plate"]
STYLE = [f"a blurry {p}" for p in ("photo of a car", "photo of a banana", "cat", "banana",
                                   "dog", "book")]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny pipelines run fastest single-threaded (thread hand-offs cost more than the maths)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sd():
    return tiny_sd_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd_recipe(sd):
    """A CAA + DSAS recipe fitted from prompts; τ = 0 so every block is steered by its gate."""
    return fit_diffusion(sd, CONCEPT, OTHER, STYLE, num_inference_steps=2, height=32, width=32,
                         dsas=DSASOptions(threshold=0.0, cv_folds=3, n_components=3))


def _pixels(images):
    return np.stack([np.asarray(im, dtype=np.int16) for im in images])


def _random_recipe(denoiser, sites, *, gated: bool, seed: int = 0, norm: float = 20.0):
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for site in sites:
        width = _site_width(denoiser, site)
        v = torch.randn(width, generator=gen)
        gate = DSASGate(torch.randn(width, generator=gen), torch.tensor(0.0)) if gated else None
        entries.append(SiteSteering(site, CAAMap(v / v.norm() * norm), gate))
    return Recipe(ModelIdentity.of(denoiser), entries, "caa", "dsas" if gated else "none")


def _site_width(denoiser, site):
    """The channel width of a UNet/DiT site, read off the module's parameters."""
    module = denoiser.get_submodule(site.module)
    for name in ("proj_out", "ff.net.2", "norm2", "proj_mlp", "conv2"):
        try:
            sub = module.get_submodule(name)
        except AttributeError:
            continue
        return int(sub.weight.shape[0]) if name != "proj_mlp" else int(sub.weight.shape[1])
    raise AssertionError(f"no width for {site.module}")


# ---- sites --------------------------------------------------------------------------------------

def test_unet_sites_by_kind_and_regex(sd):
    unet = sd.unet
    attn = resolve_diffusion_sites(sd, "attn")
    assert [s.module for s in attn] == [
        "down_blocks.0.attentions.0", "mid_block.attentions.0",
        "up_blocks.1.attentions.0", "up_blocks.1.attentions.1",
    ]  # forward order: down, mid, up
    assert all(s.channel_dim == 1 and s.tuple_index == 0 for s in attn)
    blocks = resolve_diffusion_sites(unet, "block", layers="0,-1")
    assert [s.layer for s in blocks] == [0, 3]
    assert all(s.channel_dim == -1 and s.module.endswith("transformer_blocks.0") for s in blocks)
    assert len(resolve_diffusion_sites(unet, "resnet")) == 8
    regex = resolve_diffusion_sites(unet, r"re:up_blocks\.\d+\.attentions\.\d+")
    assert [s.module for s in regex] == ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    with pytest.raises(SiteError, match="matches no module"):
        resolve_diffusion_sites(unet, "re:nothing_here")
    with pytest.raises(SiteError, match="valid choices"):
        resolve_diffusion_sites(unet, "residual")
    ident = ModelIdentity.of(unet)
    assert (ident.model_type, ident.hidden_size, ident.num_layers) == ("UNet2DConditionModel", 32, 4)


def test_dit_sites_sd3_and_flux_steer_image_tokens():
    flux = tiny_flux_transformer(seed=0)
    sites = resolve_diffusion_sites(flux, "attn")
    assert [s.module for s in sites] == ["transformer_blocks.0", "single_transformer_blocks.0"]
    assert all(s.tuple_index == 1 and s.channel_dim == -1 for s in sites)
    sd3_sites = resolve_diffusion_sites(tiny_sd3_pipeline().transformer, "block")
    assert [s.tuple_index for s in sd3_sites] == [1, 1]

    gen = torch.Generator().manual_seed(0)
    b, n, t = 2, 16, 5
    inputs = {
        "hidden_states": torch.randn(b, n, 16, generator=gen),
        "encoder_hidden_states": torch.randn(b, t, 32, generator=gen),
        "pooled_projections": torch.randn(b, 32, generator=gen),
        "timestep": torch.full((b,), 0.5), "img_ids": torch.zeros(n, 3),
        "txt_ids": torch.zeros(t, 3), "return_dict": False,
    }
    recipe = _random_recipe(flux, sites, gated=True, norm=5.0)
    seen = {}

    def keep_text(module, args, out):
        seen["text"] = out[0].clone()

    hook = flux.get_submodule("transformer_blocks.0").register_forward_hook(keep_text)
    with torch.no_grad():
        base = flux(**inputs)[0]
        text_base = seen.pop("text")
        with recipe.apply(flux, 0.0):
            zero = flux(**inputs)[0]
        with recipe.apply(flux, 3.0):
            steered = flux(**inputs)[0]
            text_steered = seen.pop("text")
    hook.remove()
    assert torch.equal(base, zero)
    assert not torch.allclose(base, steered)
    assert torch.equal(text_base, text_steered)  # text tokens (tuple element 0) are not steered


# ---- gates on synthetic activations -------------------------------------------------------------

@pytest.mark.parametrize("layout", ["channels", "tokens"])
def test_gate_fitted_on_synthetic_concept_fires_only_on_concept_positions(layout):
    d, n = 24, 40
    gen = torch.Generator().manual_seed(0)
    concept = torch.zeros(d)
    concept[0] = 1.0
    style = torch.zeros(d)
    style[5] = 1.0

    def noise(k):
        return torch.randn(k, d, generator=gen) * 0.3

    source = noise(n) + 4.0 * concept
    control = noise(n)
    target = torch.cat([noise(n) + 4.0 * concept, noise(n)]) + 3.0 * style
    site = Site("body", "body", channel_dim=1 if layout == "channels" else -1)
    entry = fit_entry(site, source, target, control, DiffusionFitOptions(dsas=DSASOptions(seed=0)))
    assert entry.diagnostics["gate_accuracy"] > 0.95 and entry.scale == 1.0
    assert torch.allclose(entry.map.vector, 3.0 * style, atol=0.3)

    h = w = 6
    field = torch.randn(1, h, w, d, generator=gen) * 0.3
    where = torch.zeros(h, w, dtype=torch.bool)
    where[1:3, 2:5] = True
    field[0][where] += 4.0 * concept
    x = field.permute(0, 3, 1, 2) if layout == "channels" else field.reshape(1, h * w, d)
    body = torch.nn.Module()
    body.add_module("body", torch.nn.Identity())
    body.register_parameter("anchor", torch.nn.Parameter(torch.zeros(1)))  # the handle reads a device
    with SteeringHandle(body, [entry], strength=1.0):
        y = body.body(x)
    delta = (y - x).permute(0, 2, 3, 1) if layout == "channels" else (y - x).reshape(1, h, w, d)
    moved = delta[0] @ style  # how far each position moved along the style direction
    assert moved[where].min() > 2.7  # 3 · gate, gate > 0.9 where the concept is
    assert moved[~where].max() < 0.3  # gate < 0.1 elsewhere


# ---- pipelines end to end -----------------------------------------------------------------------

def test_sd_pipeline_fit_generate_strength_zero_and_round_trip(sd, sd_recipe, tmp_path):
    assert len(sd_recipe.entries) == 4 and sd_recipe.gate == "dsas"
    assert all("gate_accuracy" in e.diagnostics for e in sd_recipe.entries)
    assert sd_recipe.model.model_type == "UNet2DConditionModel"
    prompts = ["a banana on a table", "a car on a road"]
    base = generate_images(sd, prompts, None, seed=3, **IMG)
    zero = generate_images(sd, prompts, sd_recipe, 0.0, seed=3, **IMG)
    assert np.array_equal(_pixels(base.images), _pixels(zero.images))  # bit-identical

    steered = generate_images(sd, prompts, sd_recipe, 30.0, seed=3, return_gate_maps=True, **IMG)
    assert not np.array_equal(_pixels(base.images), _pixels(steered.images))
    maps = steered.gate_maps
    assert set(maps.maps) == {e.site.name for e in sd_recipe.entries}
    assert maps.maps["down_blocks.0.attentions.0"].shape == (2, 16, 16)
    assert maps.maps["mid_block.attentions.0"].shape == (2, 8, 8)
    assert all(v.min() >= 0 and v.max() <= 1 for v in maps.maps.values())
    assert set(maps.steps.values()) == {IMG["num_inference_steps"]}
    assert maps.combined().shape == (2, 16, 16)

    sd_recipe.save_pretrained(tmp_path / "r")
    loaded = Recipe.from_pretrained(tmp_path / "r")
    assert loaded.fit_info["diffusion"]["timestep_buckets"] == sd_recipe.fit_info["diffusion"]["timestep_buckets"]
    assert [e.site for e in loaded.entries] == [e.site for e in sd_recipe.entries]
    for a, b in zip(loaded.entries, sd_recipe.entries):
        assert torch.equal(a.map.vector, b.map.vector) and torch.equal(a.gate.weight, b.gate.weight)
    again = generate_images(sd, prompts, loaded, 30.0, seed=3, **IMG)
    assert np.array_equal(_pixels(again.images), _pixels(steered.images))

    # a one-bucket recipe also applies through the engine's Recipe.apply on the denoiser
    with sd_recipe.apply(sd.unet, 30.0), torch.no_grad():
        direct = sd(prompts, generator=[torch.Generator().manual_seed(3 + i) for i in range(2)],
                    **IMG).images
    assert np.array_equal(_pixels(direct), _pixels(steered.images))

    # the same maps without gates (plain CAA) steer differently
    plain = generate_images(sd, prompts, without_gates(sd_recipe), 30.0, seed=3, **IMG)
    assert not np.array_equal(_pixels(plain.images), _pixels(steered.images))


@pytest.mark.filterwarnings("ignore:all gate accuracies are near chance")
def test_sd3_pipeline_end_to_end_with_token_gate_maps():
    pipe = tiny_sd3_pipeline(seed=0)
    recipe = fit_diffusion(pipe, CONCEPT[:4], OTHER[:4], STYLE[:4], num_inference_steps=2,
                           height=32, width=32, dsas=DSASOptions(threshold=0.0, cv_folds=2,
                                                                 n_components=2))
    assert recipe.model.model_type == "SD3Transformer2DModel"
    assert all(e.site.channel_dim == -1 and e.site.tuple_index == 1 for e in recipe.entries)
    prompts = ["a banana", "a car"]
    base = generate_images(pipe, prompts, None, **IMG)
    zero = generate_images(pipe, prompts, recipe, 0.0, **IMG)
    steered = generate_images(pipe, prompts, recipe, 50.0, return_gate_maps=True, **IMG)
    assert np.array_equal(_pixels(base.images), _pixels(zero.images))
    assert not np.array_equal(_pixels(base.images), _pixels(steered.images))
    # 32 px → 16×16 latent (VAE factor 2) → 2×2 patches: 64 image tokens on an 8×8 grid
    assert {tuple(m.shape) for m in steered.gate_maps.maps.values()} == {(2, 8, 8)}


def test_cfg_halves_each_treated_as_intended(sd):
    """Row-wise gating in both CFG halves (default) and conditional-half-only steering."""
    site = resolve_diffusion_sites(sd, "attn", layers="0")[0]
    recipe = _random_recipe(sd.unet, [site], gated=True, norm=10.0)
    module = sd.unet.get_submodule(site.module)
    lam = 2.0

    def first_call_output(strength, cfg):
        seen = []
        with steer(sd, recipe, strength, cfg=cfg):
            h = module.register_forward_hook(lambda m, a, out: seen.append(out[0].detach().clone()))
            try:
                with torch.no_grad():
                    sd(["a banana", "a car"], generator=[torch.Generator().manual_seed(i) for i in range(2)],
                       output_type="latent", **IMG)
            finally:
                h.remove()
        return seen[0]  # the first denoiser call: same input steered or not

    ref = first_call_output(0.0, "both")
    assert ref.shape[0] == 4  # [uncond × 2, cond × 2]
    both = first_call_output(lam, "both")
    cond = first_call_output(lam, "cond")
    gate, v = recipe.entries[0].gate, recipe.entries[0].map.vector
    t = ref.permute(0, 2, 3, 1)
    expected = lam * torch.sigmoid(t @ gate.weight + gate.bias)[..., None] * v  # per row, own activation
    assert torch.allclose((both - ref).permute(0, 2, 3, 1), expected, atol=1e-4)
    assert torch.equal(cond[:2], ref[:2])  # unconditional half untouched
    assert torch.allclose((cond - ref).permute(0, 2, 3, 1)[2:], expected[2:], atol=1e-4)
    # without guidance there is no CFG batch: every row is conditional and steered
    with steer(sd, recipe, lam, cfg="cond", gate_maps=True) as handle, torch.no_grad():
        sd(["a banana"], guidance_scale=1.0, output_type="latent", **IMG)
    assert handle.gate_maps().maps[site.name].min() > 0


def test_timestep_buckets_switch_entries_during_generation(sd):
    recipe = fit_diffusion(sd, CONCEPT[:4], OTHER[:4], STYLE[:4], num_inference_steps=4,
                           height=32, width=32, layers="0", timestep_buckets=2,
                           dsas=DSASOptions(threshold=0.0, cv_folds=2, n_components=2))
    names = [e.site.name for e in recipe.entries]
    assert names == ["down_blocks.0.attentions.0@t0", "down_blocks.0.attentions.0@t1"]
    edges = recipe.fit_info["diffusion"]["timestep_buckets"]
    assert len(edges) == 3 and edges[0] == 0.0 and 0 < edges[1] < 1
    out = generate_images(sd, ["a banana"], recipe, 5.0, return_gate_maps=True,
                          num_inference_steps=6, height=32, width=32)
    steps = out.gate_maps.steps
    assert steps[names[0]] + steps[names[1]] == 6 and min(steps.values()) >= 1
    with pytest.raises(ValueError, match="2 timestep buckets.*steerwise.diffusion.steer"):
        recipe.apply(sd.unet, 1.0)  # the plain engine path would use every bucket at every step
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks


def test_bucket_edges_cover_every_level():
    levels = [0.95, 0.7, 0.45, 0.2]
    edges = bucket_edges(levels, 2)
    assert edges[0] == 0.0 and edges[-1] > 0.95
    assert [bucket_of(v, edges) for v in levels] == [1, 1, 0, 0]
    with pytest.raises(ValueError, match="distinct denoising steps"):
        bucket_edges(levels, 5)


def test_recipe_for_another_denoiser_is_refused(sd, sd_recipe):
    other = tiny_sd3_pipeline()
    with pytest.raises(RecipeMismatchError, match="SD3Transformer2DModel"):
        steer(other, sd_recipe, 1.0)
    assert not sd.unet._forward_pre_hooks and not sd.unet._forward_hooks


def test_fit_from_activations_validates_buckets():
    site = Site("s", "s", channel_dim=1)
    acts = {"s": [torch.randn(6, 8)]}
    ident = ModelIdentity("UNet2DConditionModel", 8, 1)
    recipe = fit_from_activations(ident, [site], acts, {"s": [torch.randn(6, 8)]}, None,
                                  DiffusionFitOptions(gate="none"))
    assert recipe.gate == "none" and len(recipe.entries) == 1
    with pytest.raises(ValueError, match="trained end to end|unknown"):
        fit_from_activations(ident, [site], acts, acts, None, DiffusionFitOptions(method="lineas"))
    with pytest.raises(ValueError, match="edges"):
        fit_from_activations(ident, [site], acts, acts, None, DiffusionFitOptions(gate="none"),
                             edges=[0.0, 0.5, 1.0])


# ---- overlays, evaluation, CLI ------------------------------------------------------------------

def test_overlay_sweep_grid_and_clip_scores(sd, sd_recipe, tmp_path):
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from steerwise.diffusion.evaluate import CLIPScorer, save_sweep, sweep
    from steerwise.diffusion.overlay import gate_overlay, save_images
    from steerwise.diffusion.testing import tiny_clip_tokenizer

    image = Image.fromarray(np.full((32, 32, 3), 200, dtype=np.uint8))
    gate = torch.zeros(4, 4)
    gate[:2] = 1.0
    over = np.asarray(gate_overlay(image, gate))
    assert over.shape == (32, 32, 3)
    assert np.array_equal(over[-8:], np.asarray(image)[-8:])  # gate 0: the image shows through
    assert not np.array_equal(over[:8], np.asarray(image)[:8])

    gen = generate_images(sd, ["a banana"], sd_recipe, 10.0, return_gate_maps=True, **IMG)
    written = save_images(gen, tmp_path / "imgs")
    assert sorted(p.name for p in written) == ["image-0-gate.png", "image-0.png"]

    clip_dir = tmp_path / "clip"
    tok = tiny_clip_tokenizer(tmp_path / "cliptok")
    cfg = CLIPConfig(
        text_config={"vocab_size": len(tok), "hidden_size": 16, "intermediate_size": 32,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 32},
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(clip_dir)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                     crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(clip_dir)
    scorer = CLIPScorer(str(clip_dir), device="cpu")
    result = sweep(sd, sd_recipe, ["a banana on a table"], ["a car on a road"], [0.0, 20.0],
                   scorer=scorer, **IMG)
    assert result.variants == ["caa", "caa+dsas"]
    summary = {(s["variant"], s["strength"], s["group"]): s for s in result.summary()}
    assert len(summary) == 8
    at_zero = summary[("caa", 0.0, "concept")]
    assert at_zero["pixel_similarity"] == 1.0 and at_zero["clip_similarity"] == pytest.approx(1.0, abs=1e-5)
    assert summary[("caa", 20.0, "other")]["pixel_similarity"] < 1.0
    assert 0.0 <= summary[("caa", 20.0, "other")]["clip_score"] <= 100.0
    paths = save_sweep(result, tmp_path / "sweep", tile=32)
    grid = Image.open(paths["grid"])
    assert grid.size[1] == 2 * 22 + 2 * 32  # two header lines + rows = prompts
    assert '"summary"' in paths["json"].read_text()


def test_cli_fit_generate_and_lazy_import(tmp_path):
    from steerwise.cli import main

    src, ctl, tgt = (tmp_path / f"{n}.txt" for n in ("s", "c", "t"))
    src.write_text("\n".join(CONCEPT))
    ctl.write_text("\n".join(OTHER))
    tgt.write_text("\n".join(STYLE))
    rc = main(["diffusion", "fit", "--pipeline", "tiny-sd", "--source", str(src), "--control", str(ctl),
               "--target", str(tgt), "--steps", "2", "--height", "32", "--width", "32",
               "--cv-folds", "3", "--threshold", "0", "--layers", "0-1", "--out", str(tmp_path / "r")])
    assert rc == 0 and (tmp_path / "r" / "steerwise.json").is_file()
    rc = main(["diffusion", "generate", "--pipeline", "tiny-sd", "--recipe", str(tmp_path / "r"),
               "--strength", "5", "--gate-maps", "--steps", "2", "--height", "32", "--width", "32",
               "--out", str(tmp_path / "img"), "a banana"])
    assert rc == 0 and (tmp_path / "img" / "steered-0-gate.png").is_file()
    code = "import sys, steerwise.cli as c; c.build_parser(); print('diffusers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # `steerwise --help` does not import diffusers


@pytest.mark.parametrize("method", ["linear-act", "iti"])
def test_other_offline_maps_fit_and_steer(sd, method):
    recipe = fit_diffusion(sd, CONCEPT, OTHER, STYLE, method=method, gate="none", layers="0",
                           num_inference_steps=2, height=32, width=32,
                           map_options={"cv_folds": 3} if method == "iti" else {})
    assert recipe.method == method and recipe.entries[0].site.channel_dim == 1
    base = generate_images(sd, ["a banana"], None, **IMG)
    steered = generate_images(sd, ["a banana"], recipe, 1.0 if method == "linear-act" else 20.0, **IMG)
    assert not np.array_equal(_pixels(base.images), _pixels(steered.images))
