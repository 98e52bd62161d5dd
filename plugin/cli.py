"""The ``nograd`` command line: ``nograd <subcommand> ...`` (also ``python -m nograd``).

Subcommands:
- ``merge``: a streamed weight merge between safetensors checkpoints (``nograd.merge``), e.g.
  ``nograd merge frank --mllm A --reasoning B --base C --out D``.
- ``list``: every method with its summary, paper, families and options, then the supported model families.
- ``demo``: the Gradio demo on 127.0.0.1 (``--host``, ``--port``; ``--share`` only when asked).
- ``bench``: ``nograd bench NAME [args]`` runs ``bench/NAME.py``; without NAME it lists them.

Each subcommand is one ``add_<name>(subparsers)`` that registers its parser and sets ``func``; ``main`` dispatches.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _prior(text: str):
    return text if text in ("auto", "attention", "exp") else _floats(text)


def _lambda(text: str):
    values = _floats(text)
    return values[0] if len(values) == 1 else values


def _layers(text: str):
    start, _, end = text.partition(":")
    try:
        return int(start or 0), (int(end) if end else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END (END may be empty), got {text!r}") from None


def add_merge(subparsers) -> None:
    from .merge import RULES

    p = subparsers.add_parser(
        "merge", help="merge a reasoning LLM into a multimodal LLM, checkpoint to checkpoint (streamed)",
        description="Streamed, shard-by-shard merge of safetensors checkpoints (nograd.merge). Options mirror "
                    "nograd.apply(model, 'frank', ...); defaults are FRANK's.")
    p.add_argument("method", nargs="?", default="frank", help="merge method (default: frank)")
    p.add_argument("--mllm", required=True, help="the multimodal model's checkpoint folder (safetensors)")
    p.add_argument("--reasoning", required=True, help="the reasoning LLM's checkpoint folder")
    p.add_argument("--base", default=None, help="their common base LLM's checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (config, tokenizer, processor files are copied)")
    p.add_argument("--rule", choices=RULES, default=None, help="merge rule (default: frank)")
    p.add_argument("--coef", choices=("frank", "metagpt", "prior"), default=None, help="rule=frank coefficients")
    p.add_argument("--prior", type=_prior, default=None,
                   help="'exp' (default without calibration) or comma-separated π_V per decoder layer")
    p.add_argument("--prior-beta", type=float, default=None, help="decay of the data-free prior (default 3.0)")
    p.add_argument("--lambda-r", type=_lambda, default=None, help="manual λ_R: one number or one per layer")
    p.add_argument("--weights", type=_floats, default=None, help="λ_V,λ_R of task_arithmetic/ties/dare_ties")
    p.add_argument("--density", type=float, default=None, help="ties/dare_ties density (default 0.5)")
    p.add_argument("--seed", type=int, default=None, help="dare_ties seed (default 0)")
    p.add_argument("--layers", type=_layers, default=None, help="decoder layers START:END that may be merged")
    p.add_argument("--keep-shallow-layers", type=int, default=None, help="keep the first k layers of the MLLM")
    p.add_argument("--non-layer-policy", choices=("mllm", "reasoning", "merge"), default=None,
                   help="embeddings, final norm, lm_head: the MLLM's (default), the reasoning LLM's, or merged with "
                        "the coefficients of the nearest decoder layer")
    p.add_argument("--max-shard-size", default=None, help="e.g. 5GB; default: the MLLM's shard layout")
    p.add_argument("--device", default=None, help="where the arithmetic runs (default cpu)")
    p.add_argument("--report", default=None, help="also write the merge report as JSON to this file")
    p.set_defaults(func=run_merge)


def run_merge(args) -> int:
    from .merge import describe_report, merge

    names = ("rule", "coef", "prior", "prior_beta", "lambda_r", "weights", "density", "seed", "layers",
             "keep_shallow_layers", "non_layer_policy", "max_shard_size", "device")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.report:  # checked before the merge, not after it
        report_path = pathlib.Path(args.report).resolve()
        if not report_path.parent.is_dir():
            raise FileNotFoundError(f"--report {args.report}: no folder {report_path.parent}")
        if report_path.is_dir() or not os.access(report_path.parent, os.W_OK) or (
                report_path.exists() and not os.access(report_path, os.W_OK)):
            raise ValueError(f"--report {args.report}: not a file that can be written")
    report = merge(args.method, mllm=args.mllm, reasoning=args.reasoning, base=args.base, out=args.out, **options)
    print(describe_report(report))
    print(f"wrote {len(report['files'])} file(s), {report['bytes'] / 1e6:.1f} MB of weights, to {report['out']}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _source_tree(part: str) -> pathlib.Path:
    """``part`` (``demo``, ``bench``) of the source tree this nograd runs from (an editable install or a clone):
    they ship with the repository, not in the wheel."""
    root = pathlib.Path(__file__).resolve().parents[1]
    if not (root / part).is_dir():
        raise FileNotFoundError(f"no {part}/ folder beside this nograd ({root}): `nograd {part}` runs from a clone "
                                f"of the repository installed with `pip install -e .`")
    return root / part


# ---- nograd list ----------------------------------------------------------------------------------------------------
def add_list(subparsers) -> None:
    p = subparsers.add_parser("list", help="the methods, the model families they support and their options",
                              description="Every registered method (nograd.methods()): summary, paper, families "
                                          "and each option with its default; then the supported model families.")
    p.add_argument("--json", action="store_true", help="print the same as JSON")
    p.set_defaults(func=run_list)


def run_list(args) -> int:
    from .registry import methods
    from .patches import supported_families

    infos = methods()
    kinds = {kind: supported_families(kind) for kind in ("text", "vlm", "dit")}
    if args.json:
        print(json.dumps({"methods": {name: dict(summary=i.summary, paper=i.paper, arxiv=i.arxiv,
                                                 families=list(i.families),
                                                 options={o: dict(default=repr(m["default"]), doc=m["doc"])
                                                          for o, m in i.options.items()})
                                      for name, i in infos.items()},
                          "families": kinds}, indent=2))
        return 0
    print(f"{len(infos)} methods (nograd.apply(model, NAME, **options)):\n")
    for name, info in infos.items():
        print(f"{name}: {info.summary}")
        print(f"  paper: {info.paper} (arXiv {info.arxiv})")
        print(f"  families: {', '.join(info.families)}")
        print("  options:" if info.options else "  options: none")
        for option, meta in info.options.items():
            print(f"    {option} = {meta['default']!r}: {meta['doc']}")
        print()
    print("model families:")
    for kind, families in kinds.items():
        print(f"  {kind}: {', '.join(families)}")
    return 0


# ---- nograd demo ----------------------------------------------------------------------------------------------------
def add_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="start the Gradio demo on 127.0.0.1 (needs the [demo] extra)",
                              description="The Gradio demo: one tab per family, the plain model beside the method. "
                                          "It binds to 127.0.0.1 unless --host says otherwise, and makes no public "
                                          "link unless --share is given.")
    add_demo_arguments(p)
    p.set_defaults(func=run_demo)


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The demo's options, for ``nograd demo`` and ``python -m demo`` alike."""
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 opens it to the network)")
    parser.add_argument("--port", type=_port, default=7860, help="port, 1-65535 (default 7860)")
    parser.add_argument("--share", action="store_true", default=False,
                        help="also make a public gradio.live link (off unless given)")
    return parser


def _port(text: str) -> int:
    port = int(text) if text.strip().lstrip("-").isdigit() else None
    if port is None or not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}: an int in 1-65535")
    return port


def run_demo(args) -> int:
    root = str(_source_tree("demo").parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from demo.app import run

    return run(args)


# ---- nograd bench ---------------------------------------------------------------------------------------------------
def benchmarks() -> dict[str, pathlib.Path]:
    """name -> script of every ``bench/<name>.py``."""
    return {path.stem: path for path in sorted(_source_tree("bench").glob("*.py")) if not path.stem.startswith("_")}


def add_bench(subparsers) -> None:
    p = subparsers.add_parser("bench", help="run a benchmark script bench/NAME.py (no NAME: list them)",
                              description="Run bench/NAME.py with the arguments that follow NAME "
                                          "(e.g. nograd bench attention --list); without NAME, list the benchmarks.")
    p.add_argument("name", nargs="?", default=None, help="the benchmark (bench/NAME.py)")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark script")
    p.set_defaults(func=run_bench)


def run_bench(args) -> int:
    import runpy

    scripts = benchmarks()
    if args.name is None:
        print("benchmarks (nograd bench NAME [args]; NAME --help for its options):")
        for name, path in scripts.items():
            doc = (path.read_text().split('"""')[1].strip().splitlines() or [""])[0] if '"""' in path.read_text() \
                else ""
            print(f"  {name}: {doc}")
        return 0
    if args.name not in scripts:
        raise ValueError(f"no benchmark {args.name!r}; available: {', '.join(scripts)}")
    argv = sys.argv
    sys.argv = [str(scripts[args.name]), *args.args]
    try:
        runpy.run_path(str(scripts[args.name]), run_name="__main__")
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    finally:
        sys.argv = argv
    return 0


SUBCOMMANDS = [add_merge, add_list, add_demo, add_bench]
"""One function per subcommand; a new subcommand appends its ``add_<name>`` here."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nograd", description="Training-free inference-time methods for Hugging "
                                                                "Face models.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def main(argv=None) -> int:
    """Run ``nograd`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as error:
        print(f"nograd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (nograd list | head): stop quietly, as the shell's own tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes stdout
        return 141


if __name__ == "__main__":
    sys.exit(main())
