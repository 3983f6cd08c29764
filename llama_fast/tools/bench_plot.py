"""The chart of a generate benchmark report: median prefill and decode tokens/s per configuration
(dtype, batch), one bar per engine, error bars spanning the best run."""
from __future__ import annotations


def plot_generate(report: dict, path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["results"] if r["status"] == "ok"]
    groups = sorted({(r["dtype"], r["batch"]) for r in ok}, key=lambda g: (g[0], g[1]))
    engines = sorted({f"{r['engine']}:{r['backend']}" for r in ok})
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(groups) * 2), 4.5))
    width = 0.8 / max(len(engines), 1)
    for ax, key, title in ((axes[0], "prefill_tokens_per_s", "prefill"), (axes[1], "decode_tokens_per_s", "decode")):
        for i, engine in enumerate(engines):
            xs, medians, best = [], [], []
            for g, (dtype, batch) in enumerate(groups):
                r = next((r for r in ok if f"{r['engine']}:{r['backend']}" == engine
                          and (r["dtype"], r["batch"]) == (dtype, batch)), None)
                if r is not None:
                    xs.append(g + (i - (len(engines) - 1) / 2) * width)
                    medians.append(r[key]["median"])
                    best.append(r[key]["max"] - r[key]["median"])
            ax.bar(xs, medians, width, yerr=[[0] * len(best), best], label=engine, capsize=2)
        ax.set_xticks(range(len(groups)), [f"{d}\nbatch {b}" for d, b in groups])
        ax.set_ylabel("tokens/s (median; bar to best)")
        ax.set_title(f"{title} ({report['settings']['prompt_len']}-token prompt, "
                     f"{report['settings']['new_tokens']} new)" if title == "prefill" else
                     f"{title} ({report['settings']['new_tokens']} new tokens)")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    machine = report["machine"]
    fig.suptitle(f"llama_fast generate benchmark: {machine['threads']} threads, torch {machine['torch']}, "
                 f"{report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
