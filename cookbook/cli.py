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
    """Without ``--direction``: notebook 20 for the run's preset (``convert_policy``: source preparation, then
    HF -> Megatron-Core into the run folder; ``--verify`` adds its checks). ``--direction hf_to_mcore`` does the
    same on ``--src``/``--out``, so an fp8 or unfixed download is prepared exactly as the notebook would prepare
    it; ``mcore_to_hf`` and ``fp8_to_bf16`` run that one step on the folders given."""
    from cookbook.convert.pipeline import convert, convert_policy, verify_conversion

    if args.direction is None and (args.src or args.out or args.tokenizer_dir):
        raise ConfigError("--src/--out/--tokenizer-dir go with --direction; without it the run's preset is converted "
                          "(set model.hf_dir=DIR to convert your download)")
    if args.direction is not None and not (args.src and args.out):
        raise ConfigError(f"--direction {args.direction} needs --src and --out")
    if args.verify and args.direction not in (None, "hf_to_mcore"):
        raise ConfigError("--verify checks an HF -> Megatron-Core conversion: use it without --direction or with "
                          "--direction hf_to_mcore")
    cfg = _open(args)
    if args.direction in (None, "hf_to_mcore"):
        result = convert_policy(cfg, overwrite=args.overwrite, src=args.src or None, out=args.out or None)
        print("\n".join(result.steps + [f"converted: {result.ckpt}" if result.ckpt
                                        else "this part is done; part 0 finalizes"]))
        if not (args.verify and result.ckpt):
            return 0
        checks = verify_conversion(cfg, result.source, result.ckpt)
        print(checks)
        return 0 if checks.bit_exact else 1
    out = convert(cfg, args.direction, args.src, args.out, overwrite=args.overwrite,
                  tokenizer_dir=args.tokenizer_dir or None)
    print(f"converted: {out}" if out else "this part is done; part 0 finalizes")
    return 0


def cmd_verify_convert(args: argparse.Namespace) -> int:
    """Notebook 20's checks on an existing conversion (``verify_conversion``); exit 1 unless bit-exact."""
    from pathlib import Path

    from cookbook.convert.pipeline import verify_conversion
    from cookbook.convert.source import prepare_hf_dir, prepare_source
    from cookbook.rundir import mcore_dir

    cfg = _open(args)
    ckpt = Path(args.ckpt) if args.ckpt else mcore_dir(cfg)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt} is not a converted checkpoint: run `cookbook convert` with the same "
                                "--run-name (or model.mcore_dir) first, or pass --ckpt")
    source = prepare_hf_dir(cfg, args.src)[0] if args.src else prepare_source(cfg)[0]
    checks = verify_conversion(cfg, source, ckpt)
    print(checks)
    return 0 if checks.bit_exact else 1


def cmd_train(args: argparse.Namespace) -> int:
    from cookbook.data.prepare import prepare_data
    from cookbook.grpo.loop import train

    cfg = _open(args)
    prepare_data(cfg)
    result = train(cfg, progress=not args.no_progress, stop_after=args.stop_after or None)
    print(f"trained {result.steps_done} steps in {result.run_dir}; HF export: {result.hf_export or '-'}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """Will it fit: the layout's GPU and host memory, the verdict on 80 GB and 141 GB GPUs, the smallest layouts
    that fit (``cookbook.plan``); nothing is started and no run folder is made. Exit 1 when it does not fit."""
    from cookbook.config import load_config
    from cookbook.plan import GPU, GPUS, plan_text, plans

    cfg = load_config(args.preset, args.overrides, values={"run_name": "plan"})
    gpus = [GPU(f"{g:g} GiB", int(g * 2**30)) for g in args.gpu_gib] if args.gpu_gib else list(GPUS)
    print(plan_text(cfg, gpus, search_layouts=not args.no_search, host_gib=args.host_gib, max_gpus=args.max_gpus))
    return 0 if all(p.fits for p in plans(cfg, gpus, host_gib=args.host_gib).values()) else 1


def cmd_run(args: argparse.Namespace) -> int:
    from cookbook.runner import parse_cli_value, run_notebook

    params = {name: parse_cli_value(value) for name, value in args.param or []}
    out = run_notebook(args.notebook, params, params_file=args.file, run_name=args.run_name,
                       runs_dir=args.runs_dir or "runs", progress=not args.no_progress)
    print(f"executed notebook: {out}")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    """One node of a batch job (``cookbook.cluster.launch``): node 0 drives, the others join Ray and wait."""
    from cookbook.cluster.launch import launch
    from cookbook.cluster.raynode import LaunchError
    from cookbook.runner import parse_cli_value

    params = {name: parse_cli_value(value) for name, value in args.param or []}
    try:
        return launch(args.notebook, params, params_file=args.file, run_name=args.run_name,
                      runs_dir=args.runs_dir or "runs", connect_timeout=args.connect_timeout,
                      progress=not args.no_progress)
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def cmd_demo(args: argparse.Namespace) -> int:
    from cookbook.runner import DEMO_NOTEBOOKS, run_demo

    outputs = run_demo(args.preset, args.run_name, args.runs_dir or "runs",
                       tuple(args.notebooks) if args.notebooks else DEMO_NOTEBOOKS)
    folders = list(dict.fromkeys(str(out.parent.parent) for out in outputs))
    print(f"\ndemo finished; run folder{'s' if len(folders) > 1 else ''}: {', '.join(folders)}")
    for out in outputs:
        print(f"  {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Notebook 90: compare run folders (``build_report``): figures and tables into --out."""
    from pathlib import Path

    from cookbook.analysis.report import build_report

    def typed(path: str) -> str:  # as typed from here when it exists; else the project root's (as the notebook)
        return str(Path(path).absolute()) if path and Path(path).exists() else path

    groups = {}
    for spec in args.group:
        name, sep, members = spec.partition("=")
        if not (sep and name and members):
            raise ConfigError(f"--group {spec!r}: expected NAME=RUN[,RUN...]")
        groups[name] = [typed(m) for m in members.split(",") if m]
    out = str(Path(args.out).absolute()) if args.out else ""
    try:
        rep = build_report([typed(r) for r in args.runs], args.label, out, groups or None, args.spread)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(rep.text())
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    """A study (``cookbook.analysis.study``): the grid's runs of notebook 30 into one folder, then its report."""
    from cookbook.analysis.study import grid_yaml, load_grid, plan, read_grid
    from cookbook.runner import run_study
    from cookbook.rundir import resolve_from_root

    if args.grid:
        grid = load_grid(args.grid)
    elif args.out and (resolve_from_root(args.out) / "study.yaml").is_file():
        grid = read_grid(resolve_from_root(args.out))  # resuming a study: its own grid
    else:
        grid = load_grid()
    only = tuple(c for c in (args.only or "").split(",") if c)
    if args.show_grid:
        print(grid_yaml(grid), end="")
        return 0
    if args.dry_run:
        for spec in plan(grid, only):
            print(f"{spec.name}: {spec.overrides}")
        return 0
    rep = run_study(grid, args.out, only=only, progress=not args.no_progress)
    if rep is not None and rep.table is not None:
        print(rep.final_table().to_string())
        print(f"report: {rep.study_dir / 'report'}")
    failed = [r["run"] for r in (rep.manifest["runs"] if rep is not None else []) if r.get("status") != "done"]
    return 1 if failed else 0


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

    p = sub.add_parser("convert", help="checkpoint conversion (notebook 20): the run's policy, or one step")
    _common(p)
    p.add_argument("--direction", default=None, choices=("hf_to_mcore", "mcore_to_hf", "fp8_to_bf16"),
                   help="one step on --src/--out (hf_to_mcore prepares --src as notebook 20 does); default: the "
                        "preset's source (tiny build or model.hf_dir) prepared and converted into the run folder")
    p.add_argument("--src", default="", help="with --direction: source checkpoint folder")
    p.add_argument("--out", default="", help="with --direction: output folder (written atomically)")
    p.add_argument("--tokenizer-dir", default="", help="mcore_to_hf: where tokenizer files come from")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--verify", action="store_true",
                   help="then check it as notebook 20 does: HF -> Megatron -> HF bit for bit, and the logits")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("verify-convert", help="notebook 20's checks on a run's converted checkpoint: bit-exact "
                                              "round trip and HF-vs-Megatron logits (exit 1 unless bit-exact)")
    _common(p)
    p.add_argument("--src", default="", help="the HF checkpoint it was converted from (default: the preset's "
                                             "source, as `cookbook convert` prepares it)")
    p.add_argument("--ckpt", default="", help="the Megatron-Core checkpoint (default: the run's, model.mcore_dir "
                                              "or runs/<run>/mcore)")
    p.set_defaults(func=cmd_verify_convert)

    p = sub.add_parser("train", help="GRPO training (notebook 30); resumes from the run folder's checkpoints")
    _common(p)
    p.add_argument("--stop-after", type=int, default=0, help="stop after this many steps of this call")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plan", help="will it fit: per-GPU memory of the layout (trainer, vLLM, host) on 80 GB and "
                                    "141 GB GPUs, the tightest resource, the smallest layouts that fit")
    p.add_argument("--preset", default="tiny", choices=PRESETS, help="model/recipe preset (default: tiny)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="layout or recipe overrides, e.g. "
                                                                     "parallel.expert=4 parallel.num_nodes=2")
    p.add_argument("--gpu-gib", type=float, action="append", default=[],
                   help="judge on GPUs of this many GiB instead of 80 GB and 141 GB (repeatable)")
    p.add_argument("--host-gib", type=float, default=None, help="host memory per node, GiB (default: not judged)")
    p.add_argument("--max-gpus", type=int, default=1024, help="search layouts up to this many GPUs")
    p.add_argument("--no-search", action="store_true", help="skip the search for the smallest layouts")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="execute a notebook headless with papermill into runs/<run>/notebooks/")
    p.add_argument("notebook", help="a notebook name (10_data) or path")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter (YAML value), repeatable")
    p.add_argument("-f", "--file", default=None, help="a YAML file of parameters (e.g. notebooks/params/tiny.yaml)")
    p.add_argument("--run-name", default="", help="run folder name (default: <preset>-<time>)")
    p.add_argument("--runs-dir", default="", help="where run folders go (default: runs/)")
    p.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("launch", help="one node of a multi-node batch job (RANK / WORLD_SIZE / MASTER_ADDR / "
                                      "MASTER_PORT as PAI-DLC and PyTorchJob set them): the same command on every "
                                      "node; node 0 runs the notebook, the others join its Ray cluster")
    p.add_argument("notebook", help="a notebook name (30_grpo_moonlight) or path")
    p.add_argument("-p", "--param", nargs=2, action="append", metavar=("NAME", "VALUE"),
                   help="a notebook parameter (YAML value), repeatable")
    p.add_argument("-f", "--file", default=None, help="a YAML file of parameters (e.g. notebooks/params/tiny.yaml)")
    p.add_argument("--run-name", default="", help="run folder name, the same on every node (required with "
                                                  "WORLD_SIZE > 1)")
    p.add_argument("--runs-dir", default="", help="where run folders go, on storage all nodes share (default: runs/)")
    p.add_argument("--connect-timeout", type=float, default=600,
                   help="seconds to wait for the Ray head (other nodes) or for all nodes to join (node 0)")
    p.add_argument("--no-progress", action="store_true", help="no papermill progress bar")
    p.set_defaults(func=cmd_launch)

    p = sub.add_parser("report", help="compare runs (notebook 90): curves side by side, seeds grouped with error "
                                      "bars, summary table; PNGs and CSVs into --out")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with metrics.jsonl)")
    p.add_argument("--out", default="", help="output folder (default: the first run's plots/)")
    p.add_argument("--label", action="append", default=[], help="a label per run, in order (default: folder names)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=RUN[,RUN...]",
                   help="a study group of runs (labels or folders), repeatable (default: <case>-seed<k> names "
                        "grouped by case)")
    p.add_argument("--spread", default="minmax", choices=("minmax", "std"),
                   help="the study's error bars: min-max or +-1 sample std over a group's runs")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("study", help="a study: a grid of cases x seeds, each a papermill run of notebook 30 in one "
                                     "folder (resumable), then the report case by case (notebook 90 with study)")
    p.add_argument("--grid", default="", help="a YAML grid (default: the MoE stability study; --show-grid prints it)")
    p.add_argument("--out", default="", help="the study folder (default: runs/study-<time>); an existing one resumes")
    p.add_argument("--only", default="", help="run only these cases (comma-separated)")
    p.add_argument("--show-grid", action="store_true", help="print the grid as YAML and stop")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their settings and stop")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_study)

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
