"""The run's pictures: curves.png (every metric family per epoch that changes, train and validation
together, the learning rate, images/s and epoch time) and confusion.png (the validation confusion
matrix), each written atomically. matplotlib is imported only when a plot is drawn.
"""
from lib.io import atomic_file


SPEED_PANELS = [("images/s", ["images_per_s"]), ("epoch time (s)", ["epoch_time_s"])]


def curve_groups(rows):
    """The panels of curves.png: one per metric family (loss, acc, ...) with train and val together,
    then the learning rate, images/s and epoch time. Counts (val/samples, skipped steps) and, from
    two epochs on, families that never change (top-5 at 1.0) are left out: a panel shows a change."""
    families = {}
    for r in rows:
        for k in r:
            if "/" in k:
                families.setdefault(k.split("/", 1)[1], set()).add(k)
    groups = [(name, sorted(keys, key=lambda k: (not k.startswith("train"), k)))
              for name, keys in families.items() if name not in ("skipped_steps", "samples")]
    groups += [("lr", ["lr"])] + [g for g in SPEED_PANELS if any(g[1][0] in r for r in rows)]
    if len(rows) < 2:
        return groups
    return [(title, keys) for title, keys in groups if any(len(_values(rows, k)) > 1 for k in keys)]


def _values(rows, key):
    return {r[key] for r in rows if r.get(key) not in (None, "")}


def plot_curves(rows, path, groups=None):
    """One panel per group of curve_groups(rows) (or the `groups` given: [(title, [keys])])."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    epochs = [float(r["epoch"]) for r in rows]
    groups = groups or curve_groups(rows)
    fig = Figure(figsize=(4.2 * len(groups), 3.4), dpi=100)
    FigureCanvasAgg(fig)
    for i, (title, keys) in enumerate(groups):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for k in keys:
            pts = [(e, float(r[k])) for e, r in zip(epochs, rows) if r.get(k) not in (None, "")]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=k)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if title == "lr" and all(float(r["lr"]) > 0 for r in rows if r.get("lr") not in (None, "")):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_fig(fig, path)


def plot_confusion(matrix, classes, path):
    """Rows: true class, columns: predicted; colour by row-normalised rate, numbers are counts."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    m = matrix.double()
    k = m.shape[0]
    rates = m / m.sum(1, keepdim=True).clamp_min(1)
    size = min(12, 2 + 0.45 * k)
    fig = Figure(figsize=(size, size), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    labels = classes if classes and len(classes) == k else [str(i) for i in range(k)]
    if k <= 30:
        ax.set_xticks(range(k), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(k), labels, fontsize=7)
        for i in range(k):
            for j in range(k):
                if m[i, j]:
                    ax.text(j, i, int(m[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    acc = m.diagonal().sum() / m.sum().clamp_min(1)
    ax.set_title(f"validation confusion matrix (accuracy {acc:.4f})")
    fig.tight_layout()
    _save_fig(fig, path)


def _save_fig(fig, path):
    with atomic_file(path) as f:
        fig.savefig(f, format="png")
