"""`semi-llie sweep`: a grid of config overrides × seeds, trained as child runs of one MLflow parent run.

    semi-llie sweep --config configs/lol_cpu.yaml --grid bank.enabled=true,false --grid optim.lr=1e-3,5e-4 \\
        --seeds 3 --out runs/sweep-bank [--set key=value ...] [--evaluate-split test]
    semi-llie sweep --spec sweep.yaml          # the same in YAML: config, grid {key: [values]}, seeds, set
    semi-llie sweep --out runs/sweep-bank      # rerun or continue: finished children are not run again

Children are the Cartesian product of the grid (keys in the order given) times the seeds, numbered from 0.
Seed s of n is `data.seed = (the config's data.seed) + s`. Child i trains into OUT/children/<i>-<cell>/ as
`semi-llie train` in a subprocess (or under `--launcher`, e.g. "accelerate launch --num_processes 4"), with
the cell's overrides, its seed, and MLflow tags that `runs compare --sweep OUT` groups by. With
`--evaluate-split`, the child's final teacher is then scored on that split of its shards (`semi-llie
evaluate` in the sweep's process, logged into the child run as eval/<split>/...): a split that nothing,
not even the choice of checkpoint, was selected on.

OUT/sweep.json holds the plan (written once; a rerun with other arguments is refused) and the parent run.
A child is finished when OUT/children/<child>/sweep_done.json exists; an unfinished child with a
checkpoint resumes from it. `--index I` runs child I alone: `slurm/sweep.sbatch` runs one per array task.
`--plan-only` writes the plan and the parent run and prints the `sbatch --array` command.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from semi_llie.engine.distributed import PREEMPTED_EXIT_CODE
from semi_llie.engine.tracking import GROUP_TAG, SEED_TAG, SWEEP_TAG
from semi_llie.errors import UserError

PLAN_FILE = "sweep.json"
DONE_FILE = "sweep_done.json"
LOCK_FILE = ".sweep.lock"  # held while a process trains the child: two array tasks never train one child
SEED_KEY = "data.seed"


@dataclass
class SweepPlan:
    """What a sweep runs; written to OUT/sweep.json once and compared with every later invocation."""

    config: str  # absolute path of the base YAML
    grid: dict[str, list[str]]  # key -> override values (YAML text), in the order given
    seeds: int
    overrides: list[str] = field(default_factory=list)  # `--set`: applied to every child
    evaluate_split: str | None = None
    launcher: str | None = None  # e.g. "accelerate launch --num_processes 4"; None: python -m semi_llie
    parent_run_id: str | None = None
    tracking_uri: str | None = None
    experiment: str | None = None

    def matches(self, other: SweepPlan) -> list[str]:
        """The fields (other than the parent run) on which two plans differ."""
        mine, theirs = asdict(self), asdict(other)
        return [key for key in mine if key not in ("parent_run_id", "tracking_uri", "experiment")
                and mine[key] != theirs[key]]  # fmt: skip


@dataclass(frozen=True)
class Child:
    index: int
    cell: tuple[tuple[str, str], ...]  # ((key, value), ...) in grid order
    seed_offset: int

    def group(self) -> str:
        """The grid cell as `key=value, key=value` (the seed left out): what seeds are averaged over."""
        return ", ".join(f"{key}={value}" for key, value in self.cell) or "(base config)"

    def folder_name(self) -> str:
        # The last part of each key and of each path value: data.shards=shards/lol10 -> shards-lol10.
        cell = "_".join(f"{key.rsplit('.', 1)[-1]}-{Path(value).name or value}" for key, value in self.cell)
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", cell).strip("-")[:80]
        return f"{self.index:03d}-{slug + '_' if slug else ''}seed{self.seed_offset}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, help="sweep folder (plan, children); reuse it to continue a sweep"
    )
    parser.add_argument("--config", type=Path, help="base training config")
    parser.add_argument("--spec", type=Path, help="YAML with config, grid {key: [values]}, seeds, set, ...")
    parser.add_argument(
        "--grid",
        action="append",
        default=[],
        metavar="KEY=V1,V2",
        help="values of one config key, comma-separated (YAML; brackets keep lists whole); repeatable",
    )
    parser.add_argument("--seeds", type=int, default=None, help="seeds per grid cell (default 1)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override for every child; repeatable"
    )
    parser.add_argument(
        "--evaluate-split", help="after training, score each child's final teacher on this split (e.g. test)"
    )
    parser.add_argument("--launcher", help='command that runs `-m semi_llie train`, e.g. "accelerate launch"')
    parser.add_argument("--index", type=int, help="run only child I (a SLURM array task)")
    parser.add_argument("--plan-only", action="store_true", help="write the plan and parent run, run nothing")


def main(args: argparse.Namespace) -> int:
    out, plan = resolve_plan(args)
    children = expand(plan)
    if args.index is not None and not 0 <= args.index < len(children):
        raise UserError(f"--index {args.index} is outside this sweep's children 0..{len(children) - 1}")
    ensure_parent_run(out, plan)
    if args.plan_only:
        print(
            f"sweep of {len(children)} children planned in {out}; on SLURM run\n"
            f"  sbatch --array=0-{len(children) - 1} slurm/sweep.sbatch {out}"
        )
        return 0
    chosen = children if args.index is None else [children[args.index]]
    failed = []
    with _preemption_deferred() as preempted:
        for child in chosen:
            code = run_child(out, plan, child, len(children))
            if code == PREEMPTED_EXIT_CODE or preempted():
                print(f"sweep {out}: preempted; rerun the sweep to continue (children resume)", flush=True)
                return PREEMPTED_EXIT_CODE
            if code:
                failed.append(child)
    finish_parent_if_done(out, plan, children)
    done = sum(1 for child in children if (child_dir(out, child) / DONE_FILE).is_file())
    print(f"sweep {out}: {done} of {len(children)} children finished; MLflow parent run {plan.parent_run_id}")
    print(f"compare them: semi-llie runs compare --sweep {out}")
    if failed:
        names = ", ".join(child_dir(out, child).name for child in failed)
        raise UserError(
            f"{len(failed)} child run(s) failed ({names}); see their train.log, then rerun the sweep"
        )
    return 0


def resolve_plan(args: argparse.Namespace) -> tuple[Path, SweepPlan]:
    """The sweep folder and its plan: from --spec / --config / --grid, or from OUT/sweep.json alone."""
    spec: dict[str, Any] = {}
    if args.spec is not None:
        try:
            spec = yaml.safe_load(args.spec.read_text()) or {}
        except (OSError, yaml.YAMLError) as err:
            raise UserError(f"cannot read the sweep spec {args.spec}: {err}") from None
        unknown = set(spec) - {"config", "grid", "seeds", "set", "out", "evaluate_split", "launcher"}
        if unknown:
            raise UserError(f"sweep spec {args.spec} has unknown keys: {', '.join(sorted(unknown))}")
    out = args.out or (Path(spec["out"]) if "out" in spec else None)
    if out is None:
        raise UserError("pass --out DIR (the sweep folder), or give `out:` in the --spec file")
    out = out.resolve()
    saved = load_plan(out)
    config = args.config or (Path(spec["config"]) if "config" in spec else None)
    if config is None:
        if saved is None:
            raise UserError(f"{out} holds no sweep yet; pass --config (or --spec) to plan one")
        return out, saved
    if not config.is_file():
        raise UserError(f"config file {config} does not exist")
    grid = {key: [_yaml_text(v) for v in values] for key, values in (spec.get("grid") or {}).items()}
    for item in args.grid:
        key, values = parse_grid_item(item)
        grid[key] = values
    plan = SweepPlan(
        config=str(config.resolve()),
        grid=grid,
        seeds=args.seeds if args.seeds is not None else int(spec.get("seeds", 1)),
        overrides=[*(spec.get("set") or []), *args.set],
        evaluate_split=args.evaluate_split or spec.get("evaluate_split"),
        launcher=args.launcher or spec.get("launcher"),
    )
    if plan.seeds < 1:
        raise UserError(f"--seeds must be at least 1, got {plan.seeds}")
    if SEED_KEY in plan.grid:
        raise UserError(f"{SEED_KEY} is set per child by --seeds; drop it from the grid")
    for child in expand(plan):  # every child's config must validate before anything runs
        child_config(plan, child)
    if saved is not None:
        differing = saved.matches(plan)
        if differing:
            raise UserError(
                f"{out} holds another sweep (it differs in {', '.join(differing)}); pass a new --out, or "
                f"only --out {out} to continue the saved one"
            )
        return out, saved
    out.mkdir(parents=True, exist_ok=True)
    save_plan(out, plan)
    return out, plan


def parse_grid_item(item: str) -> tuple[str, list[str]]:
    """`key=v1,v2` → (key, ["v1", "v2"]); commas inside [...] or {...} do not split (`a=[1, 2],[3, 4]`)."""
    key, sep, text = item.partition("=")
    if not sep or not key or not text:
        raise UserError(f"--grid {item!r} is not of the form key.sub=v1,v2")
    values, depth, current = [], 0, ""
    for char in text:
        depth += char in "[{"
        depth -= char in "]}"
        if char == "," and depth == 0:
            values.append(current.strip())
            current = ""
        else:
            current += char
    values.append(current.strip())
    if any(not value for value in values) or len(set(values)) != len(values):
        raise UserError(f"--grid {item!r} has an empty or repeated value")
    return key, values


def _yaml_text(value: Any) -> str:
    """A spec value as override text (`[1, 2]`, `true`, `0.001`)."""
    return value if isinstance(value, str) else json.dumps(value)  # JSON is YAML flow style


def expand(plan: SweepPlan) -> list[Child]:
    cells = itertools.product(*([(key, value) for value in values] for key, values in plan.grid.items()))
    combos = [(tuple(cell), seed) for cell in cells for seed in range(plan.seeds)]
    return [Child(index, cell, seed) for index, (cell, seed) in enumerate(combos)]


def child_dir(out: Path, child: Child) -> Path:
    return out / "children" / child.folder_name()


def child_overrides(plan: SweepPlan, child: Child, out: Path | None = None) -> list[str]:
    """The `key=value` overrides of one child, in the order they apply (later wins).

    With `out`, also where it trains and how its MLflow run is named, nested and tagged.
    """
    from semi_llie.config import load_config

    base_seed = load_config(plan.config, plan.overrides).data.seed
    overrides = [*plan.overrides, *(f"{key}={value}" for key, value in child.cell)]
    overrides.append(f"{SEED_KEY}={base_seed + child.seed_offset}")
    if out is not None:
        name = f"{out.name}/{child.folder_name()}"
        overrides += [
            f"train.output_dir={child_dir(out, child)}",
            f"tracking.run_name={name}",
            f"tracking.tags={json.dumps(child_tags(out, child))}",
        ]
        if plan.parent_run_id:
            overrides.append(f"tracking.parent_run_id={plan.parent_run_id}")
    return overrides


def child_tags(out: Path, child: Child) -> dict[str, str]:
    return {SWEEP_TAG: out.name, GROUP_TAG: child.group(), SEED_TAG: str(child.seed_offset)}


def child_config(plan: SweepPlan, child: Child, out: Path | None = None):
    """The validated config of one child (ConfigError names a bad grid value)."""
    from semi_llie.config import load_config

    return load_config(plan.config, child_overrides(plan, child, out))


def load_plan(out: Path) -> SweepPlan | None:
    path = out / PLAN_FILE
    if not path.is_file():
        return None
    return SweepPlan(**json.loads(path.read_text()))


def save_plan(out: Path, plan: SweepPlan) -> None:
    from semi_llie.fileio import write_text_atomic

    write_text_atomic(out / PLAN_FILE, json.dumps(asdict(plan), indent=1) + "\n")


def ensure_parent_run(out: Path, plan: SweepPlan) -> None:
    """Create the MLflow parent run once (its id goes into the plan); no-op when tracking is off."""
    if plan.parent_run_id is not None:
        return
    cfg = child_config(plan, expand(plan)[0]).tracking
    if not cfg.enabled:
        return
    import mlflow
    from semi_llie.engine.tracking import artifact_location, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.tracking_uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(cfg.experiment)
    experiment_id = (
        experiment.experiment_id
        if experiment is not None
        else client.create_experiment(cfg.experiment, artifact_location=artifact_location(uri))
    )
    run = client.create_run(
        experiment_id,
        run_name=f"sweep {out.name}",
        tags={SWEEP_TAG: out.name, "sweep.children": str(len(expand(plan))), "sweep.folder": str(out)},
    )
    client.log_text(run.info.run_id, json.dumps(asdict(plan), indent=1), PLAN_FILE)
    plan.parent_run_id, plan.tracking_uri, plan.experiment = run.info.run_id, uri, cfg.experiment
    save_plan(out, plan)


def run_child(out: Path, plan: SweepPlan, child: Child, total: int) -> int:
    """Train (or resume) one child, then evaluate it; return its exit code (0 when already finished)."""
    folder = child_dir(out, child)
    if (folder / DONE_FILE).is_file():
        print(f"[{child.index + 1}/{total}] {folder.name}: finished earlier, skipped")
        return 0
    cfg = child_config(plan, child, out)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("w") as lock:
        try:  # released when this process exits, however it exits
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[{child.index + 1}/{total}] {folder.name}: another process is running it, skipped")
            return 0
        return _train_and_evaluate(out, plan, child, cfg, total)


def _train_and_evaluate(out: Path, plan: SweepPlan, child: Child, cfg, total: int) -> int:
    from semi_llie.engine.checkpointing import latest_checkpoint
    from semi_llie.fileio import write_text_atomic

    folder = child_dir(out, child)
    if (folder / DONE_FILE).is_file():  # finished by another process while this one waited to look
        return 0
    resume = ["--resume", "latest"] if latest_checkpoint(folder) is not None else []
    print(f"[{child.index + 1}/{total}] {folder.name}: {child.group()}, seed {cfg.data.seed}"
          + (" (resuming)" if resume else ""), flush=True)  # fmt: skip
    started = time.perf_counter()
    launcher = shlex.split(plan.launcher) if plan.launcher else [sys.executable]
    train = [*launcher, "-m", "semi_llie", "train", "--config", plan.config, *resume]
    code = _run_logged([*train, *child_overrides(plan, child, out)], folder / "train.log")
    result: dict[str, Any] = {"train_seconds": round(time.perf_counter() - started, 1)}
    run_file = folder / "run.json"
    run_id = json.loads(run_file.read_text()).get("mlflow_run_id") if run_file.is_file() else None
    if code == 0 and plan.evaluate_split:
        evaluate = [
            "--checkpoint", str(folder), "--data", str(cfg.data.shards),
            "--split", plan.evaluate_split, "--out", str(folder / f"eval-{plan.evaluate_split}"),
        ]  # fmt: skip
        if run_id:
            evaluate += ["--mlflow-run-id", run_id, "--tracking-uri", plan.tracking_uri or ""]
        code = _evaluate(evaluate)
        if code == 0:
            summary = json.loads((folder / f"eval-{plan.evaluate_split}" / "summary.json").read_text())
            result[f"eval/{plan.evaluate_split}"] = summary["metrics"]
    if code:
        print(f"    failed with exit code {code}; see {folder}/*.log", flush=True)
        return code
    result.update(run_id=run_id, group=child.group(), seed=cfg.data.seed)
    write_text_atomic(folder / DONE_FILE, json.dumps(result, indent=1) + "\n")
    print(f"    done in {result['train_seconds']:.0f} s", flush=True)
    return 0


def _evaluate(argv: list[str]) -> int:
    """`semi-llie evaluate ARGV` in this process (a child's evaluation would otherwise pay a second
    interpreter start-up); its exit code, with a UserError printed as the CLI prints it."""
    from semi_llie import evaluate

    parser = argparse.ArgumentParser(prog="semi-llie evaluate")
    evaluate.add_arguments(parser)
    try:
        return int(evaluate.main(parser.parse_args(argv)) or 0)
    except UserError as err:
        print(f"semi-llie: error: {err}", file=sys.stderr)
        return err.exit_code


@contextlib.contextmanager
def _preemption_deferred():
    """Defer SIGTERM/SIGUSR1 to the end of the current child; yields "was one received?".

    SLURM signals every process of the step: the training child checkpoints on them and exits 75, and this
    process must neither die first nor start another child after a signal (its evaluation may be running).
    """
    received = []
    previous = {
        sig: signal.signal(sig, lambda signum, _frame: received.append(signum))
        for sig in (signal.SIGTERM, signal.SIGUSR1)
    }
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_logged(argv: list[str], log: Path) -> int:
    """Run a command with its output appended to `log` (and not to this terminal)."""
    with log.open("a") as stream:
        stream.write(f"$ {shlex.join(argv)}\n")
        stream.flush()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        return subprocess.run(argv, stdout=stream, stderr=subprocess.STDOUT, env=env).returncode


def finish_parent_if_done(out: Path, plan: SweepPlan, children: list[Child]) -> None:
    """End the parent run FINISHED once every child is (whichever process finishes the last one)."""
    if plan.parent_run_id is None or plan.tracking_uri is None:
        return
    if all((child_dir(out, child) / DONE_FILE).is_file() for child in children):
        import mlflow

        mlflow.MlflowClient(plan.tracking_uri).set_terminated(plan.parent_run_id, "FINISHED")
