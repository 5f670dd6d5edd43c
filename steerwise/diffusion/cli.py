"""``steerwise diffusion fit | generate | sweep | sites`` — diffusers is imported only when run."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path


def _console():
    from rich.console import Console

    return Console()


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pipeline", required=True,
                   help="diffusers pipeline: hub id, local directory, or tiny-sd / tiny-sd3 (random)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="dtype the pipeline is loaded in")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available)")


def _add_image_args(p: argparse.ArgumentParser, steps: int) -> None:
    from ..cli import non_negative_float, non_negative_int, positive_int

    p.add_argument("--steps", type=positive_int, default=steps, help="denoising steps")
    p.add_argument("--guidance", type=non_negative_float, default=None,
                   help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=positive_int, default=None,
                   help="image height in pixels (default: the pipeline's)")
    p.add_argument("--width", type=positive_int, default=None,
                   help="image width in pixels (default: the pipeline's)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the initial noise")


def _image_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {"num_inference_steps": args.steps}
    for key, name in (("guidance_scale", "guidance"), ("height", "height"), ("width", "width")):
        if getattr(args, name) is not None:
            kw[key] = getattr(args, name)
    return kw


def _prompts(path: str | None, preset: dict | None, key: str) -> list[str] | None:
    from ..data import load_texts

    if path:
        return load_texts(path)
    if preset is not None:
        return preset[key]
    return None


def _cmd_fit(args: argparse.Namespace) -> int:
    from ..gates.dsas import DSASOptions
    from .fit import DiffusionFitOptions, fit_diffusion
    from .pipelines import load_pipeline
    from .prompts import preset

    console = _console()
    sets = preset(args.preset) if args.preset else None
    source = _prompts(args.source, sets, "source")
    control = _prompts(args.control, sets, "control")
    target = _prompts(args.target, sets, "target")
    if source is None or target is None:
        raise ValueError("give --source and --target prompt files (and --control), or --preset")
    pipe = load_pipeline(args.pipeline, dtype=args.dtype, device=args.device)
    opts = DiffusionFitOptions(
        method=args.method, gate=args.gate, site=args.site, layers=args.layers,
        map_from=args.map_from, num_inference_steps=args.steps, guidance_scale=args.guidance,
        height=args.height, width=args.width, timestep_buckets=args.timestep_buckets,
        batch_size=args.batch_size, seed=args.seed, rows=args.rows, same_noise=args.same_noise,
        default_strength=args.strength,
        dsas=DSASOptions(n_components=args.n_components, cv_folds=args.cv_folds,
                         threshold=args.threshold, below_threshold=args.below_threshold,
                         calibrate=None),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        recipe = fit_diffusion(pipe, source, control, target, opts, progress=True)
    from ..cli import diagnostics_table

    console.print(diagnostics_table(recipe, title="per-block diagnostics"))
    for w in caught:
        if issubclass(w.category, UserWarning) and "steerwise" in str(w.filename):
            console.print(f"[yellow]warning:[/] {w.message}")
    recipe.fit_info["model_name"] = args.pipeline
    out = recipe.save_pretrained(args.out)
    console.print(f"saved recipe ({recipe.method} + {recipe.gate}, {len(recipe.entries)} entries) to {out}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from ..recipe import Recipe
    from .generate import generate_images
    from .overlay import save_images
    from .pipelines import load_pipeline

    console = _console()
    pipe = load_pipeline(args.pipeline, dtype=args.dtype, device=args.device)
    if hasattr(pipe, "set_progress_bar_config"):  # denoising is the long part: show its steps
        pipe.set_progress_bar_config(disable=False, leave=False, desc="denoising")
    recipe = Recipe.from_pretrained(args.recipe) if args.recipe else None
    if recipe is not None and args.ungated:
        from .generate import without_gates

        recipe = without_gates(recipe)
    kw = _image_kwargs(args)
    result = generate_images(pipe, args.prompts, recipe, args.strength, seed=args.seed,
                             cfg=args.cfg, return_gate_maps=bool(args.gate_maps and recipe), **kw)
    written = save_images(result, args.out, prefix="steered" if recipe else "image")
    if args.compare and recipe is not None:
        base = generate_images(pipe, args.prompts, None, seed=args.seed, **kw)
        written += save_images(base, args.out, prefix="unsteered")
    for path in written:
        console.print(f"wrote {path}")
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from ..recipe import Recipe
    from .evaluate import CLIPScorer, save_sweep, summary_table, sweep
    from .pipelines import load_pipeline
    from .prompts import preset

    console = _console()
    sets = preset(args.preset) if args.preset else None
    concept = _prompts(args.concept, sets, "concept_eval")
    other = _prompts(args.other, sets, "other_eval")
    if concept is None or other is None:
        raise ValueError("give --concept and --other prompt files, or --preset")
    strengths = args.strengths
    pipe = load_pipeline(args.pipeline, dtype=args.dtype, device=args.device)
    recipe = Recipe.from_pretrained(args.recipe)
    scorer = CLIPScorer(args.clip, device=args.device) if args.clip else None
    if scorer is None:
        console.print("[dim]no --clip model given: CLIP score and CLIP similarity are skipped[/]")
    result = sweep(pipe, recipe, concept, other, strengths, scorer=scorer, seed=args.seed,
                   cfg=args.cfg, progress=lambda m: console.print(f"[dim]{m}[/]"),
                   **_image_kwargs(args))
    console.print(summary_table(result))
    paths = save_sweep(result, args.out, tile=args.tile)
    console.print(f"wrote {paths['json']} and {paths['grid']}")
    return 0


def _cmd_sites(args: argparse.Namespace) -> int:
    from rich.table import Table

    from .pipelines import load_pipeline
    from .sites import denoiser_of, diffusion_describe

    pipe = load_pipeline(args.pipeline, dtype=args.dtype, device=args.device)
    denoiser = denoiser_of(pipe)
    table = Table(title=f"{type(denoiser).__name__}: named diffusion sites")
    table.add_column("site")
    table.add_column("blocks")
    for kind, where in diffusion_describe(denoiser).items():
        table.add_row(kind, where)
    _console().print(table)
    return 0


def register(subparsers) -> None:
    """Add ``steerwise diffusion ...`` to the main parser."""
    from ..cli import finite_float, finite_floats, int_at_least, positive_int, unit_interval

    d = subparsers.add_parser("diffusion", help="DSAS on text-to-image diffusion pipelines")
    sub = d.add_subparsers(dest="diffusion_command", required=True, metavar="COMMAND")

    p = sub.add_parser("fit", help="fit a recipe from source / control / target prompts")
    _add_pipeline_args(p)
    p.add_argument("--source", help="prompts with the concept (.txt lines or .jsonl 'text')")
    p.add_argument("--control", help="prompts without the concept")
    p.add_argument("--target", help="prompts in the style to steer toward")
    p.add_argument("--preset", help="built-in prompt sets instead of files: banana-blurry")
    p.add_argument("--method", default="caa", help="offline map: caa, iti, mean-act, linear-act")
    p.add_argument("--gate", default="dsas", choices=["none", "dsas", "dsas-adaptive"],
                   help="when to steer: per spatial position (none = every position)")
    p.add_argument("--site", default="attn", help="attn | block | resnet | re:<module-regex>[:i]")
    p.add_argument("--layers", default=None,
                   help="blocks in forward order: all (default), '2-5' or '0,3'")
    p.add_argument("--map-from", default="source+control", choices=["source+control", "source"],
                   help="fit the map from S ∪ C to T (the style alone), or from S to T")
    p.add_argument("--timestep-buckets", type=positive_int, default=1,
                   help="one map and gate per group of noise levels")
    p.add_argument("--rows", default="cond", choices=["cond", "uncond", "all"],
                   help="CFG half to collect activations from")
    p.add_argument("--same-noise", action="store_true", help="start every prompt from one seed")
    p.add_argument("--batch-size", type=positive_int, default=4, help="prompts per pipeline call")
    p.add_argument("--strength", type=finite_float, default=1.0,
                   help="default strength saved in the recipe")
    p.add_argument("--n-components", type=positive_int, default=5, help="PCA rank r of the gates")
    p.add_argument("--cv-folds", type=int_at_least(2), default=5,
                   help="cross-validation folds of the gate accuracy")
    p.add_argument("--threshold", type=unit_interval, default=0.75,
                   help="gate accuracy threshold τ")
    p.add_argument("--below-threshold", default="skip", choices=["skip", "constant"],
                   help="blocks below τ: not steered, or steered at constant strength")
    _add_image_args(p, steps=10)
    p.add_argument("--out", required=True, help="recipe directory to write")
    p.set_defaults(func=_cmd_fit)

    p = sub.add_parser("generate", help="generate images, steered by a recipe")
    _add_pipeline_args(p)
    p.add_argument("--recipe", help="recipe directory (omit for unsteered images)")
    p.add_argument("--strength", type=finite_float, default=None,
                   help="global strength λ (default: the recipe's)")
    p.add_argument("--cfg", default="both", choices=["both", "cond"],
                   help="steer both CFG halves (each gated by its own activation) or only the "
                        "conditional")
    p.add_argument("--ungated", action="store_true", help="drop the gates: plain CAA on every block")
    p.add_argument("--gate-maps", action="store_true", help="also write gate-map overlays")
    p.add_argument("--compare", action="store_true", help="also write the unsteered images")
    _add_image_args(p, steps=30)
    p.add_argument("--out", required=True, help="directory for the PNG files")
    p.add_argument("prompts", nargs="+", type=_prompt, help="prompts to draw")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("sweep", help="λ sweep, CAA vs CAA+DSAS, concept vs other prompts")
    _add_pipeline_args(p)
    p.add_argument("--recipe", required=True, help="recipe directory")
    p.add_argument("--concept", help="prompts with the concept")
    p.add_argument("--other", help="prompts without it")
    p.add_argument("--preset", help="built-in evaluation prompts: banana-blurry")
    p.add_argument("--strengths", type=finite_floats, default=[0.0, 2.0, 4.0, 8.0],
                   help="comma-separated strengths λ")
    p.add_argument("--clip", help="local CLIP model directory (CLIP score and similarity; "
                                  "default: skipped)")
    p.add_argument("--cfg", default="both", choices=["both", "cond"],
                   help="steer both CFG halves or only the conditional")
    p.add_argument("--tile", type=positive_int, default=128, help="grid tile size in pixels")
    _add_image_args(p, steps=30)
    p.add_argument("--out", required=True, type=Path, help="directory for results.json and grid.png")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser("sites", help="list the named diffusion sites of a pipeline's denoiser")
    _add_pipeline_args(p)
    p.set_defaults(func=_cmd_sites)


def _prompt(text: str) -> str:
    from ..cli import non_empty_text

    return non_empty_text(text)
