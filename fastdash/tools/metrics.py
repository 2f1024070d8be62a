"""Per-step tool metrics (summed over ranks): tools/calls_per_sample, tools/errors, tools/timeouts,
tools/seconds, tools/turns_per_sample, tools/truncated_outputs, tools/call_rate (samples with a call)."""
from __future__ import annotations

from fastdash.distributed import sum_floats


def tool_metrics(completions) -> dict:
    stats = [c.episode.stats for c in completions if c.episode is not None]
    n, calls, errors, timeouts, seconds, turns, cut, called = sum_floats(
        len(stats), sum(s.calls for s in stats), sum(s.errors for s in stats), sum(s.timeouts for s in stats),
        sum(s.seconds for s in stats), sum(s.turns for s in stats), sum(s.truncated_outputs for s in stats),
        sum(s.calls > 0 for s in stats))
    n = max(n, 1)
    return {"tools/calls_per_sample": calls / n, "tools/errors": int(errors), "tools/timeouts": int(timeouts),
            "tools/seconds": seconds, "tools/turns_per_sample": turns / n, "tools/truncated_outputs": int(cut),
            "tools/call_rate": called / n}
