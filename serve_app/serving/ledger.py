"""Per-version traffic counts in one replica: what a canary or shadow rollout is judged by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class VersionTraffic:
    requests: int = 0
    rows: int = 0
    errors: int = 0
    latency_s_total: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        mean_ms = 1000 * self.latency_s_total / self.requests if self.requests else None
        return {"requests": self.requests, "rows": self.rows, "errors": self.errors, "mean_latency_ms": mean_ms}


@dataclass
class ShadowComparison:
    requests: int = 0
    rows: int = 0
    agreeing_rows: int = 0
    failures: int = 0

    def as_dict(self) -> dict[str, Any]:
        rate = self.agreeing_rows / self.rows if self.rows else None
        return {"requests": self.requests, "rows": self.rows, "agreeing_rows": self.agreeing_rows, "agreement": rate, "failures": self.failures}


@dataclass
class TrafficLedger:
    by_version: dict[str, VersionTraffic] = field(default_factory=dict)
    shadow: dict[str, ShadowComparison] = field(default_factory=dict)

    def answered(self, version: str, rows: int, latency_s: float) -> None:
        entry = self.by_version.setdefault(version, VersionTraffic())
        entry.requests += 1
        entry.rows += rows
        entry.latency_s_total += latency_s

    def failed(self, version: str) -> None:
        entry = self.by_version.setdefault(version, VersionTraffic())
        entry.requests += 1
        entry.errors += 1

    def compared(self, shadow_version: str, served: np.ndarray, shadowed: np.ndarray | None) -> None:
        entry = self.shadow.setdefault(shadow_version, ShadowComparison())
        entry.requests += 1
        if shadowed is None:
            entry.failures += 1
            return
        entry.rows += len(served)
        entry.agreeing_rows += int(np.count_nonzero(served == shadowed))

    def as_dict(self) -> dict[str, Any]:
        return {
            "versions": {v: t.as_dict() for v, t in self.by_version.items()},
            "shadow": {v: s.as_dict() for v, s in self.shadow.items()},
        }
