"""From raw timings to the printed table, the targets, the JSON file and the chart."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .systems import SYSTEMS
from .workloads import DIRECTION, PATH_LABELS, PATHS

LABELS = {s.key: s.label for s in SYSTEMS}
PLAIN = "plaintext"


def algorithm_of(system: str) -> str:
    """The raw cipher a system is compared with: its own for deterministic columns
    (AES-SIV), AES-256-GCM for every other system."""
    return "siv" if system == "deterministic" else "gcm"


def summarize(
    times: dict[str, dict[str, list[float]]],
    floors: dict[str, dict[str, list[float]]],
    *,
    rows: int,
    lookups: int,
) -> dict[str, dict[str, dict[str, float | None]]]:
    """Per path and system: median time, per value, overhead per value, ÷ cipher, x plaintext.

    Each repetition is paired with the plaintext run and the raw-cipher run of
    the same round (they are interleaved); the median of the paired figures is
    reported.
    """
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for path, per_system in times.items():
        values = lookups if path == "lookup" else 2 * rows
        plain = per_system[PLAIN]
        out[path] = {}
        for system, samples in per_system.items():
            entry: dict[str, float | None] = {
                "median_s": statistics.median(samples),
                "per_value_us": statistics.median(samples) / values * 1e6,
                "values": values,
                "overhead_us": None,
                "over_cipher": None,
                "vs_plain": 1.0 if system == PLAIN else None,
            }
            if system != PLAIN:
                cipher = floors[path][algorithm_of(system)]
                overheads = [(t - p) / values for t, p in zip(samples, plain, strict=True)]
                entry["overhead_us"] = statistics.median(overheads) * 1e6
                entry["over_cipher"] = statistics.median(
                    o / c for o, c in zip(overheads, cipher, strict=True)
                )
                entry["vs_plain"] = statistics.median(
                    t / p for t, p in zip(samples, plain, strict=True)
                )
            out[path][system] = entry
    return out


def floor_medians(floors: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Median seconds per value of each raw-cipher operation, over every round."""
    pooled: dict[str, list[float]] = {}
    for path, per_algorithm in floors.items():
        for algorithm, samples in per_algorithm.items():
            pooled.setdefault(f"{algorithm}_{DIRECTION[path]}", []).extend(samples)
    return {name: statistics.median(samples) for name, samples in sorted(pooled.items())}


def targets(
    summary: dict[str, dict[str, dict[str, float | None]]],
) -> list[tuple[str, float, str, bool]]:
    """The issue's targets, each as ``(what, measured, bound, met)``."""
    found: list[tuple[str, float, str, bool]] = []
    for path in ("core_insert", "core_select"):
        ours = summary[path]["encrypted"]
        found.append(
            (
                f"{path}: Encrypted overhead ÷ raw cipher",
                _f(ours["over_cipher"]),
                "<= 2",
                _f(ours["over_cipher"]) <= 2,
            )
        )
        for rival in ("utils_aesgcm", "utils_fernet"):
            theirs = summary[path].get(rival)
            if theirs is None:
                continue
            mine = _f(ours["overhead_us"])
            ratio = _f(theirs["overhead_us"]) / mine if mine > 0 else float("inf")
            found.append(
                (f"{path}: {rival} overhead ÷ Encrypted overhead", ratio, ">= 4", ratio >= 4)
            )
    for path in ("orm_insert", "orm_select"):
        for system in ("encrypted", "deterministic"):
            vs = _f(summary[path][system]["vs_plain"])
            found.append((f"{path}: {system} x plaintext ORM time", vs, "<= 1.2", vs <= 1.2))
    return found


def _f(value: float | None) -> float:
    return float("nan") if value is None else float(value)


# -- text ------------------------------------------------------------------------------
def _cell(value: float | None, fmt: str, width: int, unit: str = "") -> str:
    text = "-" if value is None else format(value, fmt) + unit
    return text.rjust(width)


def table(
    label: str, summary: dict[str, Any], floor: dict[str, float], *, rows: int, repeat: int
) -> str:
    """The main table of one database: times, overhead per value, ratios."""
    us = {k: v * 1e6 for k, v in floor.items()}
    lines = [
        f"{label}: {rows:,} rows x 2 string columns, median of {repeat}",
        f"raw cipher (the floor), per value: AES-256-GCM encrypt {us['gcm_encrypt']:.2f} µs, "
        f"decrypt {us['gcm_decrypt']:.2f} µs; AES-SIV encrypt {us['siv_encrypt']:.2f} µs, "
        f"decrypt {us['siv_decrypt']:.2f} µs",
        "(lookup: per value = per lookup)",
        "",
        f"{'path':<25}{'system':<30}{'median':>10}{'per value':>11}{'overhead':>10}"
        f"{'÷ cipher':>10}{'x plain':>9}",
    ]
    lines.append("-" * len(lines[-1]))
    for path in PATHS:
        for i, (system, e) in enumerate(summary.get(path, {}).items()):
            lines.append(
                f"{PATH_LABELS[path] if i == 0 else '':<25}{LABELS[system]:<30}"
                + _cell(e["median_s"] * 1e3, ".1f", 10, " ms")
                + _cell(e["per_value_us"], ".2f", 11, " µs")
                + _cell(e["overhead_us"], ".2f", 10, " µs")
                + _cell(e["over_cipher"], ".2f", 10)
                + _cell(e["vs_plain"], ".2f", 9)
            )
    lines.append("")
    lines.append("targets (informative; never asserted):")
    for what, measured, bound, met in targets(summary):
        lines.append(f"  [{'met' if met else 'MISSED'}] {what}: {measured:.2f} (target {bound})")
    return "\n".join(lines)


def economy_text(results: dict[str, dict[str, Any]]) -> str:
    lines = ["KMS economy (LocalKms; kms_calls counted by envelope.stats):"]
    for db, r in results.items():
        cold, burst = r["cold_process"], r["cold_threads"]
        lines.append(
            f"  {db}: cold process, {cold['tables']} tables, {cold['rows_read']:,} rows read "
            f"+ {cold['rows_written']:,} written: kms_calls = {cold['kms_calls']} (expected 3), "
            f"cache hits {cold['cache_hits']:,}, misses {cold['cache_misses']}"
        )
        lines.append(
            f"  {db}: {burst['threads']} threads starting cold on one scope: "
            f"kms_calls = {burst['kms_calls']} (expected 1), cache misses {burst['cache_misses']}"
        )
    return "\n".join(lines)


# -- files -----------------------------------------------------------------------------
def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def chart(path: Path, databases: dict[str, dict[str, Any]], *, rows: int, repeat: int) -> bool:
    """A PNG of the main table; False (and no file) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False

    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    systems = [s.key for s in SYSTEMS if s.key != PLAIN]
    colors = {
        "encrypted": "#1f77b4",
        "deterministic": "#2ca02c",
        "utils_aesgcm": "#d62728",
        "utils_fernet": "#ff7f0e",
    }
    panels = (
        ("vs_plain", "time x plaintext (1 = free)", 1.2, PATHS),
        # Lookups pay a whole query per value: their ratio to one cipher call says little.
        (
            "over_cipher",
            "overhead per value ÷ raw cipher",
            2.0,
            tuple(p for p in PATHS if p != "lookup"),
        ),
    )
    fig, axes = plt.subplots(len(databases), 2, figsize=(13, 4.4 * len(databases)), squeeze=False)
    for row, info in enumerate(databases.values()):
        summary = info["summary"]
        for col, (metric, title, target, wanted) in enumerate(panels):
            ax = axes[row][col]
            paths = [p for p in wanted if p in summary]
            width = 0.8 / len(systems)
            for i, system in enumerate(systems):
                xs, ys = [], []
                for j, p in enumerate(paths):
                    entry = summary[p].get(system)
                    if entry is not None and entry[metric] is not None:
                        xs.append(j + (i - (len(systems) - 1) / 2) * width)
                        ys.append(max(entry[metric], 0.3))
                bars = ax.bar(xs, ys, width, label=LABELS[system], color=colors[system], bottom=0)
                if system in ("encrypted", "deterministic"):
                    ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
            ax.set_xticks(range(len(paths)))
            ax.set_xticklabels([PATH_LABELS[p].replace(" ", "\n", 1) for p in paths], fontsize=8)
            ax.set_yscale("log")
            ax.set_ylim(0.3 if metric == "over_cipher" else 0.8, None)
            ax.yaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100]))
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
            if metric == "vs_plain":
                ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_title(f"{info['label']}: {title}", fontsize=10)
            ax.grid(axis="y", which="major", alpha=0.3)
    fig.suptitle(
        f"sqlalchemy-envelope vs plaintext and sqlalchemy-utils: {rows:,} rows x 2 columns, "
        f"median of {repeat} (dashed: targets)",
        fontsize=11,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(systems), fontsize=9)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
