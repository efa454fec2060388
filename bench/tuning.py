"""The contrastive and rank kernels' autotuners, as ``bench/kernel_table.py`` reports them:
the config each settled on per autotune key, and the time of every config each tuning tried
(``watch_tuning`` keeps those, which Triton overwrites at the next tuning)."""

from __future__ import annotations


def _tuners() -> dict:
    """The autotuned kernels by name (absent under the interpreter or without Triton: None)."""
    from kernels import _contrastive_fast, _contrastive_lean, _contrastive_panel, retrieval

    return {
        "fast fwd": getattr(_contrastive_fast, "_fast_fwd_tuned", None),
        "lean fwd": getattr(_contrastive_lean, "_lean_fwd_tuned", None),
        "lean:fused bwd": getattr(_contrastive_lean, "_lean_bwd_tuned", None),
        "lean:panel Ĝ": getattr(_contrastive_panel, "_grad_panel_tuned", None),
        "ranks": getattr(retrieval, "_rank_rows_tuned", None),
    }


# (kernel, autotune key, {config: median ms}) for every tuning this run did (watch_tuning)
TIMINGS: list[tuple[str, tuple, dict]] = []


def watch_tuning() -> None:
    """Keep the timings of every config each autotuner tries. Triton keeps only the last
    tuning's (``configs_timings``); this wraps each tuner's ``run`` to copy them whenever
    a new key enters its cache."""
    for name, tuner in _tuners().items():
        if tuner is None or getattr(tuner, "_watched", False):
            continue
        original = tuner.run

        def run(*args, tuner=tuner, name=name, original=original, **kwargs):
            before = set(tuner.cache)
            out = original(*args, **kwargs)
            for key in set(tuner.cache) - before:
                timings = getattr(tuner, "configs_timings", None) or {}
                TIMINGS.append((name, key, {cf: (t[0] if isinstance(t, (list, tuple)) else t)
                                            for cf, t in timings.items()}))
            return out

        tuner.run, tuner._watched = run, True


def _config_text(cf) -> str:
    params = " ".join(f"{k}={v}" for k, v in cf.kwargs.items())
    return f"{params} warps={cf.num_warps} stages={cf.num_stages}"


def _key_text(key) -> str:
    return ",".join(str(k) for k in key if isinstance(k, int))  # D and the bit length of B


def tuned_lines() -> list[str]:
    """The config each autotuned kernel settled on, per autotune key (D, B bucket, dtypes),
    and the median time of every config it tried (``watch_tuning``): which tiles win on
    this device, and by how much (the fast forward's 128×128 against its 128×64 tiles, for
    one), for the next round of tuning. Read after the kernels ran at the sizes to report."""
    lines = []
    for name, tuner in _tuners().items():
        cache = getattr(tuner, "cache", None) or {}
        for key, cf in sorted(cache.items(), key=lambda kv: str(kv[0])):
            lines.append(f"tuned {name} [{_key_text(key)}]: {_config_text(cf)}")
        if not cache:
            lines.append(f"tuned {name}: nothing tuned in this run")
    for name, key, timings in TIMINGS:
        ranked = sorted(timings.items(), key=lambda kv: kv[1])
        lines.append(f"tuning {name} [{_key_text(key)}]: "
                     + "; ".join(f"{_config_text(cf)} {ms:.3f} ms" for cf, ms in ranked))
    return lines
