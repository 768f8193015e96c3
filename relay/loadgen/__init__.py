"""The load tool behind ``relay bench`` and ``bench/``: Realtime traffic against any endpoint.

Modules: :mod:`~relay.loadgen.profiles` (what the load sends and times, per
profile), :mod:`~relay.loadgen.results` (run specification and results, merged
across processes), :mod:`~relay.loadgen.stats` (mergeable latency histograms) and
:mod:`~relay.loadgen.fanout` (in-process or multi-process runs, hooks for the
benchmark's measurements, the progress bar).
"""

from __future__ import annotations

from relay.loadgen.fanout import LoadError, ProgressBar, run_load
from relay.loadgen.results import PROFILES, LoadResult, LoadSpec, Profile, merge_results
from relay.loadgen.stats import LatencyHistogram

__all__ = [
    "PROFILES",
    "LatencyHistogram",
    "LoadError",
    "LoadResult",
    "LoadSpec",
    "Profile",
    "ProgressBar",
    "merge_results",
    "run_load",
]
