"""`tierkv bench serve --plot`: TTFT by hit source (box + points) and TTFT over the run, as one PNG.

matplotlib is an optional extra (`pip install 'tierkv[bench]'`): it is imported only here, only
when a plot is asked for.
"""

from __future__ import annotations

import random

from engine.bench.serve_report import HIT_SOURCES

COLORS = {"cold": "tab:blue", "prefix hit": "tab:orange", "conversation hit": "tab:green"}


def require_matplotlib() -> None:
    """Exit with how to install matplotlib when it is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("tierkv bench serve: --plot needs matplotlib; install it with "
                         "pip install 'tierkv[bench]' (or pip install matplotlib)") from None


def write_plot(result: dict, path: str) -> None:
    """Left: TTFT per hit source; right: each request's TTFT at its send time, colored by source."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    done = [r for r in result["requests"] if r["success"]]
    sources = [s for s in HIT_SOURCES if any(r["hit_source"] == s for r in done)]
    fig, (by_source, over_time) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=(1, 1.6))
    jitter = random.Random(0)  # the same picture for the same records
    ttfts = [[1e3 * r["ttft"] for r in done if r["hit_source"] == s] for s in sources]
    if sources:
        by_source.boxplot(ttfts, showfliers=False, widths=0.5)
        by_source.set_xticks(range(1, len(sources) + 1), [f"{s}\n(n={len(t)})" for s, t in zip(sources, ttfts)])
    for i, (source, values) in enumerate(zip(sources, ttfts), start=1):
        xs = [i + jitter.uniform(-0.15, 0.15) for _ in values]
        by_source.scatter(xs, values, s=10, alpha=0.6, color=COLORS[source], zorder=3)
        over_time.scatter([r["send_time"] for r in done if r["hit_source"] == source], values, s=12, alpha=0.7,
                          color=COLORS[source], label=source)
    basis = result["summary"]["hit_basis"]
    by_source.set_title(f"TTFT by hit source ({'server cached_tokens' if basis == 'server' else 'by dataset role'})",
                        fontsize=10)
    by_source.set_ylabel("TTFT (ms)")
    over_time.set_title("TTFT over the run", fontsize=10)
    over_time.set_xlabel("send time (s from start)")
    over_time.set_ylabel("TTFT (ms)")
    if sources:
        over_time.legend(fontsize=8)
    for ax in (by_source, over_time):
        ax.grid(alpha=0.3)
    fig.suptitle(_title(result), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _title(result: dict) -> str:
    c, s = result["config"], result["summary"]
    pc = s["prefix_cache"]
    rates = []
    for label, key in (("GPU prefix cache", "gpu"), ("offload", "external")):
        if pc[key] and pc[key]["hit_rate"] is not None:
            rates.append(f"{label} hit {100 * pc[key]['hit_rate']:.0f}%")
    return (f"{c['model']}: {c['num_prompts']} requests ({c['num_conversations']} conv x {c['turns']} turns), "
            f"prefix {c['prefix_len']} + input {c['input_len']} / output {c['output_len']}, "
            f"rate {c['request_rate']}/s" + (f"; {', '.join(rates)}" if rates else ""))
