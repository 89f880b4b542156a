"""A resumable output folder: work goes into ``.tmp-<name>`` next to the output, one marker per finished
unit, and the folder is renamed to its final name only when complete.

An interrupted job (even SIGKILL) leaves the staging folder with its markers; running the same job again
skips the finished units. Several processes (or nodes sharing a file system) may each fill their own
units of one staging folder; one of them finalizes.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterable

from cookbook.atomic import write_json


class Staging:
    def __init__(self, out_dir: str | os.PathLike, job: dict, overwrite: bool = False):
        self.out = Path(out_dir)
        if self.out.exists() and not overwrite:
            raise FileExistsError(f"{self.out} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
        self.dir = self.out.with_name(f".tmp-{self.out.name}")
        self.markers = self.dir / ".done"
        self.job = job

    def open(self) -> "Staging":
        """Create the staging folder, or resume one left by the same job (a different job is an error)."""
        job_file = self.dir / ".job.json"
        self.markers.mkdir(parents=True, exist_ok=True)
        if job_file.is_file():
            previous = json.loads(job_file.read_text())
            if previous != json.loads(json.dumps(self.job)):
                raise FileExistsError(
                    f"{self.dir} holds an unfinished job with other settings ({previous}); delete it to start over")
        else:
            write_json(job_file, self.job)
        return self

    def done(self, unit: str) -> bool:
        return (self.markers / unit).is_file()

    def mark(self, unit: str) -> None:
        write_json(self.markers / unit, {"time": time.time()})

    def wait_for(self, units: Iterable[str], poll_s: float = 5.0, timeout_s: float = 24 * 3600) -> None:
        """Block until other processes have marked these units (the finalizing rank waits for the rest)."""
        pending = [u for u in units if not self.done(u)]
        deadline = time.time() + timeout_s
        while pending:
            if time.time() > deadline:
                raise TimeoutError(f"units never finished in {self.dir}: {pending[:5]}")
            time.sleep(poll_s)
            pending = [u for u in pending if not self.done(u)]

    def finish(self) -> Path:
        """Drop the bookkeeping and rename the staging folder to the output (replacing an old one)."""
        shutil.rmtree(self.markers)
        (self.dir / ".job.json").unlink()
        if self.out.exists():
            old = self.out.with_name(f".old-{self.out.name}")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.out, old)
            os.replace(self.dir, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.dir, self.out)
        return self.out
