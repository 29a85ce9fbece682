"""`semi-llie runs compare`: a table of MLflow runs (markdown + CSV) and a plot of their metric curves.

Runs come from an experiment (`--experiment`), are named (`--run-ids`), or are the children of a sweep
(`--sweep DIR` or `--parent RUN_ID`). The table shows each run's best value of every `--metric` (maximum,
or minimum for losses and what semi_llie.metrics.table marks lower-is-better), with its step, and the
parameters that differ between the runs plus a few that always matter. Runs tagged with a sweep cell
(`semi-llie sweep`) are also grouped by it: a second table gives each cell's mean ± sample std (n − 1) and
its range over the seeds, and the plot shows every seed's value around the cell's mean.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from semi_llie.errors import UserError
from semi_llie.metrics.table import lower_is_better

DEFAULT_METRICS = ("val/psnr", "val/ssim")
# Shown even when equal across runs: they say what was trained, and for how long.
KEY_PARAMS = ("model.embed_dim", "optim.lr", "train.max_steps", "data.batch_size_labeled", "bank.enabled")
RUN_ID_WIDTH = 8


@dataclass
class RunSummary:
    run_id: str
    name: str
    status: str
    params: dict[str, str]
    best: dict[str, tuple[float, int]] = field(default_factory=dict)  # metric -> (best value, its step)
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # metric -> [(step, value)]
    tags: dict[str, str] = field(default_factory=dict)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    runs = parser.add_mutually_exclusive_group(required=True)
    runs.add_argument("--experiment", help="compare the runs of this MLflow experiment")
    runs.add_argument("--run-ids", nargs="+", metavar="RUN_ID", help="compare these runs")
    runs.add_argument(
        "--sweep", type=Path, metavar="DIR", help="the children of this `semi-llie sweep` folder"
    )
    runs.add_argument("--parent", metavar="RUN_ID", help="the child runs of this MLflow parent run")
    parser.add_argument(
        "--metric",
        action="append",
        dest="metrics",
        metavar="NAME",
        help=f"metric to compare and plot, repeatable (default: {' '.join(DEFAULT_METRICS)})",
    )
    parser.add_argument("--param", action="append", default=[], help="parameter to show even if equal")
    parser.add_argument("--max-runs", type=int, default=20, help="newest runs of the experiment to compare")
    parser.add_argument("--tracking-uri", help="MLflow store (default: $MLFLOW_TRACKING_URI or sqlite)")
    parser.add_argument(
        "--out", type=Path, default=Path("runs-compare"), help="writes PREFIX.md, PREFIX.csv, PREFIX.png"
    )


def main(args: argparse.Namespace) -> int:
    from mlflow.exceptions import MlflowException

    import mlflow
    from semi_llie.engine.tracking import resolve_tracking_uri

    parent, tracking_uri = args.parent, args.tracking_uri
    if args.sweep is not None:
        parent, tracking_uri = sweep_parent(args.sweep, tracking_uri)
    store = resolve_tracking_uri(tracking_uri)
    metrics = args.metrics or list(DEFAULT_METRICS)
    client = mlflow.MlflowClient(store)
    try:
        if parent is not None:
            runs = fetch_children(client, parent, metrics)
        else:
            runs = fetch_runs(client, args.experiment, args.run_ids, args.max_runs, metrics)
    except MlflowException as err:
        raise UserError(f"cannot read runs from the MLflow store {store}: {err.message}") from err
    params = shown_params(runs, [*KEY_PARAMS, *args.param])
    header, rows = table(runs, params, metrics)
    groups = group_runs(runs)
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    markdown = to_markdown(header, rows)
    if groups:
        group_header, group_rows = group_table(groups, metrics)
        markdown = to_markdown(group_header, group_rows) + "\n" + markdown
        with out.with_name(out.name + "-groups").with_suffix(".csv").open("w", newline="") as stream:
            csv.writer(stream).writerows([group_header, *group_rows])
    out.with_suffix(".md").write_text(markdown)
    with out.with_suffix(".csv").open("w", newline="") as stream:
        csv.writer(stream).writerows([header, *rows])
    if groups:
        plot_groups(groups, metrics, out.with_suffix(".png"))
    else:
        plot_curves(runs, metrics, out.with_suffix(".png"))
    print(markdown, end="")
    print(f"wrote {out.with_suffix('.md')}, {out.with_suffix('.csv')} and {out.with_suffix('.png')}")
    return 0


def fetch_runs(
    client, experiment: str | None, run_ids: list[str] | None, max_runs: int, metrics: list[str]
) -> list[RunSummary]:
    """The runs to compare with their params, metric curves and best values, oldest first."""
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            raise UserError(
                f"no MLflow experiment named {experiment!r}; check --experiment and --tracking-uri"
            )
        runs = client.search_runs(
            [found.experiment_id], order_by=["attributes.start_time DESC"], max_results=max_runs
        )
        runs = list(reversed(runs))
        if not runs:
            raise UserError(f"experiment {experiment!r} has no runs yet; train first")
    else:
        runs = [client.get_run(run_id) for run_id in run_ids]
    return [summarise(client, run, metrics) for run in runs]


def summarise(client, run, metrics: list[str]) -> RunSummary:
    """A run's params, tags, metric curves and best values."""
    summary = RunSummary(
        run.info.run_id,
        run.info.run_name or "",
        run.info.status,
        dict(run.data.params),
        tags=dict(run.data.tags),
    )
    for metric in metrics:
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        finite = [(step, value) for step, value in history if math.isfinite(value)]
        summary.curves[metric] = history
        if finite:
            pick = min if lower_is_better(metric) else max
            step, value = pick(finite, key=lambda point: point[1])
            summary.best[metric] = (value, step)
    return summary


def group_runs(runs: list[RunSummary]) -> dict[str, list[RunSummary]]:
    """Runs tagged with a sweep cell, by cell (in first-seen order); empty when no run is tagged.

    Runs of several sweeps (e.g. `--experiment`) are grouped by sweep and cell: `<sweep> | <cell>`.
    """
    from semi_llie.engine.tracking import GROUP_TAG, SWEEP_TAG

    tagged = [run for run in runs if GROUP_TAG in run.tags]
    several = len({run.tags.get(SWEEP_TAG) for run in tagged}) > 1
    groups: dict[str, list[RunSummary]] = {}
    for run in tagged:
        name = f"{run.tags.get(SWEEP_TAG)} | {run.tags[GROUP_TAG]}" if several else run.tags[GROUP_TAG]
        groups.setdefault(name, []).append(run)
    return groups


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1; 0 for one value)."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def group_table(groups: dict[str, list[RunSummary]], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    """Per sweep cell: runs, then each metric's mean ± std and [min, max] of the runs' best values."""
    header = ["group", "runs"]
    for metric in metrics:
        header += [f"{metric} mean ± std", f"{metric} range"]
    rows = []
    for name, members in groups.items():
        row = [name, str(len(members))]
        for metric in metrics:
            values = [run.best[metric][0] for run in members if metric in run.best]
            if values:
                mean, std = mean_std(values)
                row += [f"{mean:.3f} ± {std:.3f} (n={len(values)})", f"{min(values):.3f} – {max(values):.3f}"]
            else:
                row += ["", ""]
        rows.append(row)
    return header, rows


def sweep_parent(folder: Path, tracking_uri: str | None) -> tuple[str, str | None]:
    """(parent run id, tracking URI) of a `semi-llie sweep` folder."""
    from semi_llie.sweep import load_plan

    plan = load_plan(folder.resolve())
    if plan is None:
        raise UserError(f"{folder} is not a sweep folder (no sweep.json); pass the sweep's --out")
    if plan.parent_run_id is None:
        raise UserError(f"the sweep in {folder} ran with MLflow tracking off; there are no runs to compare")
    return plan.parent_run_id, tracking_uri or plan.tracking_uri


def fetch_children(client, parent_run_id: str, metrics: list[str]) -> list[RunSummary]:
    """The child runs of an MLflow parent run, oldest first."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
        order_by=["attributes.start_time ASC"],
        max_results=10_000,
    )
    if not children:
        raise UserError(f"run {parent_run_id} has no child runs yet; run the sweep first")
    return [summarise(client, run, metrics) for run in children]


def shown_params(runs: list[RunSummary], chosen: list[str]) -> list[str]:
    """Chosen params that some run has, then every param whose value differs between the runs."""
    names = sorted({name for run in runs for name in run.params})
    differing = [name for name in names if len({run.params.get(name) for run in runs}) > 1]
    present = [name for name in dict.fromkeys(chosen) if any(name in run.params for run in runs)]
    return present + [name for name in differing if name not in present]


def table(runs: list[RunSummary], params: list[str], metrics: list[str]) -> tuple[list[str], list[list[str]]]:
    directions = {metric: "min" if lower_is_better(metric) else "max" for metric in metrics}
    header = ["run", "name", "status", *params]
    header += [f"{metric} ({directions[metric]})" for metric in metrics]
    header += [f"{metric} step" for metric in metrics]
    rows = []
    for run in runs:
        values = [_format(run.best[m][0]) if m in run.best else "" for m in metrics]
        steps = [str(run.best[m][1]) if m in run.best else "" for m in metrics]
        params_shown = [run.params.get(name, "") for name in params]
        rows.append([run.run_id[:RUN_ID_WIDTH], run.name, run.status, *params_shown, *values, *steps])
    return header, rows


def _format(value: float) -> str:
    return f"{value:.4f}"


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |\n"

    buffer = io.StringIO()
    buffer.write(line(header))
    buffer.write(line(["---"] * len(header)))
    for row in rows:
        buffer.write(line(row))
    return buffer.getvalue()


def plot_curves(runs: list[RunSummary], metrics: list[str], path: Path) -> None:
    """One panel per metric, one line per run (values over steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for run in runs:
            points = run.curves.get(metric, [])
            if points:
                steps, values = zip(*points, strict=True)
                axis.plot(steps, values, marker="o" if len(points) < 20 else None, label=_label(run))
        axis.set_title(f"{metric} ({'lower' if lower_is_better(metric) else 'higher'} is better)")
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend(fontsize="small")
        else:
            axis.text(0.5, 0.5, "no values logged", ha="center", va="center", transform=axis.transAxes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_groups(groups: dict[str, list[RunSummary]], metrics: list[str], path: Path) -> None:
    """One panel per metric: each sweep cell's mean ± std as a bar with its seeds' values as dots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    figure, axes = plt.subplots(
        1, len(metrics), figsize=(max(5.5, 1.2 * len(names) + 2) * len(metrics), 4.5), squeeze=False
    )
    for axis, metric in zip(axes[0], metrics, strict=True):
        for position, name in enumerate(names):
            values = [run.best[metric][0] for run in groups[name] if metric in run.best]
            if not values:
                continue
            mean, std = mean_std(values)
            axis.errorbar(position, mean, yerr=std, fmt="s", capsize=5, color="tab:blue")
            axis.scatter([position] * len(values), values, s=14, color="tab:orange", zorder=3)
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(names, rotation=30, ha="right", fontsize="small")
        axis.set_title(f"{metric}: mean ± std over seeds (dots: seeds)")
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _label(run: RunSummary) -> str:
    return f"{run.name} ({run.run_id[:RUN_ID_WIDTH]})" if run.name else run.run_id[:RUN_ID_WIDTH]
