"""The ``spinjax`` command line: parse, call a stage, print.

Exit codes: 0 success; 2 bad usage or bad input (the message says what and where);
1 internal failure (traceback only with --debug); 130 interrupted.

Each command imports the stage it calls when it runs, so that ``spinjax --help`` or
``spinjax models`` start without loading JAX.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import click

from spinjax.errors import InputError, check_writable, shown
from spinjax.run import interrupt
from spinjax.sources.base import DEFAULT_CACHE_SIZE, DEFAULT_CONNECTIONS, DOWNLOADS, FetchOptions
from spinjax.sources.layouts import VARIANTS
from spinjax.store.check import find_damage
from spinjax.store.schema import DEFAULT_STORE
from spinjax.version import __version__


@contextmanager
def _errors(debug: bool, store: Path | None = None):
    """Turn bad input into exit 2 and anything else into exit 1, without a traceback. A
    failure of a command reading ``store`` that comes from damage in the store (an unreadable
    chunk, broken metadata) is bad input too: the message names the damaged file and the repair."""
    try:
        yield
    except InputError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        sys.exit(0)
    except KeyboardInterrupt as exc:  # Interrupted says where the run stopped
        interrupt.exit_interrupted(str(exc))
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            traceback.print_exc()
        damage = find_damage(store) if store is not None else None
        if damage:
            click.echo(f"error: damaged store: {damage}", err=True)
            sys.exit(2)
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)", err=True)
        sys.exit(1)


class Size(click.ParamType):
    """A number of bytes from ``minimum`` (1 unless said) to below 1 EiB: ``2GB``, ``512MiB``,
    ``1.5g``, ``1e9`` (units are binary). Read as a decimal, so ``infGB`` or ``1e400g`` are
    refused, not overflowed."""

    name = "size"
    UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    PATTERN = re.compile(r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d{1,4})?)\s*([kmgt]?)(?:i?b)?\s*", re.I)
    LIMIT = 1 << 60

    def __init__(self, minimum: int = 1):
        self.minimum = minimum

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int):
            return value
        match = self.PATTERN.fullmatch(value)
        if not match:
            self.fail(f"{shown(value)} is not a size like 2GB or 512MiB", param, ctx)
        size = Decimal(match[1]) * self.UNITS[match[2].lower()]
        if not self.minimum <= size < self.LIMIT:
            least = f"at least {self.minimum} byte" + "s" * (self.minimum != 1)
            self.fail(f"{shown(value)}: a size must be {least} and below 1 EiB", param, ctx)
        return int(size)


def _folder(ctx: click.Context, param: click.Parameter, value: Path) -> Path:
    """An output folder: one that exists, or that can be made there (nothing is made yet)."""
    try:
        check_writable(value)
    except InputError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return value


def _hub_options(command):
    """--download, --connections, --cache-size and --keep-downloads: how hub sources read."""
    options = [
        click.option(
            "--download", type=click.Choice(DOWNLOADS), default="ranged", show_default=True,
            help="Hub checkpoints: 'ranged' reads only the bytes of the Q/K rows (HTTP range requests), "
            "'whole' downloads every file holding them into the Hugging Face cache (docs/hub.md).",
        ),
        click.option(
            "--connections", type=click.IntRange(min=1), default=DEFAULT_CONNECTIONS, show_default=True,
            help="Range requests in flight at once (--download ranged).",
        ),
        click.option(
            "--cache-size", type=Size(minimum=0), default=f"{DEFAULT_CACHE_SIZE >> 30}GiB", show_default=True,
            help="Bound of the Q/K cache in $SPINJAX_CACHE/hub (least recently used evicted first); 0: none.",
        ),
        click.option(
            "--keep-downloads", is_flag=True,
            help="--download whole: keep the hub files of finished steps in the cache (default: evict).",
        ),
    ]  # fmt: skip
    for option in reversed(options):
        command = option(command)
    return command


# Below 20 dpi the smallest legend font is under a pixel and FreeType fails; above 600, print
# quality, images run to gigabytes (plots.save also caps the pixels of each image).
DPI_RANGE = (20, 600)


class _Commands(click.Group):
    """The command group; Ctrl-C is handled from its first instant and exits 130 wherever it
    lands (click alone says "Aborted!" and exits 1, and one swallowed by a callback was lost)."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        with interrupt.remembered():
            try:
                code = super().main(*args, standalone_mode=False, **kwargs)  # ctx.exit(n) returns n
            except click.exceptions.Abort:
                interrupt.exit_interrupted()
            except click.exceptions.Exit as exc:
                sys.exit(exc.exit_code)
            except click.ClickException as exc:
                exc.show()
                sys.exit(exc.exit_code)
            if interrupt.requested():  # a Ctrl-C whose KeyboardInterrupt was swallowed somewhere
                interrupt.exit_interrupted()
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="spinjax")
def main() -> None:
    """Statistics and spectra of every attention head's W_QK, into a Zarr store."""


@main.command()
@click.option("--model", required=True, help="Known name (see `spinjax models`), local directory, or hub id.")
@click.option(
    "--steps",
    default="last",
    show_default=True,
    help="all | last | a,b,c | start:stop:stride | a mix (see `spinjax steps NAME`).",
)
@click.option(
    "--store", "store_path", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--memory-budget",
    type=Size(),
    default=None,
    help="Peak bytes for W_QK blocks, e.g. 2GB [default: 1/4 of free memory].",
)
@click.option("--recompute", is_flag=True, help="Recompute steps that are already done.")
@_hub_options
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option(
    "--distributed",
    is_flag=True,
    help="Join JAX's multi-process runtime (auto-detected on SLURM, TPU, clouds) and split the steps: "
    "step i of the list goes to process i % N.",
)
@click.option("--coordinator", metavar="HOST:PORT", help="Address of process 0 (implies --distributed).")
@click.option("--num-processes", type=click.IntRange(min=1), help="Number of processes (with --coordinator).")
@click.option("--process-id", type=click.IntRange(min=0), help="This process, 0..N-1 (with --coordinator).")
@click.option(
    "--join-timeout", type=int, metavar="SECONDS",
    help="With --distributed: how long to wait for every process to join before giving up (exit 2) "
    "[default: 300, as JAX].",
)  # fmt: skip
@click.option(
    "--null",
    is_flag=True,
    help="Add <stat>_z: z-scores against random heads of the same geometry and scale "
    "(the store's baseline/<d>x<dh>, computed once when missing).",
)
@click.option(
    "--null-samples",
    default=1000,
    show_default=True,
    type=click.IntRange(min=2),
    help="Random heads of the null when it must be computed.",
)
@click.option(
    "--pairs",
    type=click.Choice(["none", "layer", "model"]),
    default="layer",
    show_default=True,
    help="Cross-head geometry: distance, cosine and JS divergence between the heads of each layer; "
    "'model' adds every pair of heads of the model.",
)
@click.option(
    "--variant",
    type=click.Choice(VARIANTS),
    default="raw",
    show_default=True,
    help="raw weights (SPEC); ln-folded: the attention layer norm's gain folded in (TransformerLens); "
    "bias: the bias-augmented form [[W_Q^T W_K, W_Q^T b_K], [b_Q^T W_K, b_Q.b_K]]. "
    "Other than raw, results go to the store group MODEL@VARIANT.",
)
@click.option("--ov", is_flag=True, help="Add the matrices W_V, W_O and W_OV = W_V^T W_O^h per head.")
def run(
    model: str,
    steps: str,
    store_path: Path,
    memory_budget: int | None,
    recompute: bool,
    download: str,
    connections: int,
    cache_size: str,
    keep_downloads: bool,
    quiet: bool,
    debug: bool,
    distributed: bool,
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    join_timeout: int | None,
    null: bool,
    null_samples: int,
    pairs: str,
    variant: str,
    ov: bool,
) -> None:
    """Compute every head's statistics for the requested steps of MODEL."""
    from spinjax.run import RunOptions, init_distributed
    from spinjax.run import run as run_pipeline
    from spinjax.run.distributed import DEFAULT_JOIN_TIMEOUT_S

    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit) and None in explicit:
        raise click.UsageError("--coordinator, --num-processes and --process-id go together")
    if process_id is not None and process_id >= num_processes:
        raise click.BadParameter(f"{process_id} is not below --num-processes {num_processes}")
    with _errors(debug, store_path), _progress(quiet) as progress:
        timeout = DEFAULT_JOIN_TIMEOUT_S if join_timeout is None else join_timeout
        index, count = init_distributed(*explicit, timeout) if distributed or coordinator else (0, 1)
        options = RunOptions(
            steps=steps, store=store_path, memory_budget=memory_budget, recompute=recompute,
            download=download, connections=connections, cache_size=cache_size,
            keep_downloads=keep_downloads, null=null, null_samples=null_samples, pairs=pairs,
            variant=variant, ov=ov, process_index=index, process_count=count,
        )  # fmt: skip
        result = run_pipeline(model, options, progress)  # Ctrl-C: Interrupted, exit 130
    if not quiet:
        busy = result.io_wait_s + result.compute_s
        waited = f", {100 * result.io_wait_s / busy:.0f}% of it waiting for reads" if busy else ""
        added = f"; {len(result.added)} variable(s) added to them" if result.added else ""
        click.echo(
            f"{result.key}: {len(result.computed)} step(s) computed in {busy:.1f} s{waited}; "
            f"{len(result.skipped)} already done{added}; store {result.store}"
            + (f"; process {index} of {count}" if count > 1 else "")
        )


class _Echo(logging.Handler):
    """Log records of spinjax (what it does before the steps, such as training the embedded
    model) as lines on stderr, looked up at each line so that a progress bar shows them too."""

    def emit(self, record: logging.LogRecord) -> None:
        click.echo(self.format(record), err=True)


@contextmanager
def _progress(quiet: bool):
    """What a long command shows: spinjax's INFO lines, and on a terminal a rich progress bar
    (steps, layers) from the moment the steps are planned; nothing with --quiet, no bar in
    pipes or CI."""
    from spinjax.run import Progress

    logger, handler, propagate = logging.getLogger("spinjax"), _Echo(), logging.getLogger("spinjax").propagate
    if not quiet:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # libraries (absl) may have set up the root logger: say it once
    try:
        if quiet or not sys.stderr.isatty():
            yield Progress(on_info=lambda text: None) if quiet else Progress()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
        from rich.progress import Progress as Bar

        bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True)  # fmt: skip
        tasks = {}

        def on_plan(n_steps: int, n_layers: int) -> None:
            bar.start()  # not before: the screen stays usable while models train or download
            tasks["steps"] = bar.add_task("steps", total=n_steps)
            tasks["layers"] = bar.add_task("layers", total=n_layers)

        def on_layer(step: int, layer: int) -> None:
            bar.update(tasks["layers"], completed=layer + 1, description=f"step {step} layers")

        def on_step(step: int) -> None:
            bar.advance(tasks["steps"])

        try:
            yield Progress(on_plan=on_plan, on_layer=on_layer, on_step=on_step)
        finally:
            bar.stop()
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def models(as_json: bool) -> None:
    """Known model names with their attention geometry and checkpoint count."""
    from spinjax.sources.known import KNOWN

    rows = [{"name": m.name, "repo": m.repo or "(embedded, trained locally)", "d_model": m.d_model,
             "n_heads": m.n_heads, "n_kv_heads": m.n_kv_heads, "d_head": m.d_head,
             "n_layers": m.n_layers, "steps": len(m.steps)} for m in KNOWN.values()]  # fmt: skip
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    cols = ["name", "d_model", "n_heads", "n_kv_heads", "d_head", "n_layers", "steps", "repo"]
    click.echo(_table([[str(r[c]) if r[c] is not None else "-" for c in cols] for r in rows], cols))


@main.command()
@click.argument("name")
@click.option("--debug", is_flag=True)
def steps(name: str, debug: bool) -> None:
    """The checkpoint steps NAME offers, one per line."""
    from spinjax.sources import resolve

    with _errors(debug):
        for step, revision in resolve(name).offered:
            click.echo(f"{step}\t{revision}")


def _last_checkpoint(name: str):
    """(store key, the last checkpoint NAME offers) without reading any weights."""
    from spinjax.sources import resolve

    source = resolve(name)
    step, revision = source.offered[-1]
    return source.key, source.open(step, revision)


@main.command()
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--debug", is_flag=True)
def inventory(name: str, as_json: bool, debug: bool) -> None:
    """Every tensor of NAME's (last) checkpoint: name, shape, dtype, category; parameters per
    category and in total, tied weights counted once. Reads headers and metadata only."""
    from spinjax.sources.inventory import checkpoint_inventory

    with _errors(debug):
        key, checkpoint = _last_checkpoint(name)
        inv = checkpoint_inventory(checkpoint, key)
    if as_json:
        click.echo(json.dumps(inv.as_dict(), indent=1))
        return
    rows = []
    for e in inv.entries:
        note = ("tied to " + e.tied_to if e.tied_to else "") + ("" if e.stored else " (not stored)")
        rows.append([e.name, "x".join(map(str, e.shape)) or "()", e.dtype, e.category, f"{e.size:,}", note])
    click.echo(_table(rows, ["tensor", "shape", "dtype", "category", "parameters", "note"]))
    click.echo(f"\n{inv.model} ({inv.architecture}) at {inv.where}")
    cats = [[cat, str(c["tensors"]), f"{c['parameters']:,}", f"{c['parameters_with_tied']:,}"]
            for cat, c in inv.per_category().items()]  # fmt: skip
    click.echo(_table(cats, ["category", "tensors", "parameters", "with tied counted again"]))
    click.echo(f"parameters: {inv.parameters:,} unique; {inv.parameters_with_tied:,} with tied weights "
               f"counted again; {inv.stored_elements:,} elements stored")  # fmt: skip


@main.command()
@click.argument("name")
@click.option(
    "--out", default="figures", show_default=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option("--json", "as_json", is_flag=True, help="The numbers as JSON (figures are still written).")
@click.option(
    "--top", default=10, show_default=True, type=click.IntRange(min=1), help="Dimensions and peaks named."
)
@click.option(
    "--dpi", default=150, show_default=True, type=click.IntRange(*DPI_RANGE), help="Resolution of the PNG."
)  # fmt: skip
@click.option("--debug", is_flag=True)
def embeddings(name: str, out: Path, as_json: bool, top: int, dpi: int, debug: bool) -> None:
    """NAME's learned absolute position embeddings (GPT-2, BERT): the matrix, the variance of each
    dimension over positions, the cosine of adjacent positions and the power spectrum over
    positions, as figures in --out (PNG and PDF) and numbers. Rotary models are refused."""
    from spinjax.analysis.embeddings import position_figures, position_summary
    from spinjax.analysis.figures import save
    from spinjax.sources.inventory import position_tensor

    with _errors(debug):
        key, checkpoint = _last_checkpoint(name)
        tensor = checkpoint.tensor(position_tensor(checkpoint.config, checkpoint.label))
        matrix = tensor[:]
        summary = position_summary(matrix, top=top)
        paths = []
        for figure_name, fig in position_figures(matrix, summary, key).items():
            paths += save(fig, out / f"{key}_{figure_name}", dpi=dpi)
    if as_json:
        click.echo(json.dumps({"model": key, "tensor": tensor.name, **summary}, indent=1))
        return
    n_pos, dims = summary["shape"]
    click.echo(f"{key}: {tensor.name}, {n_pos} positions x {dims} dimensions")
    top_dims = ", ".join(f"{d['dimension']} ({100 * d['share']:.1f}%)" for d in summary["top_dimensions"])
    click.echo(f"dimensions with the most variance over positions: {top_dims}")
    worst = summary["adjacent_cosine_argmin"] + 1
    click.echo(f"adjacent positions' cosine: mean {summary['adjacent_cosine_mean']:.4f}, "
               f"min {summary['adjacent_cosine_min']:.4f} at position {worst}")  # fmt: skip
    peaks = ", ".join(f"{p['period']:.1f} ({100 * p['power']:.1f}%)" for p in summary["peaks"])
    click.echo(f"strongest periods (positions, share of power): {peaks}")
    for path in paths:
        click.echo(str(path))


@main.command()
@click.argument("store_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--debug", is_flag=True)
def show(store_path: Path, as_json: bool, debug: bool) -> None:
    """Models in a store, steps done / requested, variables and sizes."""
    from spinjax.store import summary

    with _errors(debug, store_path):
        info = summary(store_path)
    if as_json:
        click.echo(json.dumps(info, indent=1, default=str))
        return
    click.echo(f"{store_path}: spinjax store, schema {info['schema']}, written by {info['version']}")
    for key, m in info["models"].items():
        click.echo(f"\n[{key}] {m['architecture']} from {m['source']} (dtype {m['dtype']})")
        click.echo(f"  d_model={m['d_model']} layers={m['n_layers']} heads={m['n_heads']} "
                   f"kv_heads={m['n_kv_heads']} d_head={m['d_head']}")  # fmt: skip
        click.echo(f"  steps done {m['steps_done']} / requested {m['steps_requested']}: {m['steps']}")
        extras = [f"variant {m['variant']}"] * (m["variant"] != "raw") + [
            f"{k}: {v}" for k, v in m["features"].items()
        ]
        click.echo(f"  matrices {', '.join(m['matrices'])}" + "".join(f"; {e}" for e in extras))
        click.echo(f"  {len(m['variables'])} variables, {m['bytes'] / 1e6:.2f} MB on disk: "
                   + ", ".join(m["variables"]))  # fmt: skip
    for key, b in info["baselines"].items():
        click.echo(f"\n[{key}] random-matrix null: d={b['d']} d_head={b['d_head']} sigma={b['sigma']} "
                   f"samples={b['samples']} seed={b['seed']}, {b['bytes'] / 1e6:.2f} MB on disk")  # fmt: skip


@main.command()
@click.option("--shapes", default="160m,1.4b", show_default=True, help="Comma list of 160m, 1.4b, 12b.")
@click.option("--memory-budget", type=Size(), default="1GB", show_default=True, help="Bytes for W_QK blocks.")
@click.option("--repeat", default=2, show_default=True, help="Timed repetitions (best kept).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also append the table, dated and naming the machine and device, to this markdown file "
    "(e.g. benchmarks/RESULTS.md).",
)  # fmt: skip
def bench(shapes: str, memory_budget: int, repeat: int, as_json: bool, results: Path | None) -> None:
    """Kernel throughput (heads/s, GB/s, FLOP/s) on this machine's device, and its ratio to
    the floor (matmul + one pass over W_QK + reading Q/K) measured in the same run."""
    from spinjax.run.bench import SHAPES, markdown, measure_shape, results_section

    names = [s.strip() for s in shapes.split(",") if s.strip()]
    unknown = [n for n in names if n not in SHAPES]
    if unknown:
        raise click.BadParameter(f"unknown shape(s) {unknown}; choose from {', '.join(SHAPES)}")
    if results is not None and results.exists() and not results.is_file():
        raise click.BadParameter(f"{results}: not a file", param_hint="--results")
    measured = []
    for name in names:
        measured.append(measure_shape(name, budget_bytes=memory_budget, repeat=repeat))
        if not as_json:
            click.echo(f"measured {name}", err=True)
    if as_json:
        click.echo(json.dumps([r.row() for r in measured], indent=1))
    else:
        click.echo(markdown(measured))
    if results is not None:
        with results.open("a") as f:
            f.write("\n" + results_section(measured))
        click.echo(f"appended to {results}", err=True)


@main.command()
@click.argument("store_path", metavar="STORE", required=False, type=click.Path(path_type=Path))
@click.option(
    "--model", "models", multiple=True,
    help="Model key in the store (default: its only model). Repeat to choose the models of the "
    "cross-model figures (default: every model of the store); the first is plotted elsewhere.",
)  # fmt: skip
@click.option("--figure", "figures", multiple=True, help="Figure name (repeatable) or 'all'; see --list.")
@click.option("--step", type=int, default=None, help="Step of the one-step figures [default: last done].")
@click.option("--layer", type=int, default=None, help="Layer of the per-layer figures [default: 0].")
@click.option("--head", type=int, default=None, help="Head of the per-head figures [default: 0].")
@click.option("--matrix", default="W_QK", show_default=True, help="W_Q, W_K or W_QK.")
@click.option("--stat", default="std", show_default=True, help="Statistic of depth, stat-steps, animation.")
@click.option(
    "--estimator", type=click.Choice(["mm", "plugin"]), default="mm", show_default=True,
    help="Entropies and KL divergences: Miller-Madow corrected (mm) or plug-in.",
)  # fmt: skip
@click.option("--baseline", metavar="DxDH", default=None, help="Null ensemble of the null figures (64x16).")
@click.option(
    "--out", default="figures", show_default=True, type=click.Path(path_type=Path), callback=_folder,
    help="Output folder.",
)  # fmt: skip
@click.option(
    "--dpi", default=150, show_default=True, type=click.IntRange(*DPI_RANGE),
    help=f"Resolution of the PNG (and GIF), {DPI_RANGE[0]} to {DPI_RANGE[1]}.",
)  # fmt: skip
@click.option("--list", "list_figures", is_flag=True, help="Name every figure with one line each.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def plot(
    store_path: Path | None,
    models: tuple[str, ...],
    figures: tuple[str, ...],
    step: int | None,
    layer: int | None,
    head: int | None,
    matrix: str,
    stat: str,
    estimator: str,
    baseline: str | None,
    out: Path,
    dpi: int,
    list_figures: bool,
    debug: bool,
) -> None:
    """Draw figures of a model in STORE into --out: PNG and PDF (and GIF for the animation).

    Files are named MODEL_FIGURE[_stepS][_layerL][_headH][_MATRIX][_STAT][_plugin][_DxDH], with
    the options given that the figure uses; cross-model figures drawn without --model are named
    models_FIGURE, the null ensembles' baseline_FIGURE. Without --model on a store of several
    models, the cross-model and null figures are drawn.
    """
    from spinjax.analysis.figures import FIGURES

    if list_figures:
        width = max(map(len, FIGURES))
        for name, spec in FIGURES.items():
            click.echo(f"{name.ljust(width)}  {spec.description}")
        return
    if store_path is None:
        raise click.UsageError("missing argument STORE (or --list to name the figures)")
    if not figures:
        raise click.UsageError("give --figure NAME (repeatable, or 'all'); --list names them")
    with _errors(debug, store_path):
        from spinjax.analysis.figures import file_stem, make_figure, save, select

        names = list(FIGURES) if "all" in figures else list(dict.fromkeys(figures))
        unknown = [n for n in names if n not in FIGURES]
        if unknown:
            raise InputError(f"no figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
        sel = select(store_path, models[0] if models else None, step=step, layer=layer, head=head,
                     matrix=matrix, stat=stat, others=list(models) or None, estimator=estimator,
                     baseline=baseline)  # fmt: skip
        skipped: dict[str, list[str]] = {}  # reason -> figures (one line per reason)
        for name in names:
            try:
                fig = make_figure(name, sel)
            except InputError as exc:
                if "all" not in figures:
                    raise
                skipped.setdefault(str(exc), []).append(name)
                continue
            for path in save(fig, out / file_stem(name, sel), dpi=dpi):
                click.echo(str(path))
        for reason, skipped_names in skipped.items():
            click.echo(f"skipped {', '.join(skipped_names)}: {reason}", err=True)


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model key in the store (default: its only model).")
@click.option(
    "--out", default="report", show_default=True, type=click.Path(path_type=Path), callback=_folder,
    help="Folder for index.html and its figures.",
)  # fmt: skip
@click.option("--embed", is_flag=True, help="Embed the figures in index.html (one file, data URIs).")
@click.option("--step", type=int, default=None, help="Step of the one-step figures [default: last done].")
@click.option("--layer", type=int, default=None, help="Layer of the per-layer figures [default: 0].")
@click.option("--head", type=int, default=None, help="Head of the per-head figures [default: 0].")
@click.option("--matrix", default="W_QK", show_default=True, help="W_Q, W_K or W_QK.")
@click.option(
    "--estimator", type=click.Choice(["mm", "plugin"]), default="mm", show_default=True,
    help="Entropies and KL divergences: Miller-Madow corrected (mm) or plug-in.",
)  # fmt: skip
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def report(
    store_path: Path,
    model: str | None,
    out: Path,
    embed: bool,
    step: int | None,
    layer: int | None,
    head: int | None,
    matrix: str,
    estimator: str,
    debug: bool,
) -> None:
    """One static HTML page (out/index.html) with every figure the store allows for MODEL:
    the training-dynamics figures once it holds several steps (and `spinjax dynamics` ran),
    the null's bands and figures once it holds null ensembles (`run --null`, `baseline`)."""
    with _errors(debug, store_path):
        from spinjax.analysis.report import build_report

        result = build_report(store_path, model, out, embed=embed, step=step, layer=layer,
                              head=head, matrix=matrix, estimator=estimator)  # fmt: skip
    click.echo(f"{result.path}: {len(result.figures)} figures")
    for name, why in result.skipped.items():
        click.echo(f"skipped {name}: {why}", err=True)


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port; 0: any free one."
)
@click.option(
    "--host", default="127.0.0.1", show_default=True,
    help="Address to listen on; beyond loopback, anyone who reaches the port can read the store.",
)  # fmt: skip
@click.option("--open", "open_browser", is_flag=True, help="Open the page in the default browser.")
@click.option("--debug", is_flag=True, help="Log requests and show tracebacks.")
def view(store_path: Path, port: int, host: str, open_browser: bool, debug: bool) -> None:
    """Browse STORE in a local web page: every head of every finished step (read-only)."""
    with _errors(debug):
        from spinjax.analysis.view.server import serve

        serve(store_path, host, port, open_browser=open_browser, debug=debug, echo=click.echo)


@main.command()
@click.option("--model", required=True, help="The model as given to `spinjax run` (its store group).")
@click.option(
    "--store", "store_path", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path)
)
@click.option("--top-k", default=8, show_default=True, type=click.IntRange(min=1), help="Directions kept.")
@click.option(
    "--gap-tol", default=0.1, show_default=True, type=click.FloatRange(min=0, max=1, min_open=True),
    help="Relative gap below which two singular values count as near-degenerate.",
)  # fmt: skip
@_hub_options
@click.option(
    "--variant", type=click.Choice(VARIANTS), default="raw", show_default=True,
    help="The weight variant the run used (its group MODEL@VARIANT).",
)  # fmt: skip
@click.option("--quiet", is_flag=True, help="No progress bar or summary.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def dynamics(
    model: str,
    store_path: Path,
    top_k: int,
    gap_tol: float,
    download: str,
    connections: int,
    cache_size: str,
    keep_downloads: bool,
    variant: str,
    quiet: bool,
    debug: bool,
) -> None:
    """Training dynamics of MODEL's finished steps: divergences from the first step and between
    consecutive ones, top-k singular-direction overlaps, level crossings and repulsions."""
    from spinjax.run import compute_dynamics

    with _errors(debug, store_path), _progress(quiet) as progress:
        fetch = FetchOptions(download, connections, cache_size, keep_downloads=keep_downloads)
        res = compute_dynamics(model, store_path, top_k=top_k, gap_tol=gap_tol, fetch=fetch,
                               progress=progress, variant=variant)  # fmt: skip
    if not quiet:
        click.echo(
            f"{res.key}: {len(res.steps)} steps, k={res.top_k}, {len(res.pairs)} pair(s) of steps computed "
            f"({len(res.read)} checkpoints read), {len(res.reused)} reused; store {res.store}"
        )


@main.command()
@click.option("--d", "d_model", required=True, type=click.IntRange(min=1), help="d_model of the heads.")
@click.option(
    "--d-head", "d_head", required=True, metavar="DH[,DH...]",
    help="d_head (<= d), or a comma list for a sweep: one group per value.",
)  # fmt: skip
@click.option("--sigma", default=1.0, show_default=True, type=float, help="Std of the factors' entries.")
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(min=2), help="Random heads.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--store", "store_path", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--memory-budget",
    type=Size(),
    default=None,
    help="Peak bytes for W_QK blocks [default: 1/4 of free memory].",
)
@click.option("--recompute", is_flag=True, help="Replace an ensemble of other sigma/samples/seed.")
@click.option("--quiet", is_flag=True, help="No summary line.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def baseline(
    d_model: int,
    d_head: str,
    sigma: float,
    samples: int,
    seed: int,
    store_path: Path,
    memory_budget: int | None,
    recompute: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Monte Carlo null of random heads W_QK = W_Q^T W_K, factors i.i.d. N(0, sigma^2): every
    statistic of every draw, into the store group baseline/<d>x<d_head> (one per d_head).

    The source study's scaling (N(0, 1) factors, W_QK / sqrt(d)) is --sigma d**-0.25; any
    --sigma describes every scale (the figures and `run --null` rescale)."""
    with _errors(debug, store_path):
        from spinjax.run import run_baseline
        from spinjax.run.baseline import check_args
        from spinjax.run.features import rescore_dependents

        try:
            d_heads = list(dict.fromkeys(int(v) for v in d_head.split(",") if v.strip()))
        except ValueError:
            raise InputError(f"--d-head must be an integer or a comma list of them, not {d_head!r}") from None
        if not d_heads or min(d_heads) < 1:
            raise InputError(f"--d-head values must be at least 1, got {d_head!r}")
        for dh in d_heads:  # every value checked before anything is computed
            check_args(d_model, dh, sigma, samples, seed)
        for dh in d_heads:
            result = run_baseline(d_model, dh, store_path=store_path, sigma=sigma, samples=samples,
                                  seed=seed, recompute=recompute, memory_budget=memory_budget)  # fmt: skip
            rescored = rescore_dependents(store_path, d_model, dh) if result.computed else {}
            if not quiet:
                what = f"{result.samples} draws in {result.seconds:.1f} s" if result.computed else ""
                click.echo(f"{result.key}: {what or 'already there'}; store {result.store}")
                for name, steps in rescored.items():
                    click.echo(f"{name}: z-scores of {steps} finished step(s) scored against it again")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in lines)


if __name__ == "__main__":
    main()
