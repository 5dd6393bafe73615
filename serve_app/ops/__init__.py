"""Operator tools: CLI, local Ray, rollout, tune, bench, batch job, report. Never imported by a replica."""
