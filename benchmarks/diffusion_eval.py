"""DSAS on text-to-image diffusion: the DSAS paper's banana/blur experiment on your checkpoint.

Fits a CAA + DSAS recipe from prompts (or loads one), then sweeps λ for plain CAA (the recipe's
maps, ungated, every block) and CAA + DSAS on concept and non-concept prompts from the same
seeds, and reports per group: sharpness ratio (variance of the Laplacian, steered / unsteered),
pixel similarity and — with a local CLIP model — CLIP score to the prompt and CLIP similarity to
the unsteered image. Also times one steered vs unsteered generation side by side. Writes
``results.json`` and ``grid.png`` (rows = prompts, columns = λ; the paper's Figure 4 layout).

Examples (weights must be on disk or in the hub cache; nothing is downloaded when offline)::

    HF_HUB_OFFLINE=1 python benchmarks/diffusion_eval.py --pipeline runwayml/stable-diffusion-v1-5 \
        --clip /models/clip-vit-large-patch14 --strengths 0,4,8,16 --out benchmarks/results/diffusion-sd15
    python benchmarks/diffusion_eval.py --pipeline tiny-sd --steps 4 --height 32 --width 32 \
        --strengths 0,8,32 --threshold 0 --out /tmp/diffusion-smoke     # random pipeline, smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", required=True, help="hub id, local directory, or tiny-sd / tiny-sd3")
    p.add_argument("--recipe", help="an existing recipe directory (default: fit one from --preset)")
    p.add_argument("--preset", default="banana-blurry", help="prompt sets for fitting and evaluation")
    p.add_argument("--clip", help="local CLIP model directory (CLIP score / similarity)")
    p.add_argument("--strengths", default="0,4,8,16")
    p.add_argument("--site", default="attn")
    p.add_argument("--layers", default=None)
    p.add_argument("--fit-steps", type=int, default=10, help="denoising steps while collecting")
    p.add_argument("--timestep-buckets", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.75, help="gate accuracy threshold τ")
    p.add_argument("--steps", type=int, default=30, help="denoising steps for the sweep images")
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--cfg", default="both", choices=["both", "cond"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None)
    p.add_argument("--tile", type=int, default=128)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    from rich.console import Console

    from steerwise.cli import diagnostics_table
    from steerwise.diffusion import fit_diffusion, generate_images, load_pipeline, without_gates
    from steerwise.diffusion.evaluate import CLIPScorer, save_sweep, summary_table, sweep
    from steerwise.diffusion.prompts import preset
    from steerwise.gates import DSASOptions
    from steerwise.recipe import Recipe

    console = Console()
    sets = preset(args.preset)
    pipe = load_pipeline(args.pipeline, dtype=args.dtype, device=args.device)
    image_kw: dict = {"num_inference_steps": args.steps}
    for key, value in (("guidance_scale", args.guidance), ("height", args.height), ("width", args.width)):
        if value is not None:
            image_kw[key] = value

    if args.recipe:
        recipe = Recipe.from_pretrained(args.recipe)
        fit_s = None
    else:
        t0 = time.perf_counter()
        recipe = fit_diffusion(
            pipe, sets["source"], sets["control"], sets["target"], site=args.site, layers=args.layers,
            num_inference_steps=args.fit_steps, timestep_buckets=args.timestep_buckets,
            guidance_scale=args.guidance, height=args.height, width=args.width, seed=args.seed,
            dsas=DSASOptions(threshold=args.threshold),
        )
        fit_s = time.perf_counter() - t0
        recipe.fit_info["model_name"] = args.pipeline
        recipe.save_pretrained(args.out / "recipe")
    console.print(diagnostics_table(recipe, title="per-block diagnostics"))

    # side-by-side timing of one batch: unsteered, CAA, CAA + DSAS (after a warm-up call)
    prompts = sets["concept_eval"][:2] + sets["other_eval"][:2]
    generate_images(pipe, prompts[:1], None, seed=args.seed, **image_kw)
    timing = {}
    for name, r in (("unsteered", None), ("caa", without_gates(recipe)), ("caa+dsas", recipe)):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate_images(pipe, prompts, r, 4.0, seed=args.seed, cfg=args.cfg, **image_kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        timing[name] = time.perf_counter() - t0
    timing_ratio = {k: v / timing["unsteered"] for k, v in timing.items()}

    scorer = CLIPScorer(args.clip, device=args.device) if args.clip else None
    strengths = [float(s) for s in args.strengths.split(",") if s.strip()]
    result = sweep(pipe, recipe, sets["concept_eval"], sets["other_eval"], strengths, scorer=scorer,
                   seed=args.seed, cfg=args.cfg, progress=lambda m: console.print(f"[dim]{m}[/]"),
                   **image_kw)
    console.print(summary_table(result))
    paths = save_sweep(result, args.out, tile=args.tile)
    report = json.loads(paths["json"].read_text())
    report.update(
        pipeline=args.pipeline, denoiser=recipe.model.model_type, device=str(pipe.device),
        dtype=args.dtype, steps=args.steps, fit_seconds=fit_s, seconds_per_batch=timing,
        time_ratio_to_unsteered=timing_ratio, gate_accuracy=[
            {"site": d["site"], "gate_accuracy": d.get("gate_accuracy"), "scale": d["scale"]}
            for d in recipe.diagnostics()
        ],
    )
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    console.print("time per batch of 4 images (ratio to unsteered): " + ", ".join(
        f"{k} {v:.2f}s ({timing_ratio[k]:.2f}x)" for k, v in timing.items()))
    console.print(f"wrote {paths['json']} and {paths['grid']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
