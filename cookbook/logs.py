"""Where library output goes: one log file per process in ``<run>/logs/``, so that an executed notebook holds
what a reader needs (progress, tables, plots, the project's own warnings) and not the hundreds of lines that
Megatron-Core, vLLM and Ray print while they work.

- Ray actors (the trainer and the rollout engine) call ``redirect_process_output`` first thing: their
  stdout and stderr, C++ and CUDA output included, go to ``logs/<actor>.log``.
- The driver (a notebook kernel or ``cookbook train``) keeps its own output; ``quiet_libraries`` sends the
  Python loggers and warnings of the libraries it calls in-process (Megatron-Core during conversion,
  transformers, Ray's driver side) to ``logs/driver.log`` instead of the notebook.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

LIBRARIES = ("megatron", "megatron.core", "vllm", "ray", "transformers", "torch", "datasets", "modelscope",
             "urllib3", "filelock", "papermill")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def logs_dir(run_dir: str | os.PathLike) -> Path:
    path = Path(run_dir) / "logs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def redirect_process_output(run_dir: str | os.PathLike, name: str) -> Path:
    """Send this whole process's stdout and stderr (file descriptors 1 and 2) to ``<run>/logs/<name>.log``.
    For worker processes only: a notebook kernel's descriptors belong to Jupyter."""
    path = logs_dir(run_dir) / f"{name}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"--- {name} (pid {os.getpid()}) logging here", flush=True)
    return path


def quiet_libraries(run_dir: str | os.PathLike, name: str = "driver") -> Path:
    """Route the libraries' Python loggers and Python warnings to ``<run>/logs/<name>.log`` (idempotent).
    The project's own ``cookbook`` logger and errors still reach the notebook."""
    path = logs_dir(run_dir) / f"{name}.log"
    handler = _file_handler(path)
    for lib in LIBRARIES:
        logger = logging.getLogger(lib)
        for old in list(logger.handlers):
            if getattr(old, "_cookbook", False) or isinstance(old, logging.StreamHandler) and \
                    not isinstance(old, logging.FileHandler):
                logger.removeHandler(old)
        logger.addHandler(handler)
        logger.propagate = False
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    for old in [h for h in warnings_logger.handlers if getattr(h, "_cookbook", False)]:
        warnings_logger.removeHandler(old)
    warnings_logger.addHandler(handler)
    warnings_logger.propagate = False
    root = logging.getLogger()
    if handler not in root.handlers:  # what reaches the root (a logger without handlers of its own) goes there too
        root.addHandler(handler)
    return path


_HANDLERS: dict[Path, logging.Handler] = {}


def _file_handler(path: Path) -> logging.Handler:
    if path not in _HANDLERS:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._cookbook = True  # type: ignore[attr-defined]
        _HANDLERS[path] = handler
    return _HANDLERS[path]


def logged(cls: type, run_dir: str | os.PathLike, name: str) -> type:
    """``cls`` for a Ray actor whose process output goes to ``<run>/logs/<name>.log`` from its first line, which
    names the process and the Ray node it runs on."""

    class Logged(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            import ray

            redirect_process_output(run_dir, name)
            print(f"--- on Ray node {ray.get_runtime_context().get_node_id()}", flush=True)  # asked of Ray
            super().__init__(*args, **kwargs)

    Logged.__name__ = Logged.__qualname__ = cls.__name__
    return Logged
