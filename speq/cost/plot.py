"""The Amortization Roofline of a policy, as a plot.

x: amortization intensity I(k) = tokens committed per cycle / bytes copied per cycle (tokens per
GB); y: throughput Theta(k) (tokens/s). The I/O roof is Theta = B_link * I; each k has a compute
roof tokens(k) / (T_draft(k) + T_verify(k+1)); the operating point of k is where the cost model
puts Theta(k); the governor's k* is marked.
"""

from __future__ import annotations

from pathlib import Path

from speq.cost.roofline import Policy
from speq.models.config import MoEConfig
from speq.sim.presets import expert_bytes
from speq.sim.profiles import HardwareProfile


def plot(
    policy: Policy, cfg: MoEConfig, profile: HardwareProfile, title: str, path: str | Path
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nbytes = expert_bytes(cfg)
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    xs, ys = [], []
    for e in policy.estimates:
        copied = policy.cache.new_experts(cfg, e.k) * nbytes
        xs.append(e.tokens_per_cycle / max(copied, 1.0) * 1e9)
        ys.append(e.tokens_per_cycle / e.cycle_s)
        roof = e.tokens_per_cycle / (e.draft_s + e.verify_s)
        ax.hlines(roof, 0, 1, transform=ax.get_yaxis_transform(), colors="0.8", lw=0.8)
        first, last = e.k == policy.estimates[0].k, e.k == policy.estimates[-1].k
        if first or last:  # the roofs of the other k lie between these two
            ax.annotate(
                f"compute roof, k={e.k}",
                (0.01 if first else 0.99, roof),
                xycoords=("axes fraction", "data"),
                ha="left" if first else "right",
                va="bottom" if last else "top",
                fontsize=7,
                color="0.4",
            )
    lo, hi = min(xs) / 3, max(xs) * 3
    io = [lo, hi]
    ax.plot(
        io,
        [profile.link_gbps * x for x in io],
        "k-",
        lw=1.5,
        label=f"I/O roof ({profile.link_gbps:g} GB/s)",
    )
    ax.plot(
        xs,
        ys,
        "o-",
        color="tab:blue",
        label=f"operating points, k = {policy.estimates[0].k}..{policy.estimates[-1].k}",
    )
    for x, y, e in zip(xs, ys, policy.estimates):
        if e.k in (policy.estimates[0].k, policy.estimates[-1].k):
            ax.annotate(f"k={e.k}", (x, y), textcoords="offset points", xytext=(6, -12), fontsize=8)
    c = policy.chosen
    i = [e.k for e in policy.estimates].index(c.k)
    ax.plot([xs[i]], [ys[i]], "*", color="tab:red", ms=16, label=f"governor's k* = {c.k}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("amortization intensity (tokens per GB copied)")
    ax.set_ylabel("throughput (tokens/s)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path
