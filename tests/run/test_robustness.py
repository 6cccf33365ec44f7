"""Crashes, Ctrl-C, concurrent writers and hostile input (issue 6).

A killed or interrupted run leaves a store that opens; rerunning the same command computes
exactly the missing steps, and the result equals an uninterrupted run value for value. The
trajectory is a tiny orbax one with the gpt_neox fixture's shapes (kernels compile once per
session); child processes share the persistent JAX compilation cache set in conftest.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner
from conftest import FIXTURES_ROOT
from safetensors.numpy import load_file, save_file

from spinjax import store as store_mod
from spinjax.cli import main
from spinjax.errors import InputError
from spinjax.run import interrupt
from spinjax.run.options import RunOptions
from spinjax.run.pipeline import run
from spinjax.store.locking import LockFile

NEOX = FIXTURES_ROOT / "extraction" / "gpt_neox"  # also in conftest
KEY = "traj"
STEPS = [0, 1000, 2000, 3000]
D, HEADS, D_HEAD, LAYERS = 96, 6, 16, 2  # as the gpt_neox fixture
BUDGET = 1 << 30  # one --memory-budget everywhere: same W_QK blocking, same values
ARRAYS = ["step", "revision", "done", *store_mod.VARIABLES]


def write_trajectory(root: Path, steps: list[int]) -> None:
    """An orbax trajectory of random GPT-NeoX attention weights (fp16 fused qkv kernels only)."""
    rng = np.random.default_rng(0)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False, max_to_keep=None)
    with ocp.CheckpointManager(root, options=options) as manager:
        for step in steps:
            kernel = lambda: (rng.standard_normal((D, 3 * D)) * 0.02).astype(np.float16)  # noqa: E731
            layers = {str(i): {"attention": {"query_key_value": {"kernel": kernel()}}} for i in range(LAYERS)}
            manager.save(step, args=ocp.args.StandardSave({"gpt_neox": {"layers": layers}}))
    config = {"model_type": "gpt_neox", "hidden_size": D, "num_attention_heads": HEADS,
              "num_hidden_layers": LAYERS}  # fmt: skip
    (root / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def trajectory(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust") / KEY
    write_trajectory(root, STEPS)
    return root


@pytest.fixture(scope="session")
def reference(trajectory, tmp_path_factory) -> Path:
    """One uninterrupted run over every step (do not modify)."""
    path = tmp_path_factory.mktemp("reference") / "store.zarr"
    assert run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET)).computed == STEPS
    return path


@pytest.fixture(scope="session")
def child_env() -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}


def _args(trajectory: Path, path: Path, steps: str = "all") -> list[str]:
    return ["run", "--model", str(trajectory), "--steps", steps, "--store", str(path),
            "--memory-budget", str(BUDGET)]  # fmt: skip


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def by_step(path: Path, key: str = KEY) -> dict[int, dict[str, np.ndarray]]:
    """step -> every array's values at that step (whatever the order of steps in the store)."""
    g = zarr.open_group(str(path), mode="r", zarr_format=3)[key]
    values = {name: g[name][:] for name in ARRAYS}
    return {int(s): {name: values[name][i] for name in ARRAYS} for i, s in enumerate(values["step"])}


def assert_same_steps(path: Path, reference: Path, steps: list[int] = STEPS) -> None:
    got, want = by_step(path), by_step(reference)
    assert sorted(got) == sorted(want)
    for step in steps:
        for name in ARRAYS:
            np.testing.assert_array_equal(got[step][name], want[step][name], err_msg=f"{name} step {step}")


def done_steps(path: Path) -> list[int]:
    """What a reader sees: xarray through the consolidated metadata, finished steps only."""
    ds = xr.open_zarr(str(path), group=KEY)
    return sorted(int(s) for s in ds["step"].values[ds["done"].values])


def leftover_files(path: Path) -> list[str]:
    """Lock and claim files (and zarr's temporary files) left in the store."""
    meta = [p for p in (path / store_mod.META_DIR).rglob("*") if p.is_file()]
    return sorted(str(p) for p in meta + list(path.rglob("*.partial")))


# ---- SIGKILL at several points, rerun --------------------------------------------------

KILLED = r"""
import os, signal, sys
import zarr
from spinjax import store

point, at = sys.argv[1], int(sys.argv[2])


def die():
    os.kill(os.getpid(), signal.SIGKILL)


if point == "plan":  # inside ModelGroup.plan: some arrays appended to, others not yet
    resize, calls = zarr.Array.resize, []

    def resize_then_die(self, *args, **kwargs):
        calls.append(self.path)
        if len(calls) == 8:
            die()
        return resize(self, *args, **kwargs)

    zarr.Array.resize = resize_then_die
else:
    write_step, setitem = store.ModelGroup.write_step, zarr.Array.__setitem__

    def setitem_then_die(self, selection, value):
        if self.path.endswith("/kurt"):  # after mean, std, skew of the step were written
            die()
        return setitem(self, selection, value)

    def patched(self, index, results):
        step = self.steps[index]
        if step == at and point == "before":
            die()
        if step == at and point == "during":
            zarr.Array.__setitem__ = setitem_then_die
        write_step(self, index, results)
        if step == at and point == "after":  # done is set, the claim and the run record not
            die()

    store.ModelGroup.write_step = patched

from spinjax.cli import main

main(sys.argv[3:], prog_name="spinjax")
"""


@pytest.mark.parametrize(
    "point, finished",
    [("plan", []), ("before", [0]), ("during", [0]), ("after", [0, 1000])],
)
@pytest.mark.slow
def test_sigkill_then_rerun_completes_the_missing_steps_only(
    point, finished, trajectory, reference, child_env, tmp_path
):
    path = tmp_path / "s.zarr"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED, point, "1000", *_args(trajectory, path), "--quiet"],
        env=child_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    # the store opens (xarray, spinjax show) and holds exactly the steps finished before the kill
    assert done_steps(path) == finished
    shown = invoke("show", str(path), "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["models"][KEY]["steps"] == finished

    # rerunning breaks the dead process's lock and claims and computes only what is missing
    result = run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET))
    assert result.computed == [s for s in STEPS if s not in finished]
    assert result.skipped == finished
    assert by_step(path).keys() == set(STEPS)
    assert zarr.open_group(str(path), mode="r")[KEY]["step"][:].tolist() == STEPS  # order as requested
    assert_same_steps(path, reference)
    assert done_steps(path) == STEPS
    runs = zarr.open_group(str(path), mode="r")[KEY].attrs["runs"]
    killed_record = [] if point == "plan" else [False]  # killed before / after recording its run
    assert [r["finished"] is not None for r in runs] == [*killed_record, True]
    assert leftover_files(path) == []


# ---- Ctrl-C ------------------------------------------------------------------------------


@pytest.fixture
def default_sigint():
    """Python's own Ctrl-C handler for the test: a shell starts background jobs (``&``, nohup)
    with SIGINT ignored, and the process inherits that; put back what was there after."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _interrupt_while_writing(monkeypatch, step: int, times: int) -> None:
    """Deliver ``times`` SIGINTs to this process (as Ctrl-C does) while ``step`` is written."""
    write_step = store_mod.ModelGroup.write_step

    def interrupted(self, index, results):
        if self.steps[index] == step:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)  # the handler runs in this (main) thread between bytecodes
        write_step(self, index, results)

    monkeypatch.setattr(store_mod.ModelGroup, "write_step", interrupted)


def test_a_ctrl_c_remembered_before_the_command_line_is_not_forgotten():
    """`python -m spinjax` remembers Ctrl-C before it imports the command line, which opens a
    second block: a Ctrl-C swallowed in between (a GC callback) still stops the command."""
    with interrupt.remembered():
        handler = signal.getsignal(signal.SIGINT)
        interrupt._requested.set()  # what the handler does when its KeyboardInterrupt is swallowed
        with interrupt.remembered():
            assert interrupt.requested() and signal.getsignal(signal.SIGINT) is handler
        assert interrupt.requested() and signal.getsignal(signal.SIGINT) is handler
    assert not interrupt.requested()


@pytest.mark.slow
def test_ctrl_c_finishes_the_current_step_then_stops(
    trajectory, reference, tmp_path, monkeypatch, default_sigint
):
    path = tmp_path / "s.zarr"
    _interrupt_while_writing(monkeypatch, 1000, times=1)
    result = invoke(*_args(trajectory, path))
    assert result.exit_code == 130, result.output
    assert "interrupt: stopping after the current step" in result.stderr
    assert "interrupted: stopped after 2 computed step(s) (last: step 1000); 2 step(s) left" in result.stderr
    assert "Traceback" not in result.output
    assert done_steps(path) == [0, 1000]
    (record,) = zarr.open_group(str(path), mode="r")[KEY].attrs["runs"]
    assert record["interrupted"] is True and record["finished"] is not None
    assert leftover_files(path) == []

    monkeypatch.undo()
    again = run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET))
    assert again.computed == [2000, 3000] and again.skipped == [0, 1000]
    assert_same_steps(path, reference)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_leaving_the_step_undone(
    trajectory, reference, tmp_path, monkeypatch, default_sigint
):
    path = tmp_path / "s.zarr"
    _interrupt_while_writing(monkeypatch, 1000, times=2)
    result = invoke(*_args(trajectory, path))
    assert result.exit_code == 130
    assert "interrupted" in result.stderr and "Traceback" not in result.output
    assert done_steps(path) == [0]
    assert leftover_files(path) == []
    monkeypatch.undo()
    again = run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET))
    assert again.computed == STEPS[1:]
    assert_same_steps(path, reference)


STARTED = r"""
import signal, sys
from pathlib import Path
import spinjax.__main__ as entry  # what the console script imports: nothing heavy yet

signal.signal(signal.SIGINT, signal.default_int_handler)  # as a terminal starts it (not nohup)

Path(sys.argv[1]).write_text("started")
sys.argv = ["spinjax", *sys.argv[2:]]
entry.main()
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.4, 0.8, 1.5])
def test_ctrl_c_in_the_first_seconds_exits_130(delay, trajectory, child_env, tmp_path):
    # while the command line, JAX and the kernels start: the KeyboardInterrupt once landed in a
    # JAX garbage-collection callback, was printed and swallowed, and the run ended with exit 0
    path, started = tmp_path / "s.zarr", tmp_path / "started"
    command = [sys.executable, "-c", STARTED, str(started), *_args(trajectory, path)]
    child = subprocess.Popen(command, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:  # past Python's own start-up
        time.sleep(0.005)
    time.sleep(delay)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err and "Exception ignored" not in err
    if path.exists():  # whatever it wrote is a store that opens, with finished steps only
        assert set(done_steps(path)) <= set(STEPS)


# ---- concurrent writers ------------------------------------------------------------------

LOGGED = r"""
import os, sys, time
from spinjax import store
from spinjax.run import pipeline
from spinjax.run.options import RunOptions

log, pause = sys.argv[1], float(sys.argv[2])
write_step, statistics = store.ModelGroup.write_step, pipeline.layer_statistics


def logged(self, index, results):
    write_step(self, index, results)
    with open(log, "a") as f:
        f.write(f"{os.getpid()} {self.steps[index]}\n")


def slow(*args, **kwargs):  # long enough steps that the two processes overlap
    time.sleep(pause)
    return statistics(*args, **kwargs)


store.ModelGroup.write_step, pipeline.layer_statistics = logged, slow
from spinjax.cli import main

main(sys.argv[3:], prog_name="spinjax")
"""


@pytest.mark.slow
def test_two_concurrent_runs_compute_each_step_once(trajectory, reference, child_env, tmp_path):
    path, log = tmp_path / "s.zarr", tmp_path / "writes.log"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", LOGGED, str(log), "0.3", *_args(trajectory, path, steps)],
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for steps in ("0:2000", "1000:3000")  # overlapping: 1000 and 2000
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    for child, (_, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, err
    writes = [line.split() for line in log.read_text().splitlines()]
    assert Counter(int(step) for _, step in writes) == Counter(STEPS)  # each step written once
    assert len({pid for pid, _ in writes}) == 2
    summary = r"(\d+) step\(s\) computed.*; (\d+) already done"
    counts = [re.search(summary, out).groups() for out, _ in outputs]
    assert sum(int(c) for c, _ in counts) == 4  # the other process's steps count as already done
    assert all(int(c) + int(d) == 3 for c, d in counts)

    assert_same_steps(path, reference)
    assert done_steps(path) == STEPS
    runs = zarr.open_group(str(path), mode="r")[KEY].attrs["runs"]
    assert len(runs) == 2 and all(r["finished"] for r in runs)
    assert leftover_files(path) == []


@pytest.mark.slow
def test_two_distributed_processes_write_the_store_of_one(trajectory, reference, child_env, tmp_path):
    path, log = tmp_path / "s.zarr", tmp_path / "writes.log"
    with socket.socket() as s:  # a free port for the coordinator
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    distributed = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2"]
    children = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                LOGGED,
                str(log),
                "0",
                *_args(trajectory, path),
                *distributed,
                "--process-id",
                str(i),
            ],
            env=child_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in (0, 1)
    ]
    outputs = [child.communicate(timeout=300) for child in children]
    for i, (child, (out, err)) in enumerate(zip(children, outputs, strict=True)):
        assert child.returncode == 0, err
        assert re.search(rf"^{KEY}: 2 step\(s\) computed.*; process {i} of 2$", out, re.M), out
    writes = [line.split() for line in log.read_text().splitlines()]
    by_process = {i: sorted(int(s) for pid, s in writes if int(pid) == c.pid) for i, c in enumerate(children)}
    assert by_process == {0: [0, 2000], 1: [1000, 3000]}  # step i of the list on process i % 2

    assert zarr.open_group(str(path), mode="r")[KEY]["step"][:].tolist() == STEPS
    assert_same_steps(path, reference)
    assert done_steps(path) == STEPS
    (record,) = zarr.open_group(str(path), mode="r")[KEY].attrs["runs"]  # process 0's, for all
    assert record["steps"] == STEPS and record["finished"]
    assert leftover_files(path) == []


def test_distributed_options_go_together(tmp_path):
    result = invoke("run", "--model", str(NEOX), "--store", str(tmp_path / "s.zarr"), "--process-id", "1")
    assert result.exit_code == 2 and "go together" in result.stderr
    args = ["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"]
    result = invoke("run", "--model", str(NEOX), "--store", str(tmp_path / "s.zarr"), *args)
    assert result.exit_code == 2 and "not below --num-processes 2" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


# ---- locks -------------------------------------------------------------------------------


def test_lock_file_is_exclusive_and_stale_locks_are_broken(tmp_path):
    path = tmp_path / "lock"
    a, b = LockFile(path, timeout=0.2), LockFile(path, timeout=0.2)
    assert a.try_acquire() and not b.try_acquire()
    with pytest.raises(InputError, match=f"pid {os.getpid()}.*delete this file"):
        b.acquire()
    a.release()
    assert not path.exists() and b.try_acquire()
    b.release()

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout)}))
    assert a.try_acquire()  # its owner on this host has exited
    a.release()

    path.write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    assert not a.try_acquire()  # another host's lock, recently refreshed: alive
    old = time.time() - 2 * a.stale_after
    os.utime(path, (old, old))
    assert a.try_acquire()  # not refreshed for longer than stale_after: its owner died
    a.release()


def test_a_lock_left_by_a_killed_run_is_removed_by_the_next_run_with_nothing_to_do(
    trajectory, reference, tmp_path
):
    # a run SIGKILLed while it held the store's lock for its final commit: every step is done
    path = tmp_path / "s.zarr"
    shutil.copytree(reference, path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    owner = {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "dead"}
    (path / store_mod.META_DIR / "lock").write_text(json.dumps(owner))
    claim = store_mod.claim_path(path, KEY, 3000)
    claim.parent.mkdir(parents=True, exist_ok=True)
    claim.write_text(json.dumps(owner))
    again = run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET))
    assert again.computed == [] and again.skipped == STEPS
    assert leftover_files(path) == []


@pytest.mark.slow
def test_a_second_model_goes_into_an_existing_store(reference, tmp_path):
    path = tmp_path / "two.zarr"
    shutil.copytree(reference, path)
    assert run(str(NEOX), RunOptions(steps="all", store=path, memory_budget=BUDGET)).computed == [-1]
    assert sorted(zarr.open_group(str(path), mode="r").group_keys()) == ["gpt_neox", KEY]
    assert_same_steps(path, reference)
    assert xr.open_zarr(str(path), group="gpt_neox")["done"].values.tolist() == [True]


# ---- hostile input -----------------------------------------------------------------------

QKV1 = "gpt_neox.layers.1.attention.query_key_value.weight"


@pytest.mark.slow
def test_nonfinite_weights_are_counted_excluded_and_warned_about(tmp_path, neox_store):
    model = tmp_path / "poisoned"
    shutil.copytree(NEOX, model)
    tensors = load_file(str(model / "model.safetensors"))
    qkv = tensors[QKV1].copy()  # rows per head: (q, k, v) x d_head, interleaved
    head = 2
    qkv[head * 3 * D_HEAD + 0, 5] = np.nan  # W_Q of head 2, row 0, column 5
    qkv[head * 3 * D_HEAD + D_HEAD + 3, 7] = np.inf  # W_K of head 2, row 3, column 7
    tensors[QKV1] = qkv
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    path = tmp_path / "s.zarr"

    result = invoke("run", "--model", str(model), "--store", str(path), "--quiet")
    assert result.exit_code == 0, result.output
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("warning: ") and QKV1 in warning
    assert "step -1 layer 1" in warning and "heads [2]" in warning and "n_nonfinite" in warning

    g = zarr.open_group(str(path), mode="r")["poisoned"]
    counts = g["n_nonfinite"][0]  # (layer, head, matrix)
    assert counts[1, head].tolist() == [1, 1, 2 * D - 1]  # W_QK: row 5 and column 7 spoilt
    counts[1, head] = 0
    assert not counts.any()
    per_head = qkv.astype(np.float64).reshape(HEADS, 3, D_HEAD, D)
    wq, wk = per_head[head, 0], per_head[head, 1]
    zeroed = [np.where(np.isfinite(w), w, 0.0) for w in (wq, wk)]
    finite_qk = np.delete(np.delete(zeroed[0].T @ zeroed[1], 5, axis=0), 7, axis=1)  # spoilt row, column
    for m, finite in enumerate((wq[np.isfinite(wq)], wk[np.isfinite(wk)], finite_qk.ravel())):
        assert g["mean"][0, 1, head, m] == pytest.approx(finite.mean(), rel=1e-4, abs=1e-7)
        assert g["std"][0, 1, head, m] == pytest.approx(finite.std(), rel=1e-4)
        assert np.isfinite(g["kl_gauss"][0, 1, head, m]) and np.isfinite(g["max"][0, 1, head, m])
    clean = zarr.open_group(str(neox_store), mode="r")["gpt_neox"]
    for name in ("std", "singular_values", "zhist"):  # other heads and layers are untouched
        np.testing.assert_array_equal(g[name][0, 0], clean[name][0, 0], err_msg=name)
        np.testing.assert_array_equal(g[name][0, 1, :head], clean[name][0, 1, :head], err_msg=name)


def _rewrite_header(path: Path, change) -> None:
    """Rewrite a safetensors file with its JSON header changed by ``change(header) -> prefix``."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]
    prefix = change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", prefix if prefix is not None else len(text)) + text + data)


def _shape_lies(header):
    header[QKV1]["shape"] = [288, 192]  # twice the bytes its offsets hold


def _offsets_lie(header):
    begin, end = header[QKV1]["data_offsets"]
    header[QKV1]["data_offsets"] = [begin, end + 10**6]  # past the end of the file


def _length_lies(header):
    return 10**9  # header length larger than the file


def _length_too_short(header):
    return 40  # the header's JSON cut in the middle


@pytest.mark.parametrize("lie", [_shape_lies, _offsets_lie, _length_lies, _length_too_short])
def test_safetensors_header_lying_about_sizes_exits_2(lie, store_copy, snapshot, tmp_path):
    model = tmp_path / "lying"
    shutil.copytree(NEOX, model)
    _rewrite_header(model / "model.safetensors", lie)
    before = snapshot(store_copy)
    result = invoke("run", "--model", str(model), "--store", str(store_copy))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and str(model / "model.safetensors") in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(store_copy) == before


def _failing_writes(monkeypatch, fails, code: int) -> list[str]:
    """Make zarr's local store raise OSError(code) on writing the keys ``fails(key)`` selects."""
    real = zarr.storage.LocalStore.set
    refused = []

    async def set_or_fail(self, key, value, *args, **kwargs):
        if fails(key):
            refused.append(key)
            raise OSError(code, os.strerror(code))
        return await real(self, key, value, *args, **kwargs)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", set_or_fail)
    return refused


@pytest.mark.slow
def test_full_disk_while_writing_a_step_exits_2_keeping_finished_steps(
    trajectory, reference, tmp_path, monkeypatch
):
    path = tmp_path / "s.zarr"
    refused = _failing_writes(monkeypatch, lambda key: key.startswith(f"{KEY}/kurt/c/2/"), errno.ENOSPC)
    result = invoke(*_args(trajectory, path))
    assert refused, "the simulated full disk was never hit"
    assert result.exit_code == 2, result.output
    message = r"^error: .*s\.zarr: cannot write the store \(.*No space left on device\)"
    assert re.search(message, result.stderr)
    assert "finished steps are kept" in result.stderr and "Traceback" not in result.output
    assert done_steps(path) == [0, 1000]
    assert_same_steps(path, reference, steps=[0, 1000])
    assert leftover_files(path) == []

    monkeypatch.undo()
    again = run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET))
    assert again.computed == [2000, 3000]
    assert_same_steps(path, reference)


def test_unwritable_store_exits_2_and_leaves_no_trace(tmp_path, monkeypatch, store_copy, snapshot):
    # tests may run as root, where chmod does not stop writes: refuse them in zarr's store
    _failing_writes(monkeypatch, lambda key: True, errno.EACCES)
    fresh = tmp_path / "new" / "s.zarr"
    result = invoke("run", "--model", str(NEOX), "--store", str(fresh))
    assert result.exit_code == 2, result.output
    assert "cannot write the store" in result.stderr and "Permission denied" in result.stderr
    assert not (tmp_path / "new").exists()

    before = snapshot(store_copy)
    result = invoke("run", "--model", str(NEOX), "--store", str(store_copy), "--recompute")
    assert result.exit_code == 2 and "Permission denied" in result.stderr
    assert snapshot(store_copy) == before


# ---- a writer frozen past the lock's stale time ------------------------------------------

FROZEN = r"""
import sys, time
from pathlib import Path
from spinjax.store import group

marker, where = Path(sys.argv[1]), sys.argv[2]
owner = group if where == "commit_group" else group.ModelGroup
original = getattr(owner, where)


def pausing(*args, **kwargs):  # holding the store's lock: the test stops this process here
    marker.write_text("in")
    time.sleep(1.0)
    return original(*args, **kwargs)


setattr(owner, where, pausing)
from spinjax.cli import main

main(sys.argv[3:], prog_name="spinjax")
"""
STALE_S = 2.0


def _frozen_while_another_runs(child_env, tmp_path, where: str, frozen_args: list[str], other_args):
    """Start ``frozen_args`` in a child that pauses in ``where`` holding the store's lock, stop it
    (SIGSTOP) there past the lock's stale time while ``other_args`` runs to its end, then let it
    go on (SIGCONT). Returns (frozen child's returncode, stderr; the other's returncode, stderr)."""
    env = {**child_env, "SPINJAX_LOCK_STALE_AFTER": str(STALE_S)}
    marker = tmp_path / f"marker-{where}"
    frozen = subprocess.Popen([sys.executable, "-c", FROZEN, str(marker), where, *frozen_args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert frozen.poll() is None and time.monotonic() < deadline, frozen.communicate()
            time.sleep(0.02)
        os.kill(frozen.pid, signal.SIGSTOP)
        other = subprocess.run([sys.executable, "-m", "spinjax.cli", *other_args], env=env,
                               capture_output=True, text=True, timeout=300)  # fmt: skip
    finally:
        if frozen.poll() is None:
            os.kill(frozen.pid, signal.SIGCONT)
    _, err = frozen.communicate(timeout=300)
    return frozen.returncode, err, other.returncode, other.stderr


@pytest.mark.slow
def test_a_frozen_writer_that_lost_the_lock_stops_and_a_rerun_completes(
    trajectory, reference, child_env, tmp_path
):
    path = tmp_path / "s.zarr"
    run(str(trajectory), RunOptions(steps="0", store=path, memory_budget=BUDGET))
    # the frozen run is appending steps 1000..3000 when it stops; the other one takes the lock
    code, err, other_code, other_err = _frozen_while_another_runs(
        child_env, tmp_path, "plan", _args(trajectory, path, "1000:3000"), _args(trajectory, path, "3000")
    )
    assert other_code == 0, other_err
    assert code == 2, err
    assert "lost the lock" in err and "rerun the same command" in err and "Traceback" not in err
    again = run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET))
    assert sorted(again.computed) == [1000, 2000] and sorted(again.skipped) == [0, 3000]
    assert_same_steps(path, reference)
    runs = zarr.open_group(str(path), mode="r")[KEY].attrs["runs"]
    assert all(r["finished"] for r in runs)  # the run that lost the lock never recorded one
    assert leftover_files(path) == []


@pytest.mark.slow
def test_a_frozen_writer_building_a_group_never_breaks_another_models_run(
    trajectory, reference, child_env, tmp_path
):
    path = tmp_path / "s.zarr"
    other_model = tmp_path / "traj2"
    shutil.copytree(trajectory, other_model)
    run(str(other_model), RunOptions(steps="0", store=path, memory_budget=BUDGET))
    code, err, other_code, other_err = _frozen_while_another_runs(
        child_env, tmp_path, "commit_group", _args(trajectory, path), _args(other_model, path)
    )
    assert other_code == 0, other_err
    assert code == 2 and "lost the lock" in err and "Traceback" not in err, err
    assert xr.open_zarr(str(path), group="traj2")["done"].values.all()
    assert run(str(trajectory), RunOptions(steps="all", store=path, memory_budget=BUDGET)).computed == STEPS
    assert_same_steps(path, reference)
    assert leftover_files(path) == []
