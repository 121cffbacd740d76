"""``fedscan models ls|show|promote|rollback`` and ``fedscan predict``: the model registry and the diagnose
stage's answers on the command line (registered on the main app by :func:`register_commands`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from schemas.settings import get_settings

models_app = typer.Typer(help="The model registry: list, show, promote, roll back.", no_args_is_help=True)
console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"fedscan: error: {message}", markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(code)


RootOption = Annotated[
    str | None,
    typer.Option("--root", help="Data root (folder or fsspec URL) holding models/registry; default FEDSCAN_DATA_ROOT."),
]


def _registry(root: str | None) -> object:
    from tasks.registry import ModelRegistry

    return ModelRegistry.for_data_root(root or get_settings().data_root)


def list_models(root: RootOption = None) -> None:
    """Every registered model, oldest first; the promoted one is marked."""
    from tasks.registry import ModelRegistry

    registry = _registry(root)
    assert isinstance(registry, ModelRegistry)
    pointer = registry.pointer()
    table = Table(title=f"models in {registry.uri}")
    for col in ("", "version", "task", "size", "rounds", "strategy", "auc", "parent", "decision", "created"):
        table.add_column(col, min_width=16 if col in ("version", "parent") else None, overflow="fold")
    for version in registry.versions():
        card = registry.card(version)
        decision = registry.decision(version)
        table.add_row(
            "*" if pointer is not None and pointer.version == version else "",
            version,
            card.task.value,
            f"{card.input_size[0]}x{card.input_size[1]}",
            str(card.rounds),
            card.strategy,
            "" if card.metric_value is None else f"{card.metric_value:.4f}",
            card.parent or "",
            "" if decision is None else decision.outcome.value,
            f"{card.created_at:%Y-%m-%d %H:%M}",
        )
    console.print(table)
    if pointer is None:
        console.print("no model is promoted")


def show_model(
    version: Annotated[str | None, typer.Argument(help="Version or unique prefix (default: the promoted one).")] = None,
    root: RootOption = None,
) -> None:
    """A model's card (JSON) and the gate's decision on it."""
    from tasks.registry import ModelRegistry

    registry = _registry(root)
    assert isinstance(registry, ModelRegistry)
    if version is None:
        current = registry.current()
        if current is None:
            raise fail(f"{registry.uri}: no model is promoted")
        version = current.version
    card = registry.card(version)
    decision = registry.decision(card.version)
    doc = {
        "card": card.model_dump(mode="json"),
        "decision": None if decision is None else decision.model_dump(mode="json"),
    }
    console.print_json(json.dumps(doc))


def promote_model(
    version: Annotated[str, typer.Argument(help="Version or unique prefix.")], root: RootOption = None
) -> None:
    """Make a registered model current (its files and checksum are checked first)."""
    from tasks.registry import ModelRegistry

    registry = _registry(root)
    assert isinstance(registry, ModelRegistry)
    decision = registry.promote(version)
    console.print(f"promoted {decision.version} ({decision.reason}); previous: {decision.current_version}")


def rollback_model(root: RootOption = None) -> None:
    """Make the previously promoted model current again (checked first)."""
    from tasks.registry import ModelRegistry

    registry = _registry(root)
    assert isinstance(registry, ModelRegistry)
    decision = registry.rollback()
    console.print(f"current model: {decision.version} ({decision.reason})")


def predict(
    store: Annotated[Path, typer.Argument(help="The site store (<site>.zarr).")],
    scan: Annotated[str, typer.Argument(help="Scan id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """A scan's prediction: each slice's lesion probability, the flagged slices and the model that scored them."""
    from tasks.diagnose.driver import read_prediction
    from tasks.storage import SiteStore

    site = SiteStore.open(store, mode="r")
    prediction = read_prediction(site.scan(scan))
    if prediction is None:
        raise fail(
            f"scan {scan!r} of {store} has no prediction yet (the diagnose stage has not run: no promoted model, "
            "or the scan's surrogates are not done)"
        )
    if as_json:
        print(json.dumps(prediction, indent=2))
        return
    console.print(
        f"scan {prediction['site']}/{prediction['scan']}: {len(prediction['flagged'])} of "
        f"{len(prediction['probabilities'])} slices flagged (p ≥ {prediction['threshold']}); model "
        f"{prediction['model_version']} ({prediction['task']}, {prediction['adaptation']})",
        highlight=False,
    )
    table = Table(box=None)
    for col in ("slice", "probability", "flagged"):
        table.add_column(col)
    for k, p in enumerate(prediction["probabilities"]):
        table.add_row(str(k), f"{p:.4f}", "yes" if k in prediction["flagged"] else "")
    console.print(table)


def register_commands(app: typer.Typer, *, friendly_errors: Callable[[Any], Any]) -> None:
    """Add ``models`` and ``predict`` to the main app, each wrapped by its error handler (one line per error)."""
    for name, command in (
        ("ls", list_models),
        ("show", show_model),
        ("promote", promote_model),
        ("rollback", rollback_model),
    ):
        models_app.command(name)(friendly_errors(command))
    app.add_typer(models_app, name="models")
    app.command("predict")(friendly_errors(predict))
