"""The ``medseg`` command line: thin typer commands over the library functions.

User errors (bad paths, configs, images, datasets) print one line and exit with code 2;
``--verbose`` shows the traceback. Heavy imports happen inside commands so ``--help`` is fast.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="medseg: train, predict and evaluate medical image segmentation models (MONAI).",
    pretty_exceptions_enable=False,
)

USER_ERROR = 2
_state = {"verbose": False}


@app.callback()
def main(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show tracebacks and debug logs.")
    ] = False,
) -> None:
    """medseg command-line interface."""
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
    )
    for noisy in ("monai", "matplotlib", "PIL", "onnxscript", "onnx_ir", "torch.onnx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _user_errors() -> tuple[type[BaseException], ...]:
    from medseg.config import ConfigError
    from medseg.datasets import DatasetError
    from medseg.evaluation import EvaluationError
    from medseg.io import ImageError
    from medseg.runs import RunError
    from medseg.training import TrainingError

    return (
        ConfigError,
        DatasetError,
        EvaluationError,
        ImageError,
        RunError,
        TrainingError,
        FileNotFoundError,
        PermissionError,
    )


@contextmanager
def _handle_errors() -> Iterator[None]:
    """User errors: one line and exit code 2 (with --verbose the traceback first, same code);
    anything else is a bug in medseg and propagates (exit code 1)."""
    try:
        yield
    except typer.Exit:
        raise
    except Exception as err:
        if not isinstance(err, _user_errors()):
            raise
        if _state["verbose"]:
            traceback.print_exc()
        typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
        raise typer.Exit(USER_ERROR) from None


def _run(fn: Callable[[], Any]) -> Any:
    with _handle_errors():
        return fn()


@app.command(context_settings={"allow_extra_args": False})
def train(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="YAML config file (see configs/), or a dataset folder: planned first, as "
            "'medseg plan' would. Not needed with --resume (the run's stored config is used).",
            show_default=False,
        ),
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides, e.g. train.epochs=2 data.root=DIR."),
    ] = None,
    run_dir: Annotated[Path, typer.Option("--run-dir", help="Run folder to create.")] = Path(
        "runs/run"
    ),
    fold: Annotated[
        int | None, typer.Option("--fold", help="Validation fold (train.fold).")
    ] = None,
    folds: Annotated[
        str | None,
        typer.Option(
            "--folds",
            help="'all': train every fold into RUN/fold_K; predict then ensembles them.",
        ),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --run-dir.")
    ] = False,
    max_minutes: Annotated[
        float | None,
        typer.Option(
            "--max-minutes",
            help="Wall-clock budget for the whole command (train.max_minutes); the learning "
            "rate decays with elapsed time so the run ends converged.",
        ),
    ] = None,
) -> None:
    """Train a model; the run folder then holds everything `medseg predict` needs."""

    def go() -> Path:
        from medseg.config import ConfigError, load_config
        from medseg.training import train as train_fn
        from medseg.training import train_folds

        if folds not in (None, "all"):
            raise ConfigError(f"--folds takes 'all', got {folds!r}; use --fold N for one fold")
        if folds == "all" and fold is not None:
            raise ConfigError("--folds all trains every fold; drop --fold")
        extra = list(overrides or []) + ([f"train.fold={fold}"] if fold is not None else [])
        extra += [f"train.max_minutes={max_minutes}"] if max_minutes is not None else []
        if resume and extra:
            raise ConfigError(
                f"--resume continues {run_dir} with its stored config.yaml; drop the overrides "
                f"({' '.join(extra)}) or start a new --run-dir"
            )
        if resume:  # the run's stored config is used: nothing to plan
            # (an ensemble from before medseg stored its config takes it from CONFIG)
            old_ensemble = folds == "all" and config is not None and config.is_file()
            cfg = load_config(config) if old_ensemble else None
            if config is not None and not old_ensemble:
                typer.echo(f"--resume: {run_dir} continues with its stored config; {config} unused")
        elif config is None:
            raise ConfigError("name a config file or a dataset folder to train on")
        else:
            cfg = _planned(config, extra) if config.is_dir() else load_config(config, extra)
        if folds == "all":
            return train_folds(cfg, run_dir, resume=resume, progress=True)
        return train_fn(cfg, run_dir, resume=resume, progress=True)

    out = _run(go)
    typer.echo(f"run folder: {out}")
    results = "crossval" if folds == "all" else "validation"
    typer.echo(f"validation predictions and metrics: {out / results}")


def _planned(dataset_dir: Path, overrides: list[str]) -> Any:
    """Plan a config for a dataset folder (as `medseg plan`), then apply the overrides.

    A time budget covers the whole command, so the planning time is taken off it.
    """
    from medseg.config import replace, with_overrides
    from medseg.planner import memory_budget, plan_dataset, summary

    start = time.perf_counter()
    cfg, fingerprint = plan_dataset(dataset_dir, progress=True)
    typer.echo(summary(cfg, fingerprint, memory_budget()))
    cfg = with_overrides(cfg, overrides)
    if cfg.train.max_minutes is not None:
        left = cfg.train.max_minutes - (time.perf_counter() - start) / 60
        cfg = replace(cfg, **{"train.max_minutes": max(left, 0.1)})
    return cfg


@app.command()
def predict(
    inputs: Annotated[
        list[Path], typer.Argument(help="Scans: files, folders, DICOM series folders.")
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path(
        "predictions"
    ),
    model: Annotated[
        Path | None, typer.Option("--model", "-m", help="Run folder; default: newest under ./runs.")
    ] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    overlap: Annotated[
        float | None, typer.Option("--overlap", help="Window overlap (0-1).")
    ] = None,
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Mirroring test-time augmentation (the training mirror axes; 2^n passes).",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo scans already predicted by this model.")
    ] = False,
    formats: Annotated[
        str,
        typer.Option(
            "--formats",
            help="Comma-separated outputs: nifti, seg-nrrd, ctbl, stats, png, dicom-seg "
            "(DICOM series inputs only). Default: all but dicom-seg.",
        ),
    ] = "nifti,seg-nrrd,ctbl,stats,png",
    engine: Annotated[
        str,
        typer.Option(
            "--engine",
            help="torch, onnx (needs 'medseg export') or auto: onnx on CPU when exported.",
        ),
    ] = "auto",
    allow_unfinished: Annotated[
        bool,
        typer.Option(
            "--allow-unfinished",
            help="Predict with a run whose training did not finish (last.pt), or an ensemble "
            "with unfinished folds.",
        ),
    ] = False,
) -> None:
    """Segment scans; writes OUTPUT/NAME.nii.gz on each input's exact grid."""

    def go() -> list[Path]:
        from medseg.config import DEVICES, ConfigError
        from medseg.inference import use_physical_cores
        from medseg.predict import BatchError, PredictOptions
        from medseg.predict import predict as predict_fn

        if device not in DEVICES:
            raise ConfigError(f"--device must be one of {sorted(DEVICES)}, got {device!r}")
        if overlap is not None and not 0 <= overlap < 1:
            raise ConfigError(f"--overlap must be in [0, 1), got {overlap}")
        chosen = tuple(f.strip() for f in formats.split(",") if f.strip())
        options = PredictOptions(
            device, overlap, tta, overwrite, chosen, engine, allow_unfinished=allow_unfinished
        )
        use_physical_cores()
        try:
            return predict_fn(inputs, output, model, options, progress=True)
        except BatchError as err:  # the scans that were predicted, then the failures
            for path in err.written:
                typer.echo(str(path))
            raise

    written = _run(go)
    for path in written:
        typer.echo(str(path))


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="Run folder, or ensemble folder of fold_K runs.")],
    fmt: Annotated[str, typer.Option("--format", help="Export format: onnx.")] = "onnx",
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="File to write; default RUN/model.onnx."),
    ] = None,
) -> None:
    """Export a trained model for other runtimes (`medseg predict --engine onnx` uses it)."""

    def go() -> list[Path]:
        from medseg.config import ConfigError
        from medseg.engines import export_onnx
        from medseg.runs import load_run

        if fmt != "onnx":
            raise ConfigError(f"--format must be onnx, got {fmt!r}")
        return export_onnx(load_run(run, "cpu"), output)

    for path in _run(go):
        typer.echo(str(path))


@app.command()
def evaluate(
    predictions: Annotated[Path, typer.Argument(help="Folder of predicted label maps.")],
    references: Annotated[
        Path, typer.Argument(help="Folder of reference label maps (same names).")
    ],
    labels: Annotated[Path, typer.Option("--labels", help="dataset.json or a run's labels.json.")],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Metrics JSON (a CSV is written beside it).")
    ] = Path("metrics.json"),
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Also write a self-contained HTML report with QC pictures."),
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            "--images",
            help="Images under the report's contours (CASE.nii.gz or CASE_0000.nii.gz).",
        ),
    ] = None,
    empty: Annotated[
        str,
        typer.Option(
            "--empty",
            help="Missed or spurious labels: 'worst' scores HD95 as the image diagonal (mm) and "
            "a missed label's precision as 0; 'exclude' leaves them out of those means.",
        ),
    ] = "worst",
) -> None:
    """Per-case and per-label Dice, IoU and HD95; prints a table, writes JSON, CSV (and HTML)."""

    def go() -> tuple[dict[str, Any], tuple[Path, Path]]:
        from medseg.datasets import read_label_names
        from medseg.evaluation import (
            EMPTY_POLICIES,
            EvaluationError,
            evaluate_folders,
            write_results,
        )

        if empty not in EMPTY_POLICIES:
            raise EvaluationError(f"--empty must be {' or '.join(EMPTY_POLICIES)}, got {empty!r}")
        if images is not None and report is None:
            raise EvaluationError("--images only feeds the HTML report; add --report report.html")
        if images is not None and not images.is_dir():
            raise EvaluationError(f"{images}: images folder not found")
        results = evaluate_folders(predictions, references, read_label_names(labels), empty)
        return results, write_results(results, output)

    results, (json_path, csv_path) = _run(go)
    _print_table(results)
    typer.echo(f"metrics: {json_path}\nper case: {csv_path}")
    if report is not None:

        def go_report() -> Path:
            from medseg.report import write_report

            return write_report(results, predictions, references, report, images_dir=images)

        typer.echo(f"report: {_run(go_report)}")


def _print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from medseg.evaluation import empty_rule_note, format_table

    header, rows = format_table(results)
    caption = empty_rule_note(results["empty"])
    table = Table(title=f"{len(results['cases'])} cases", caption=caption, caption_justify="left")
    for name in header:
        table.add_column(name)
    for row in rows:
        table.add_row(*row)
    Console().print(table)


@app.command()
def plan(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder holding dataset.json.")],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Config to write (NAME.yaml); NAME.fingerprint.json goes beside."
        ),
    ],
    memory_gb: Annotated[
        float | None,
        typer.Option(
            "--memory-gb",
            help="Training memory budget in GiB. Default: on CUDA 8 GiB (nnU-Net's reference; "
            "80% of a smaller GPU), on CPU a quarter of system RAM.",
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            "--device", help="auto, cpu or cuda: the device to plan for (auto: CUDA if present)."
        ),
    ] = "auto",
) -> None:
    """Plan a training config for a dataset (nnU-Net style): spacing, network, patch, batch."""

    def go() -> tuple[str, Path]:
        from medseg.config import ConfigError
        from medseg.planner import memory_budget, plan_dataset, summary, write_planned_config

        if output.suffix not in (".yaml", ".yml"):
            raise ConfigError(f"--output {output}: give a .yaml file, e.g. configs/NAME.yaml")
        cfg, fingerprint = plan_dataset(dataset, memory_gb, device, progress=True)
        budget = memory_budget(memory_gb, device)
        fingerprint_path = write_planned_config(cfg, fingerprint, output, budget)
        return summary(cfg, fingerprint, budget), fingerprint_path

    text, fingerprint_path = _run(go)
    typer.echo(text)
    typer.echo(f"config:      {output}\nfingerprint: {fingerprint_path}")


@app.command()
def check(
    dataset: Annotated[Path, typer.Argument(help="Dataset folder holding dataset.json.")],
) -> None:
    """List every problem of a dataset (files, grids, channels, label values) before training."""

    def go() -> Any:
        from medseg.check import check_dataset

        return check_dataset(dataset, progress=True)

    found, problems = _run(go)
    for problem in problems:
        typer.echo(str(problem))
    if problems:
        typer.secho(f"{len(problems)} problem(s) found in {dataset}", fg=typer.colors.RED, err=True)
        raise typer.Exit(USER_ERROR)
    typer.echo(f"{dataset}: {len(found.cases)} cases, no problems found")


@app.command()
def demo(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Folder for every demo output.")
    ] = Path("medseg-demo"),
) -> None:
    """Train, predict and evaluate on bundled hippocampus cases (no download, ~2 min CPU)."""

    def go() -> Any:
        from medseg.demo import run_demo

        return run_demo(output, progress=True)

    result = _run(go)
    _print_table(result.metrics)
    typer.echo("")
    for label, path in result.outputs().items():
        typer.echo(f"{label:<22} {path}")
