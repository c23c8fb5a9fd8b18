"""Human-readable tables (and, in later stages, plots) of labelless results.

matplotlib is imported only inside the plotting functions, so the rest of labelless
never pays for it.
"""

from __future__ import annotations

from typing import Any, Sequence

__all__ = ["format_table", "layers_table", "inspect_table", "human_bytes"]


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def format_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain-text table; numbers right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(row[i]) for row in rows) if rows else False for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _is_number(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def layers_table(layers: Sequence[Any]) -> str:
    rows = [(l.index, l.name, l.type, "x".join(map(str, l.weight_shape)), l.n_params) for l in layers]
    return format_table(rows, ["index", "name", "type", "shape", "params"])


def inspect_table(report: dict[str, Any]) -> str:
    rows = [
        (r["index"], r["name"], r["type"], r["n_params"], r["weights_clusters"], r["bias_clusters"], r["bytes"])
        for r in report["layers"]
    ]
    rows.append(("", "other tensors", "", "", None, None, report["other_bytes"]))
    rows.append(("", "header", "", "", None, None, report["header_bytes"]))
    table = format_table(rows, ["index", "name", "type", "params", "k weights", "k bias", "bytes"])
    total, fp32 = report["total_bytes"], report["fp32_bytes"]
    summary = (
        f"total {total} bytes ({human_bytes(total)}) vs fp32 safetensors {fp32} bytes "
        f"({human_bytes(fp32)}): {100 * report['size_reduction']:.2f}% smaller, "
        f"{fp32 / total:.1f}x"
    )
    if report["packed_total_bytes"] != total:
        summary += f"; with plain bit-packed indices about {report['packed_total_bytes']} bytes"
    return f"{table}\n{summary}"


# -- sweep plots ---------------------------------------------------------------------------


def _budget(search: dict) -> str:
    parts = [f"{search['max_drop']} points of {search['metric']}" if search.get("max_drop") is not None else "",
             f"{search['max_bytes']:,} bytes" if search.get("max_bytes") is not None else "",
             f"{100 * search['smaller_by']:g}% smaller than fp32" if search.get("smaller_by") is not None else ""]
    return ", ".join(p for p in parts if p)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_sweep(result: Any, folder: Any) -> None:
    """``heatmap.png`` (layers x k, drop in agreement) and ``pareto.png`` (size vs drop)."""
    plt = _pyplot()
    for name, draw in (("heatmap.png", _heatmap), ("pareto.png", _pareto)):
        _save(plt, draw(plt, result), folder / name)


def plot_search(found: Any, fp32_bytes: int, path: Any) -> None:
    """Every plan the search measured, file size against measured drop, the chosen one marked."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4.2))
    plans, best = found.alternatives, found.best
    ax.plot([c.bytes / fp32_bytes for c in plans], [c.measured_drop for c in plans], "o-", ms=4, label="measured plans")
    rescored = [c for c in plans if c.retrained_drop is not None]
    if rescored:
        ax.scatter([c.bytes / fp32_bytes for c in rescored], [c.retrained_drop for c in rescored], marker="^",
                   color="seagreen", zorder=3, label="after a short label-free retraining")
    shown = best.measured_drop if best.retrained_drop is None else best.retrained_drop
    ax.scatter([best.bytes / fp32_bytes], [shown], s=140, facecolors="none", edgecolors="crimson",
               linewidths=2, zorder=3, label=f"chosen: {100 * (1 - best.bytes / fp32_bytes):.1f}% smaller")
    if found.max_drop is not None:
        ax.axhline(found.max_drop, ls="--", color="gray", label=f"budget {found.max_drop} points")
    ax.set_xlabel("file size / fp32 size")
    ax.set_ylabel(f"measured drop in {found.metric} (points)")
    ax.set_yscale("symlog", linthresh=0.1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(plt, figure, path)


def _save(plt, figure, path: Any) -> None:
    from .io import atomic_path

    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)


def _heatmap(plt, result):
    rows = [r for r in result.rows if r.granularity == "per_tensor"]  # one cell per (layer, k)
    tensors = [t for t in ("weight", "bias") if any(r.tensor == t for r in rows)]
    ks = sorted({r.k for r in rows})
    layers = sorted({(r.index, r.layer) for r in rows})
    figure, axes = plt.subplots(1, len(tensors), figsize=(4 + 2.2 * len(ks) * len(tensors) / 3, 1.5 + 0.22 * len(layers)),
                                squeeze=False)
    for ax, tensor in zip(axes[0], tensors):
        grid = [[float("nan")] * len(ks) for _ in layers]
        for r in rows:
            if r.tensor == tensor:
                grid[layers.index((r.index, r.layer))][ks.index(r.k)] = 100.0 - r.agreement
        image = ax.imshow(grid, aspect="auto", cmap="magma_r", vmin=0)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(layers)), [f"{i} {n}" for i, n in layers], fontsize=7)
        ax.set_xlabel("centroids k")
        ax.set_title(f"{'biases' if tensor == 'bias' else 'weights'}: drop in top-1 agreement (points)", fontsize=9)
        figure.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    return figure


def _pareto(plt, result):
    metrics = [("agreement", 100.0)]
    if result.reference.get("accuracy") is not None:
        metrics.append(("accuracy", result.reference["accuracy"]))
    figure, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    base = result.reference["fp32_bytes"]
    for ax, (metric, reference) in zip(axes[0], metrics):
        points = sorted((r.bytes / base, reference - getattr(r, metric)) for r in result.rows)
        front, best = [], float("inf")
        for size, drop in points:
            if drop < best:
                front.append((size, drop))
                best = drop
        ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, alpha=0.5, label="one tensor quantized")
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="crimson", label="Pareto front")
        ax.set_xlabel("file size / fp32 size")
        ax.set_ylabel(f"drop in {metric} (points)")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return figure


# -- the run report ------------------------------------------------------------------------


_RUN_ROWS = (("original", "original (fp32)"), ("quantized", "quantized, before retraining"),
             ("retrained_labelfree", "retrained label-free on {unlabeled}"),
             ("retrained_labeled", "retrained with labels (baseline)"))


def _run_rows(report: dict[str, Any], label: bool) -> list[tuple]:
    """One row per model of the run: name, bytes, share saved, accuracy (None without labels),
    agreement and KL with the original, retraining seconds."""
    original, rows = report["original"], []
    for key, name in _RUN_ROWS:
        if key in report:
            r = report[key]
            accuracy = None if r.get("accuracy") is None else f"{r['accuracy']:.2f}"
            kl = r.get("kl")
            rows.append((name.format(unlabeled=report["unlabeled_data"]) if label else key, r["bytes"],
                         f"{100 * (1 - r['bytes'] / original['bytes']):.2f}%", accuracy,
                         f"{r.get('agreement', 100.0):.2f}", None if kl is None else f"{kl:.4f}", r.get("seconds")))
    return rows


_RUN_HEADERS = ["model", "bytes", "smaller by", "accuracy %", "agreement %", "KL", "retrain s"]


def labeled_run(report: dict[str, Any]) -> bool:
    """Whether the run measured accuracy (it had a labelled test set)."""
    return report["original"].get("accuracy") is not None


def _evaluated_on(report: dict[str, Any]) -> str:
    where = report.get("evaluation", {})
    if labeled_run(report):
        return f"evaluated on `{report['labeled_data']}` (test split, {where.get('images', '?')} images)"
    return f"evaluated label-free ({no_accuracy_line(report)})"


def no_accuracy_line(report: dict[str, Any]) -> str:
    """What a run without a labelled test set scored its models on, and that no accuracy was measured."""
    return (f"no accuracy was measured (data.test is null): agreement and KL are with the original model on "
            f"{report.get('evaluation', {}).get('images', '?')} images of `{report['unlabeled_data']}` held apart "
            f"from every other stage")


def run_markdown(report: dict[str, Any]) -> str:
    """``report.md``: what ``labelless run`` did, as a human summary."""
    table = _markdown_table(_run_rows(report, label=True), _RUN_HEADERS)
    lines = [
        "# labelless run",
        "",
        f"Model `{report['model']['name']}` ({report['model']['num_classes']} classes), {_evaluated_on(report)}; "
        f"label-free retraining on `{report['unlabeled_data']}`; device `{report['device']}`.",
        "",
        table,
        "",
        f"Size reduction from the real file: **{100 * report['size_reduction']:.2f}%**.",
    ]
    recovery = recovery_line(report)
    if recovery:
        lines += ["", recovery]
    if "search" in report:
        s = report["search"]
        after = (f", {s['retrained_drop']:.2f} after a short label-free retraining (the best of the "
                 f"{s['after_retraining']} plans judged so)" if s.get("retrained_drop") is not None else "")
        lines += ["", f"Plan search: budget {_budget(s)}, measured drop "
                  f"{s['measured_drop']:.2f} (predicted {s['predicted_drop']:.2f}){after}; see `plan.yaml`, `search.json`, "
                  "`search.png`, `sweep/heatmap.png`, `sweep/pareto.png`.", "",
                  "![the plans the search measured](search.png)", "", "![sensitivity](sweep/heatmap.png)",
                  "", "![size against fidelity, one tensor at a time](sweep/pareto.png)"]
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in report.get("timings", {}).items())]
    return "\n".join(lines) + "\n"


def _markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def recovery(report: dict[str, Any]) -> dict[str, Any] | None:
    """In points of accuracy (of agreement with the original when no label was read): what
    quantization cost, what label-free retraining won back, where it lands from the original and
    from labelled retraining (None without it); None when there was no label-free retraining or it
    was skipped (the model shipped is then the quantized one, and the line says why)."""
    quantized, free, labeled = (report.get(k) for k in ("quantized", "retrained_labelfree", "retrained_labeled"))
    if not quantized or not free or free.get("skipped"):
        return None
    metric = "accuracy" if labeled_run(report) else "agreement"
    original = report["original"].get(metric, 100.0)
    from_labeled = None if not labeled or labeled.get("skipped") else round(free[metric] - labeled[metric], 4)
    return {"metric": metric, "lost": round(original - quantized[metric], 4),
            "won_back": round(free[metric] - quantized[metric], 4), "from_original": round(free[metric] - original, 4),
            "from_labeled": from_labeled}


def recovery_line(report: dict[str, Any]) -> str | None:
    """:func:`recovery` in a sentence."""
    free = report.get("retrained_labelfree")
    if free and free.get("skipped") and report.get("quantized"):
        return f"Label-free retraining was skipped: {free['skipped']}."
    points = recovery(report)
    if points is None:
        return None
    what = "accuracy" if points["metric"] == "accuracy" else "agreement with the original (no accuracy was measured)"
    text = (f"Quantization cost {points['lost']:.2f} points of {what}; label-free retraining won back "
            f"{points['won_back']:+.2f}")
    if free.get("best_epoch") == 0:
        text += " (no epoch beat the start on the held-out images, so the quantized model was kept)"
    if points["from_labeled"] is not None:
        text += f", and lands {points['from_labeled']:+.2f} points from labelled retraining"
    return text + "."


def summary_table(report: dict[str, Any]) -> str:
    """The printed summary at the end of ``labelless run``."""
    return format_table(_run_rows(report, label=False), _RUN_HEADERS)
