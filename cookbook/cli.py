"""`cookbook` command line: the batch face of the notebooks. Each command calls the same function its
notebook calls; no logic lives here beyond argument parsing."""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

from cookbook.config import PRESETS, ConfigError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="model/recipe preset (default: tiny)")
    p.add_argument("--run-name", default="", help="run folder name under runs/ (default: <preset>-<time>)")
    p.add_argument("--runs-dir", default="", help="where run folders go (default: runs/ in the project)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. grpo.lr=1e-6")


def _open(args: argparse.Namespace):
    from cookbook.rundir import open_run

    return open_run(args.preset, args.run_name, args.overrides, args.runs_dir)


def cmd_env(args: argparse.Namespace) -> int:
    from cookbook.envcheck import FAIL, run_envcheck

    cfg = _open(args)
    report = run_envcheck(cfg, strict=False)
    print(report.table())
    print(f"\nsaved {cfg.run_dir / 'env_report.json'}")
    return 1 if args.strict and report.worst == FAIL else 0


def cmd_data(args: argparse.Namespace) -> int:
    from cookbook.data.prepare import prepare_data

    cfg = _open(args)
    report = prepare_data(cfg, out_dir=args.out_dir or None)
    print(report)
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    from cookbook.models.tiny import resolve_hf_dir

    cfg = _open(args)
    print(resolve_hf_dir(cfg))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from cookbook.convert.pipeline import convert

    cfg = _open(args)
    out = convert(cfg, args.direction, args.src, args.out, overwrite=args.overwrite,
                  tokenizer_dir=args.tokenizer_dir or None)
    print(f"converted: {out}" if out else "this part is done; part 0 finalizes")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from cookbook.data.prepare import prepare_data
    from cookbook.grpo.loop import train

    cfg = _open(args)
    prepare_data(cfg)
    result = train(cfg, progress=not args.no_progress, stop_after=args.stop_after or None)
    print(f"trained {result.steps_done} steps in {result.run_dir}; HF export: {result.hf_export or '-'}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from cookbook.runner import parse_cli_value, run_notebook

    params = {name: parse_cli_value(value) for name, value in args.param or []}
    out = run_notebook(args.notebook, params, params_file=args.file, run_name=args.run_name,
                       runs_dir=args.runs_dir or "runs", progress=not args.no_progress)
    print(f"executed notebook: {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from cookbook.runner import DEMO_NOTEBOOKS, run_demo

    outputs = run_demo(args.preset, args.run_name, args.runs_dir or "runs",
                       tuple(args.notebooks) if args.notebooks else DEMO_NOTEBOOKS)
    print(f"\ndemo finished; run folder: {outputs[-1].parent.parent}")
    for out in outputs:
        print(f"  {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cookbook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("env", help="environment report (notebook 00)")
    _common(p)
    p.add_argument("--strict", action="store_true", help="exit 1 if any row fails")
    p.set_defaults(func=cmd_env)

    p = sub.add_parser("data", help="load/generate and preprocess MATH-lighteval (notebook 10)")
    _common(p)
    p.add_argument("--out-dir", default="", help="output folder (default: data.processed_dir or <run>/data)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("model", help="build the tiny model (cached) or check a real preset's HF directory")
    _common(p)
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("convert", help="checkpoint conversion (notebook 20): hf_to_mcore | mcore_to_hf | fp8_to_bf16")
    _common(p)
    p.add_argument("--direction", required=True, choices=("hf_to_mcore", "mcore_to_hf", "fp8_to_bf16"))
    p.add_argument("--src", required=True, help="source checkpoint folder")
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--tokenizer-dir", default="", help="mcore_to_hf: where tokenizer files come from")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("train", help="GRPO training (notebook 30); resumes from the run folder's checkpoints")
    _common(p)
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps of this call")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("run", help="execute a notebook headless with papermill into runs/<run>/notebooks/")
    p.add_argument("notebook", help="a notebook name (10_data) or path")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter (YAML value), repeatable")
    p.add_argument("-f", "--file", default=None, help="a YAML file of parameters (e.g. notebooks/params/tiny.yaml)")
    p.add_argument("--run-name", default="", help="run folder name (default: <preset>-<time>)")
    p.add_argument("--runs-dir", default="", help="where run folders go (default: runs/)")
    p.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="run the notebook sequence on a preset into one run folder (make demo)")
    p.add_argument("--preset", default="tiny", choices=PRESETS)
    p.add_argument("--run-name", default="")
    p.add_argument("--runs-dir", default="")
    p.add_argument("--notebooks", nargs="*", help="which notebooks (default: the demo sequence)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
