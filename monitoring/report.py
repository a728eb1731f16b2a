"""Draw the Grafana dashboard's main series from a running Prometheus into one PNG (`make monitor-report`).

Usage: python -m monitoring.report [--minutes 30] [--url http://127.0.0.1:9090] [--model REGEX] [--out PNG]

The PromQL is the dashboard's own (monitoring/grafana-dashboard.json, found by panel title), with
Grafana's `$model` and `$__rate_interval` filled in, so the picture and the dashboard cannot drift
apart. Prometheus answers `/api/v1/query_range` over the last N minutes; nothing is made up: with no
ensemble series in that window the script says why and writes no picture (exit status 1).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import requests

from monitoring.prometheus_ctl import LISTEN, ROOT, PrometheusError, query_range

DASHBOARD = ROOT / "monitoring" / "grafana-dashboard.json"
REPORT_PANELS = (
    "Member cost per image (ms)",
    "Disagreement rate",
    "Policy mix (requests/s by policy)",
    "Refused requests/s by error type",
    "Batch fill (images per TorchServe batch)",
    "Images/s",
    "Members missing from answers",
)
SCRAPE_INTERVAL_S = 5  # monitoring/prometheus.yml
MAX_POINTS = 240


@dataclass(frozen=True)
class Panel:
    """One plot: its title, PromQL (Grafana variables allowed), Grafana unit and legend format."""

    title: str
    expr: str
    unit: str
    legend: str


@dataclass(frozen=True)
class Series:
    name: str
    times: list[datetime]
    values: list[float]


def dashboard_panels(titles: Sequence[str] = REPORT_PANELS, dashboard: Path = DASHBOARD) -> list[Panel]:
    """The dashboard's panels with these titles, in this order."""
    found = {
        panel["title"]: Panel(
            panel["title"],
            panel["targets"][0]["expr"],
            panel["fieldConfig"]["defaults"]["unit"],
            panel["targets"][0]["legendFormat"],
        )
        for panel in json.loads(dashboard.read_text())["panels"]
    }
    return [found[title] for title in titles]


def promql(panel: Panel, *, model: str, rate_window_s: int) -> str:
    """The panel's query as Grafana would send it for these variables."""
    return panel.expr.replace("$__rate_interval", f"{rate_window_s}s").replace("$model", model)


def legend(template: str, labels: dict[str, str]) -> str:
    """Grafana's `{{label}}` legend format, filled from a series' labels."""
    for key, value in labels.items():
        template = template.replace(f"{{{{{key}}}}}", value)
    return template or json.dumps(labels)


def steps(minutes: float) -> tuple[int, int]:
    """Step and rate window in seconds: at most MAX_POINTS points; a window of four steps (at least 1 minute)."""
    step = max(SCRAPE_INTERVAL_S, math.ceil(minutes * 60 / MAX_POINTS))
    return step, max(60, 4 * step)


def fetch(
    base_url: str, panels: Sequence[Panel], *, minutes: float, model: str = ".+", end: float | None = None
) -> dict[str, list[Series]]:
    """Each panel's series over the last `minutes` (empty list: no data)."""
    end = time.time() if end is None else end
    step, window = steps(minutes)
    results: dict[str, list[Series]] = {}
    for panel in panels:
        series = []
        for result in query_range(
            base_url, promql(panel, model=model, rate_window_s=window), start=end - minutes * 60, end=end, step_s=step
        ):
            times = [datetime.fromtimestamp(float(t), tz=UTC) for t, _ in result["values"]]
            values = [float(v) for _, v in result["values"]]  # "NaN" (0/0 without traffic) parses to nan: a gap.
            series.append(Series(legend(panel.legend, result["metric"]), times, values))
        results[panel.title] = sorted(series, key=lambda s: s.name)
    return results


def draw(panels: Sequence[Panel], results: dict[str, list[Series]], out: Path, *, heading: str) -> None:
    """One subplot per panel, two columns; "no data" where a panel has no series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.ticker import PercentFormatter

    rows = math.ceil(len(panels) / 2)
    figure, axes = plt.subplots(rows, 2, figsize=(13, 3.6 * rows), squeeze=False, sharex=True)
    for axis, panel in zip(axes.flat, panels, strict=False):
        axis.set_title(panel.title, fontsize=10)
        series = results.get(panel.title, [])
        if not series:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
        for line in series:
            axis.plot(line.times, line.values, label=line.name, linewidth=1.2)
        if panel.unit == "percentunit":
            axis.yaxis.set_major_formatter(PercentFormatter(1.0))
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
        locator = mdates.AutoDateLocator(tz=UTC)
        axis.xaxis.set_major_locator(locator)
        axis.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, tz=UTC))
        if series:
            axis.legend(fontsize=7, loc="upper left", ncol=2 if len(series) > 4 else 1)
    for axis in list(axes.flat)[len(panels) :]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("time (UTC)")
    figure.suptitle(heading, fontsize=11)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=110)
    plt.close(figure)


def summary(results: dict[str, list[Series]]) -> list[str]:
    """Each series' mean over the window, for the terminal."""
    lines = []
    for title, series in results.items():
        for line in series:
            finite = [v for v in line.values if math.isfinite(v)]
            mean = f"{sum(finite) / len(finite):.4g}" if finite else "no finite value"
            lines.append(f"  {title}: {line.name}: mean {mean}")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=f"http://{LISTEN}", help="Prometheus (default: the one of `make monitor`)")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--model", default=".+", help="regex of ensemble names (ModelName)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "monitor_report.png")
    args = parser.parse_args(argv)
    panels = dashboard_panels()
    try:
        results = fetch(args.url, panels, minutes=args.minutes, model=args.model)
    except requests.ConnectionError:
        print(
            f"no Prometheus answers at {args.url}: start it with `make monitor` (and TorchServe with `make serve`)",
            file=sys.stderr,
        )
        return 2
    except PrometheusError as error:
        print(f"Prometheus refused a query: {error}", file=sys.stderr)
        return 2
    if not any(results.values()):
        print(
            f"no ensemble series in Prometheus at {args.url} over the last {args.minutes:g} minutes "
            f"(ModelName=~{args.model!r}), "
            "so no picture was drawn. Is TorchServe running with the shipped config (`make serve`), has "
            "Prometheus scraped it (`make monitor`), and did the ensembles answer requests in that window?",
            file=sys.stderr,
        )
        return 1
    now = datetime.now(tz=UTC).strftime("%Y-%m-%d %H:%M UTC")
    draw(
        panels,
        results,
        args.out,
        heading=f"Ensembles {args.model!r}, last {args.minutes:g} minutes to {now} (Prometheus {args.url})",
    )
    print(f"wrote {args.out}")
    print("\n".join(summary(results)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
