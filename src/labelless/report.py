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
