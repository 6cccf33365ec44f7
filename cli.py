"""The ``spinjax`` command line: parse, call a stage, print.

Exit codes: 0 success; 2 bad usage or bad input (the message says what and where);
1 internal failure (traceback only with --debug); 130 interrupted.

Each command imports the stage it calls when it runs, so that ``spinjax --help`` or
``spinjax models`` start without loading JAX.
"""

from __future__ import annotations

import json
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import click

from spinjax.errors import InputError
from spinjax.sources.base import DEFAULT_CACHE_SIZE, DEFAULT_CONNECTIONS, DOWNLOADS, FetchOptions
from spinjax.sources.layouts import VARIANTS
from spinjax.store.schema import DEFAULT_STORE
from spinjax.version import __version__


@contextmanager
def _errors(debug: bool):
    """Turn bad input into exit 2 and anything else into exit 1, without a traceback."""
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
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI boundary
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug)", err=True)
        sys.exit(1)


def _parse_size(text: str, option: str | None = None) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    try:
        return int(float(t[:-1]) * units[t[-1]]) if t and t[-1] in units else int(t)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size like 2GB or 512MiB", param_hint=option) from None


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
            "--cache-size", default=f"{DEFAULT_CACHE_SIZE >> 30}GiB", show_default=True,
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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    memory_budget: str | None,
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
    null: bool,
    null_samples: int,
    pairs: str,
    variant: str,
    ov: bool,
) -> None:
    """Compute every head's statistics for the requested steps of MODEL."""
    from spinjax.run import Interrupted, RunOptions, init_distributed
    from spinjax.run import run as run_pipeline

    budget = _parse_size(memory_budget) if memory_budget else None
    cache_bytes = _parse_size(cache_size, "--cache-size")
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit) and None in explicit:
        raise click.UsageError("--coordinator, --num-processes and --process-id go together")
    if process_id is not None and process_id >= num_processes:
        raise click.BadParameter(f"{process_id} is not below --num-processes {num_processes}")
    with _errors(debug), _progress(quiet) as progress:
        index, count = init_distributed(*explicit) if distributed or coordinator else (0, 1)
        options = RunOptions(
            steps=steps, store=store_path, memory_budget=budget, recompute=recompute, download=download,
            connections=connections, cache_size=cache_bytes, keep_downloads=keep_downloads,
            null=null, null_samples=null_samples, pairs=pairs,
            variant=variant, ov=ov, process_index=index, process_count=count,
        )  # fmt: skip
        try:
            result = run_pipeline(model, options, progress)
        except Interrupted as exc:  # Ctrl-C: finished steps are kept, the run is marked interrupted
            click.echo(f"interrupted: {exc}", err=True)
            sys.exit(130)
    if not quiet:
        busy = result.io_wait_s + result.compute_s
        waited = f", {100 * result.io_wait_s / busy:.0f}% of it waiting for reads" if busy else ""
        click.echo(
            f"{result.key}: {len(result.computed)} step(s) computed in {busy:.1f} s{waited}; "
            f"{len(result.skipped)} already done; store {result.store}"
            + (f"; process {index} of {count}" if count > 1 else "")
        )


@contextmanager
def _progress(quiet: bool):
    """A rich progress bar (steps, layers) on a terminal; nothing in pipes, CI or --quiet."""
    from spinjax.run import Progress

    if quiet or not sys.stderr.isatty():
        yield Progress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
    from rich.progress import Progress as Bar

    with Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
             TimeElapsedColumn(), transient=True) as bar:  # fmt: skip
        tasks = {}

        def on_plan(n_steps: int, n_layers: int) -> None:
            tasks["steps"] = bar.add_task("steps", total=n_steps)
            tasks["layers"] = bar.add_task("layers", total=n_layers)

        def on_layer(step: int, layer: int) -> None:
            bar.update(tasks["layers"], completed=layer + 1, description=f"step {step} layers")

        def on_step(step: int) -> None:
            bar.advance(tasks["steps"])

        yield Progress(on_plan=on_plan, on_layer=on_layer, on_step=on_step)


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


@main.command()
@click.argument("store_path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--debug", is_flag=True)
def show(store_path: Path, as_json: bool, debug: bool) -> None:
    """Models in a store, steps done / requested, variables and sizes."""
    from spinjax.store import summary

    with _errors(debug):
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


@main.command()
@click.option("--shapes", default="160m,1.4b", show_default=True, help="Comma list of 160m, 1.4b, 12b.")
@click.option("--memory-budget", default="1GB", show_default=True, help="Bytes for W_QK blocks.")
@click.option("--repeat", default=2, show_default=True, help="Timed repetitions (best kept).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--results", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="Also append the table, dated and naming the machine and device, to this markdown file "
    "(e.g. benchmarks/RESULTS.md).",
)  # fmt: skip
def bench(shapes: str, memory_budget: str, repeat: int, as_json: bool, results: Path | None) -> None:
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
        measured.append(measure_shape(name, budget_bytes=_parse_size(memory_budget), repeat=repeat))
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
    help="Model key in the store (default: its only model). Repeat to overlay several models "
    "in the cross-model figures (entropy-std, fit-kl-std); the first is plotted elsewhere.",
)  # fmt: skip
@click.option("--figure", "figures", multiple=True, help="Figure name (repeatable) or 'all'; see --list.")
@click.option("--step", type=int, default=None, help="Step of the one-step figures [default: last done].")
@click.option("--layer", type=int, default=None, help="Layer of the per-layer figures [default: 0].")
@click.option("--head", type=int, default=None, help="Head of the per-head figures [default: 0].")
@click.option("--matrix", default="W_QK", show_default=True, help="W_Q, W_K or W_QK.")
@click.option("--stat", default="std", show_default=True, help="Statistic of stat-steps and animation.")
@click.option(
    "--out", default="figures", show_default=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option("--dpi", default=150, show_default=True, help="Resolution of the PNG (and GIF).")
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
    out: Path,
    dpi: int,
    list_figures: bool,
    debug: bool,
) -> None:
    """Draw figures of a model in STORE into --out: PNG and PDF (and GIF for the animation).

    Files are named MODEL_FIGURE[_stepS][_layerL][_headH][_MATRIX][_STAT] after the options given.
    """
    from spinjax.analysis.plots import FIGURES

    if list_figures:
        width = max(map(len, FIGURES))
        for name, (_, description) in FIGURES.items():
            click.echo(f"{name.ljust(width)}  {description}")
        return
    if store_path is None:
        raise click.UsageError("missing argument STORE (or --list to name the figures)")
    if not figures:
        raise click.UsageError("give --figure NAME (repeatable, or 'all'); --list names them")
    with _errors(debug):
        from spinjax.analysis.plots import make_figure, save, select

        names = list(FIGURES) if "all" in figures else list(dict.fromkeys(figures))
        unknown = [n for n in names if n not in FIGURES]
        if unknown:
            raise InputError(f"no figure {', '.join(unknown)}; choose from {', '.join(FIGURES)}")
        sel = select(store_path, models[0] if models else None, step=step, layer=layer, head=head,
                     matrix=matrix, stat=stat, others=list(models))  # fmt: skip
        suffix = "".join(f"_{k}{v}" for k, v in (("step", step), ("layer", layer), ("head", head))
                         if v is not None)  # fmt: skip
        suffix += "".join(f"_{v}" for v, default in ((matrix, "W_QK"), (stat, "std")) if v != default)
        skipped = []
        for name in names:
            try:
                fig = make_figure(name, sel)
            except InputError as exc:
                if "all" not in figures:
                    raise
                skipped.append(f"{name}: {exc}")
                continue
            for path in save(fig, out / f"{sel.key}_{name}{suffix}", dpi=dpi):
                click.echo(str(path))
        for line in skipped:
            click.echo(f"skipped {line}", err=True)


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(path_type=Path))
@click.option("--model", default=None, help="Model key in the store (default: its only model).")
@click.option(
    "--out", default="report", show_default=True, type=click.Path(path_type=Path),
    help="Folder for index.html and its figures.",
)  # fmt: skip
@click.option("--embed", is_flag=True, help="Embed the figures in index.html (one file, data URIs).")
@click.option("--step", type=int, default=None, help="Step of the one-step figures [default: last done].")
@click.option("--layer", type=int, default=None, help="Layer of the per-layer figures [default: 0].")
@click.option("--head", type=int, default=None, help="Head of the per-head figures [default: 0].")
@click.option("--matrix", default="W_QK", show_default=True, help="W_Q, W_K or W_QK.")
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
    debug: bool,
) -> None:
    """One static HTML page (out/index.html) with every figure the store allows for MODEL."""
    with _errors(debug):
        from spinjax.analysis.report import build_report

        result = build_report(store_path, model, out, embed=embed, step=step, layer=layer,
                              head=head, matrix=matrix)  # fmt: skip
    click.echo(f"{result.path}: {len(result.figures)} figures")
    for name, why in result.skipped.items():
        click.echo(f"skipped {name}: {why}", err=True)


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

    cache_bytes = _parse_size(cache_size, "--cache-size")
    with _errors(debug), _progress(quiet) as progress:
        fetch = FetchOptions(download, connections, cache_bytes, keep_downloads=keep_downloads)
        res = compute_dynamics(model, store_path, top_k=top_k, gap_tol=gap_tol, fetch=fetch,
                               progress=progress, variant=variant)  # fmt: skip
    if not quiet:
        click.echo(
            f"{res.key}: {len(res.steps)} steps, k={res.top_k}, {len(res.pairs)} pair(s) of steps computed "
            f"({len(res.read)} checkpoints read), {len(res.reused)} reused; store {res.store}"
        )


@main.command()
@click.option("--d", "d_model", required=True, type=click.IntRange(min=1), help="d_model of the heads.")
@click.option("--d-head", "d_head", required=True, type=click.IntRange(min=1), help="d_head (<= d).")
@click.option("--sigma", default=1.0, show_default=True, type=float, help="Std of the factors' entries.")
@click.option("--samples", default=1000, show_default=True, type=click.IntRange(min=2), help="Random heads.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--store", "store_path", default=DEFAULT_STORE, show_default=True, type=click.Path(path_type=Path)
)
@click.option(
    "--memory-budget", default=None, help="Peak bytes for W_QK blocks [default: 1/4 of free memory]."
)
@click.option("--recompute", is_flag=True, help="Replace an ensemble of other sigma/samples/seed.")
@click.option("--quiet", is_flag=True, help="No summary line.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def baseline(
    d_model: int,
    d_head: int,
    sigma: float,
    samples: int,
    seed: int,
    store_path: Path,
    memory_budget: str | None,
    recompute: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Monte Carlo null of random heads W_QK = W_Q^T W_K, factors i.i.d. N(0, sigma^2): every
    statistic of every draw, into the store group baseline/<d>x<d_head>."""
    budget = _parse_size(memory_budget) if memory_budget else None
    with _errors(debug):
        from spinjax.run import run_baseline

        result = run_baseline(d_model, d_head, store_path=store_path, sigma=sigma, samples=samples,
                              seed=seed, recompute=recompute, memory_budget=budget)  # fmt: skip
    if not quiet:
        what = f"{result.samples} draws in {result.seconds:.1f} s" if result.computed else "already there"
        click.echo(f"{result.key}: {what}; store {result.store}")


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    lines = [header, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)) for r in lines)


if __name__ == "__main__":
    main()
