"""SoftPAG / PAG / HeadHunter cost: time per image against plain CFG and against diffusers' own SD3 PAG pipeline.

One process, one SD3-shaped pipeline (random weights, built from configs: a transformer larger than the tests'
tiny one, the tests' tiny text encoders and VAE; SD3.0-shaped, without qk-norm, so diffusers' PAG processors are
correct on it), identical prompt, seed and steps for every case, cases timed round-robin:

- ``plain CFG``: ``StableDiffusion3Pipeline`` with CFG (what the user ran before); the denominator;
- ``diffusers PAG``: ``StableDiffusion3PAGPipeline(pag_applied_layers=["blocks.1"])``, ``pag_scale=3``;
- ``nograd pag image_identity``: ``nograd.apply(pipe, "pag", layers=["blocks.1"], mode="image_identity")``, the
  same weak model as diffusers' (their outputs are compared and the max difference printed);
- ``nograd pag joint_identity``: the paper's / diffusers guider's identity (a different weak model); its perturbed
  row runs no attention in the PAG layer (u = 1 heads skip the product) and joins at that layer (late fork);
- ``nograd pag joint_identity, late_fork=False``: the same with the perturbed row appended at the transformer input;
- ``nograd softpag 4 heads u=0.5`` and ``u=1``: head-level SoftPAG, batched with cond/uncond (one transformer call
  per step); at u = 1 the 4 heads skip their attention product;
- ``nograd softpag, batch=False``: the perturbed rows in a second transformer call.

Expected: every PAG variant costs about one extra row-set of the transformer per step (+50 % transformer FLOPs with
CFG); the VAE and text encoders are not repeated.

    python bench/headhunter.py                 # CPU defaults (~1-2 min on 2 cores)
    python bench/headhunter.py --quick         # a smoke run
    python bench/headhunter.py --device cuda --size 512 --layers 12 --repeats 5
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import nograd
from nograd.tiny.dits import build_pipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", type=int, default=128, help="image side in pixels (VAE factor 2, patch 2)")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="size 64, 2 layers, 2 steps, 1 repeat")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.size, args.layers, args.steps, args.repeats = 64, 2, 2, 1
    from diffusers import SD3Transformer2DModel, StableDiffusion3PAGPipeline

    torch.manual_seed(0)
    inner = args.heads * args.head_dim
    grid = args.size // 2 // 2
    transformer = SD3Transformer2DModel(
        sample_size=grid * 2, patch_size=2, in_channels=4, num_layers=args.layers, attention_head_dim=args.head_dim,
        num_attention_heads=args.heads, joint_attention_dim=32, caption_projection_dim=inner,
        pooled_projection_dim=64, out_channels=4, pos_embed_max_size=grid * 2).eval()
    pipe = build_pipeline("sd3")
    pipe.transformer = transformer
    pipe.to(args.device)
    components = {k: v for k, v in pipe.components.items() if k not in ("image_encoder", "feature_extractor")}
    pag_pipe = StableDiffusion3PAGPipeline(**components, pag_applied_layers=["blocks.1"])
    for p in (pipe, pag_pipe):
        p.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=args.steps, height=args.size, width=args.size, guidance_scale=5.0,
                output_type="latent")

    def run(p, **extra):
        return p("a photo of a cat", generator=torch.Generator(args.device).manual_seed(0), **call, **extra).images

    def nograd_case(method, **options):
        def case():
            with nograd.apply(pipe, method, **options):
                return run(pipe)
        return case

    heads = [(1, 0), (1, 3), (min(2, args.layers - 1), 5), (min(3, args.layers - 1), 1)]
    cases = {
        "plain CFG": lambda: run(pipe),
        "diffusers PAG": lambda: run(pag_pipe, pag_scale=3.0),
        "nograd pag image_identity": nograd_case("pag", layers=["blocks.1"], mode="image_identity",
                                                 scale=3.0),
        "nograd pag joint_identity": nograd_case("pag", layers=["blocks.1"], scale=3.0),
        "nograd pag joint_identity, late_fork=False": nograd_case("pag", layers=["blocks.1"], scale=3.0,
                                                                  late_fork=False),
        "nograd softpag 4 heads u=0.5": nograd_case("softpag", heads=heads, u=0.5, scale=3.0),
        "nograd softpag 4 heads u=1": nograd_case("softpag", heads=heads, u=1.0, scale=3.0),
        "nograd softpag, batch=False": nograd_case("softpag", heads=heads, u=0.5, scale=3.0, batch=False),
    }
    outputs = {name: case() for name, case in cases.items()}  # warm-up, and outputs for the parity check
    times = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name, case in cases.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            case()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)

    tokens = grid * grid
    print(f"# SoftPAG / PAG cost: SD3-shaped, {args.layers} layers x {args.heads} heads x {args.head_dim}, "
          f"{args.size}px = {tokens} image tokens + 333 text tokens, {args.steps} steps, CFG 5, "
          f"{args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"median of {args.repeats}")
    print()
    plain, pag = statistics.median(times["plain CFG"]), statistics.median(times["diffusers PAG"])
    print("| case | ms / image | vs plain CFG | vs diffusers PAG |")
    print("|---|---|---|---|")
    for name in cases:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.1f} | {t / plain:.2f}x | {t / pag:.2f}x |")
    diff = (outputs["nograd pag image_identity"] - outputs["diffusers PAG"]).abs().max().item()
    effect = (outputs["diffusers PAG"] - outputs["plain CFG"]).abs().max().item()
    print()
    print(f"nograd pag image_identity vs diffusers PAG: max |diff| {diff:.2e} (PAG effect {effect:.2e})")
    print()
    layer_costs(args, tokens + 333)


def layer_costs(args, n: int) -> None:
    """One joint-attention call of a PAG layer, [uncond, cond, perturbed] rows: what the perturbed row's blend costs
    at u = 0.5 and at u = 1 (whose heads skip the attention product), on the backend ``auto`` picks."""
    from nograd import kernels

    b, h, d = 3, args.heads, args.head_dim
    q, k, v = (torch.randn(b, h, n, d, device=args.device) for _ in range(3))
    cases = {"no perturbed head (plain attention)": None}
    for u, count in ((0.5, h), (1.0, h), (0.5, max(h // 4, 1)), (1.0, max(h // 4, 1))):
        blend = torch.zeros(b, h, device=args.device)
        blend[2, :count] = u
        cases[f"perturbed row: {count} of {h} heads at u={u:g}"] = blend
    times = {name: [] for name in cases}
    for _ in range(max(args.repeats, 1) * 10):
        for name, blend in cases.items():
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            kernels.attention(q, k, v, blend=blend)
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    plain = statistics.median(times["no perturbed head (plain attention)"])
    print(f"# One attention call, {b} rows x {h} heads x {n} tokens x {d}, backend "
          f"{kernels.choose_backend(q)}, median of {len(times[name])}")
    print()
    print("| case | ms | vs plain attention |")
    print("|---|---|---|")
    for name in cases:
        t = statistics.median(times[name])
        print(f"| {name} | {t * 1e3:.2f} | {t / plain:.2f}x |")


if __name__ == "__main__":
    main()
