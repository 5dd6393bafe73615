"""What a long-running tool (bench, tune, the benchmark scripts) says as it goes."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


class Progress:
    """One line per stage, with the time since the tool started and the stage's length."""

    def __init__(self, tool: str = "bench") -> None:
        self.tool = tool
        self.start = time.monotonic()
        self.stage_start = self.start

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        print(f"[{self.tool} {now - self.start:6.1f}s] {message}", flush=True)
        self.stage_start = now

    def done(self, message: str) -> None:
        self(f"  {message} ({time.monotonic() - self.stage_start:.1f}s)")


def describe_machine() -> str:
    """E.g. "2 CPUs (AMD EPYC ...), Linux 6.1.0, load 1.20": recorded with every measurement."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.release()}, load {os.getloadavg()[0]:.2f}"
