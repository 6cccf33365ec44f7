"""The command line (SPEC section 2): commands, exit codes, messages, and a store left intact."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import hostile
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from safetensors.numpy import load_file, save_file

from spinjax.cli import main
from spinjax.sources.known import PYTHIA_STEPS

KEY = "gpt_neox"
NEOX = Path(__file__).parent / "fixtures" / "extraction" / KEY  # also in conftest
TORCHBIN = Path(__file__).parent / "fixtures" / "torchbin"
SENTINEL = Path("/tmp/spinjax_pwned_sentinel")  # what the malicious pickle would create


def _spinjax_command() -> list[str]:
    """The installed console script (next to this interpreter, or on PATH), else ``-m``."""
    beside = Path(sys.executable).parent / "spinjax"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("spinjax")
    if found:
        return [found]
    try:
        import spinjax.cli  # noqa: F401
    except ImportError:
        pytest.skip("neither a spinjax console script nor an importable spinjax.cli")
    return [sys.executable, "-m", "spinjax.cli"]


def _subprocess(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        [*_spinjax_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


# ---- the installed script, in a pipe ----------------------------------------------------


@pytest.mark.slow
def test_console_script_run_then_show(tmp_path):
    store = tmp_path / "cli.zarr"
    done = _subprocess("run", "--model", str(NEOX), "--store", str(store), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # no progress bar (nor anything else) in a pipe
    assert re.search(rf"^{KEY}: 1 step\(s\) computed\b.*\b0 already done", done.stdout, re.M)
    root = zarr.open_group(str(store), mode="r", zarr_format=3)
    assert root.attrs["spinjax"]["schema"] == 1
    assert root[KEY]["done"][:].tolist() == [True]

    shown = _subprocess("show", str(store), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr == ""
    assert f"[{KEY}] gpt_neox" in shown.stdout
    assert "steps done 1 / requested 1" in shown.stdout
    assert "d_model=96 layers=2 heads=6 kv_heads=6 d_head=16" in shown.stdout
    assert "schema 1" in shown.stdout


@pytest.mark.slow
def test_console_script_bad_input_exits_2_without_traceback(tmp_path):
    done = _subprocess("steps", "pythya-70m", cwd=tmp_path)
    assert done.returncode == 2
    assert "pythia-70m" in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


# ---- run, show, models, steps in process -------------------------------------------------


@pytest.mark.slow
def test_run_prints_a_summary_and_quiet_prints_nothing(tmp_path):
    store = tmp_path / "s.zarr"
    result = invoke("run", "--model", str(NEOX), "--store", str(store), "--quiet")
    assert result.exit_code == 0
    assert result.stdout == "" and result.stderr == ""
    assert zarr.open_group(str(store), mode="r")[KEY]["done"][:].tolist() == [True]

    again = invoke("run", "--model", str(NEOX), "--store", str(store))
    assert again.exit_code == 0
    assert re.search(rf"^{KEY}: 0 step\(s\) computed\b.*\b1 already done\b.*{store}$", again.stdout, re.M)
    assert again.stderr == ""


def test_run_recompute_and_memory_budget(store_copy, neox_store):
    result = invoke(
        "run", "--model", str(NEOX), "--store", str(store_copy), "--recompute", "--memory-budget", "1MiB"
    )
    assert result.exit_code == 0, result.output
    assert re.search(r"1 step\(s\) computed\b.*\b0 already done", result.stdout)
    a = zarr.open_group(str(store_copy), mode="r")[KEY]
    b = zarr.open_group(str(neox_store), mode="r")[KEY]
    assert a["done"][:].tolist() == [True]
    for name in ("mean", "std", "singular_values", "kl_gauss", "entropy"):  # other W_QK blocking
        np.testing.assert_allclose(a[name][:], b[name][:], rtol=1e-5, atol=1e-6, err_msg=name)
    for name in ("zhist", "hist"):  # only entries within float32 rounding of an edge may move
        assert np.array_equal(a[name][:].sum(-1), b[name][:].sum(-1))
        assert np.abs(a[name][:].astype(int) - b[name][:].astype(int)).sum() <= 4
    assert len(a.attrs["runs"]) == 2


def test_default_memory_budget_is_a_quarter_of_host_or_accelerator_memory(monkeypatch):
    import jax

    from spinjax.run.options import default_memory_budget

    host = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    cpu = default_memory_budget()
    assert abs(cpu - max(256 << 20, host // 4)) <= (64 << 20)  # host memory moves a little

    class Accelerator:  # what a GPU's device reports: its limit and what is in use
        def memory_stats(self):
            return {"bytes_limit": 12 << 30, "bytes_in_use": 8 << 30}

    monkeypatch.setattr(jax, "devices", lambda *a: [Accelerator()])
    assert cpu > 1 << 30  # the host has more than 4 GiB free (CI: 24 GiB machines)
    assert default_memory_budget() == 1 << 30  # a quarter of the 4 GiB free on the device


def test_bad_memory_budget_is_usage_error(tmp_path):
    result = invoke(
        "run", "--model", str(NEOX), "--store", str(tmp_path / "s.zarr"), "--memory-budget", "lots"
    )
    assert result.exit_code == 2
    assert "lots" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize(
    "option, value", [("--download", "some"), ("--cache-size", "lots"), ("--connections", "0")]
)
def test_bad_hub_option_is_usage_error(tmp_path, option, value):
    result = invoke("run", "--model", str(NEOX), "--store", str(tmp_path / "s.zarr"), option, value)
    assert result.exit_code == 2
    assert value in result.stderr and option in result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_show(neox_store):
    result = invoke("show", str(neox_store))
    assert result.exit_code == 0
    assert f"[{KEY}] gpt_neox from {NEOX.resolve()} (dtype float16)" in result.stdout
    assert "steps done 1 / requested 1: [-1]" in result.stdout
    info = json.loads(invoke("show", str(neox_store), "--json").stdout)
    assert info["schema"] == 1
    m = info["models"][KEY]
    assert (m["steps_done"], m["steps_requested"], m["steps"]) == (1, 1, [-1])
    assert m["d_model"] == 96 and m["n_heads"] == 6 and m["dtype"] == "float16"


def test_show_of_no_store_exits_2(tmp_path):
    result = invoke("show", str(tmp_path / "missing.zarr"))
    assert result.exit_code == 2
    assert "missing.zarr" in result.stderr and "not a Zarr store" in result.stderr
    assert "Traceback" not in result.output


def test_models_table_and_json():
    result = invoke("models")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    header = lines[0].split()
    rows = {line.split()[0]: dict(zip(header, line.split(), strict=False)) for line in lines[2:]}
    row = rows["pythia-12b"]
    assert (row["d_model"], row["n_heads"], row["n_kv_heads"], row["d_head"], row["steps"]) == (
        "5120", "40", "40", "128", "154"
    )  # fmt: skip
    assert "pythia-70m-deduped" in rows and "gpt2" in rows

    data = json.loads(invoke("models", "--json").stdout)
    by_name = {m["name"]: m for m in data}
    p = by_name["pythia-12b"]
    assert (p["d_model"], p["n_heads"], p["n_kv_heads"], p["d_head"], p["n_layers"], p["steps"]) == (
        5120, 40, 40, 128, 36, 154
    )  # fmt: skip
    assert p["repo"] == "EleutherAI/pythia-12b"
    assert by_name["pythia-70m"]["d_model"] == 512 and by_name["pythia-70m"]["n_heads"] == 8
    assert by_name["llama-3.1-8b"]["n_kv_heads"] == 8
    tiny = by_name["tiny-pythia"]  # the embedded model is an ordinary entry, with its steps
    assert (tiny["d_model"], tiny["n_heads"], tiny["n_layers"], tiny["steps"]) == (64, 4, 4, 14)
    assert rows["tiny-pythia"]["steps"] == "14"


@pytest.mark.slow
def test_null_added_to_finished_steps_says_what_it_added_and_show_lists_the_null(store_copy):
    result = invoke("run", "--model", str(NEOX), "--store", str(store_copy), "--null", "--null-samples", "8")
    assert result.exit_code == 0, result.output
    assert "0 step(s) computed" in result.stdout and "1 already done" in result.stdout
    assert "24 variable(s) added to them" in result.stdout  # 23 scalars and singular values, as z
    assert "--null: computing the null baseline/96x16" in result.stderr
    assert "warning" not in result.stderr  # information, not a problem
    shown = invoke("show", str(store_copy))
    assert "[baseline/96x16] random-matrix null: d=96 d_head=16 sigma=1.0 samples=8 seed=0" in shown.stdout
    info = json.loads(invoke("show", str(store_copy), "--json").stdout)
    assert list(info["baselines"]) == ["baseline/96x16"] and "kurt_z" in info["models"][KEY]["variables"]


def test_steps_of_pythia():
    result = invoke("steps", "pythia-70m")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert len(lines) == 154
    assert lines[0] == "0\tstep0" and lines[1] == "1\tstep1" and lines[11] == "1000\tstep1000"
    assert [int(line.split("\t")[0]) for line in lines] == list(PYTHIA_STEPS)
    assert lines[-1].startswith("143000\t")


def test_steps_of_a_local_checkpoint():
    result = invoke("steps", str(NEOX))
    assert result.exit_code == 0
    assert result.stdout.splitlines() == [f"-1\t{NEOX.resolve()}"]


def test_version_and_help():
    assert invoke("--version").exit_code == 0
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("run", "models", "steps", "show"):
        assert command in result.stdout


# ---- bad input: exit 2, message names the culprit, store untouched -----------------------


def _write_without(directory: Path, tensor: str) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[tensor]
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.fixture
def broken(tmp_path) -> dict[str, tuple[list[str], list[str]]]:
    """case -> (run arguments, texts the message must contain)."""
    missing = tmp_path / "missing_tensor"
    shutil.copytree(NEOX, missing)
    tensor = "gpt_neox.layers.1.attention.query_key_value.weight"
    _write_without(missing, tensor)

    truncated = tmp_path / "truncated"
    shutil.copytree(NEOX, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    mamba = tmp_path / "mamba"
    shutil.copytree(NEOX, mamba)
    config = json.loads((mamba / "config.json").read_text())
    config["model_type"] = "mamba"
    (mamba / "config.json").write_text(json.dumps(config))

    no_config = tmp_path / "no_config"
    shutil.copytree(NEOX, no_config)
    (no_config / "config.json").unlink()

    inconsistent = tmp_path / "inconsistent"
    shutil.copytree(NEOX, inconsistent)
    config = json.loads((inconsistent / "config.json").read_text())
    config["hidden_size"] = 192  # divisible by its 6 heads: consistent, but not with the tensors
    (inconsistent / "config.json").write_text(json.dumps(config))

    corrupted = tmp_path / "corrupted"
    shutil.copytree(NEOX, corrupted)
    blob = bytearray((corrupted / "model.safetensors").read_bytes())
    blob[8:40] = b"\xff" * 32  # garbage inside the JSON header
    (corrupted / "model.safetensors").write_bytes(bytes(blob))

    malicious = tmp_path / "malicious"
    malicious.mkdir()
    shutil.copy(NEOX / "config.json", malicious / "config.json")
    shutil.copy(TORCHBIN / "malicious_os_system.bin", malicious / "pytorch_model.bin")

    named = {}  # model directories whose names collide with the store's own
    for name in (".spinjax", "zarr.json", "baseline", "__zarr"):
        named[name] = tmp_path / "names" / name
        shutil.copytree(NEOX, named[name])

    return {
        **{f"reserved name {n}": (["--model", str(path)], [repr(n), "rename"]) for n, path in named.items()},
        "config missing": (["--model", str(no_config)], [str(no_config), "config.json"]),
        "config inconsistent": (
            ["--model", str(inconsistent)],
            ["gpt_neox.layers.0.attention.query_key_value.weight", "config.json"],
        ),
        "corrupted safetensors": (["--model", str(corrupted)], [str(corrupted / "model.safetensors")]),
        "malicious pickle": (["--model", str(malicious)], [str(malicious / "pytorch_model.bin"), "system"]),
        "unknown name": (["--model", "pythya-70m"], ["pythya-70m", "pythia-70m"]),
        "missing tensor": (["--model", str(missing)], [tensor, str(missing)]),
        "truncated file": (["--model", str(truncated)], [str(weights)]),
        "unknown architecture": (
            ["--model", str(mamba)],
            ["mamba", "gpt2", "gpt_neox", "llama", "mistral", "qwen2", "bert"],
        ),
        "step not offered": (["--model", str(NEOX), "--steps", "5"], ["5", "nearest: -1"]),
        "range selecting nothing": (["--model", str(NEOX), "--steps", "0:100"], ["0:100"]),
        "garbage steps": (["--model", str(NEOX), "--steps", "last,x"], ["'x'"]),
    }


CASES = [
    "reserved name .spinjax",
    "reserved name zarr.json",
    "reserved name baseline",
    "reserved name __zarr",
    "config missing",
    "config inconsistent",
    "corrupted safetensors",
    "malicious pickle",
    "unknown name",
    "missing tensor",
    "truncated file",
    "unknown architecture",
    "step not offered",
    "range selecting nothing",
    "garbage steps",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_exits_2_and_leaves_store_as_it_was(case, broken, store_copy, snapshot, tmp_path):
    args, texts = broken[case]
    before = snapshot(store_copy)
    SENTINEL.unlink(missing_ok=True)
    result = invoke("run", *args, "--store", str(store_copy))
    assert not SENTINEL.exists()  # nothing in a malicious pickle ran
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert "Traceback" not in result.output
    for text in texts:
        assert text in result.stderr, (text, result.stderr)
    assert snapshot(store_copy) == before

    fresh = tmp_path / "fresh.zarr"  # a store that does not exist yet is not created
    assert invoke("run", *args, "--store", str(fresh)).exit_code == 2
    assert not fresh.exists()


def test_bad_input_with_debug_shows_traceback(broken, tmp_path):
    args, _ = broken["missing tensor"]
    result = invoke("run", *args, "--store", str(tmp_path / "s.zarr"), "--debug")
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "InputError" in result.stderr


@pytest.mark.parametrize("relative", [False, True])
def test_nonexistent_path_exits_2(relative, store_copy, snapshot, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = "./no/such/checkpoint" if relative else str(tmp_path / "no" / "such" / "checkpoint")
    before = snapshot(store_copy)
    result = invoke("run", "--model", path, "--store", str(store_copy))
    assert snapshot(store_copy) == before
    assert "Traceback" not in result.output
    assert result.exit_code == 2, result.output
    assert path in result.stderr


def test_store_of_another_schema_exits_2(store_copy, snapshot):
    root = zarr.open_group(str(store_copy), mode="r+", zarr_format=3)
    root.attrs["spinjax"] = {"version": "9.9.9", "schema": 2}
    before = snapshot(store_copy)
    result = invoke("run", "--model", str(NEOX), "--store", str(store_copy))
    assert result.exit_code == 2
    assert "schema 2" in result.stderr and str(store_copy) in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(store_copy) == before
    shown = invoke("show", str(store_copy))
    assert shown.exit_code == 2 and "schema 2" in shown.stderr


def test_store_that_is_not_a_store_exits_2(tmp_path, snapshot):
    path = tmp_path / "notes"
    path.mkdir()
    (path / "a.txt").write_text("keep")
    result = invoke("run", "--model", str(NEOX), "--store", str(path))
    assert result.exit_code == 2
    assert str(path) in result.stderr and "Traceback" not in result.output
    assert snapshot(path) == {"a.txt": b"keep"}


# ---- internal failure: exit 1 ------------------------------------------------------------


@pytest.mark.slow
def test_internal_failure_exits_1(monkeypatch, store_copy, snapshot):
    import spinjax.run.pipeline

    def boom(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(spinjax.run.pipeline, "layer_statistics", boom)
    before = snapshot(store_copy)
    args = ["run", "--model", str(NEOX), "--store", str(store_copy), "--recompute"]
    result = invoke(*args)
    assert result.exit_code == 1
    assert "internal error: RuntimeError: kernel exploded" in result.stderr
    assert "--debug" in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(store_copy) == before

    debug = invoke(*args, "--debug")
    assert debug.exit_code == 1
    assert "Traceback" in debug.stderr and "kernel exploded" in debug.stderr
    assert snapshot(store_copy) == before


# ---- destinations that cannot be written -------------------------------------------------


@pytest.mark.parametrize("command", ["plot", "report", "baseline", "run"])
def test_a_destination_that_cannot_be_written_exits_2_naming_it(command, neox_store, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    where = blocker / "out"  # below a regular file: no user, root included, can write there
    args = {
        "plot": ["plot", str(neox_store), "--figure", "hist", "--out", str(where)],
        "report": ["report", str(neox_store), "--out", str(where)],
        "baseline": ["baseline", "--d", "16", "--d-head", "4", "--samples", "4", "--store", str(where)],
        "run": ["run", "--model", str(NEOX), "--store", str(where)],
    }[command]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert str(where) in result.stderr and "cannot write" in result.stderr
    assert "Traceback" not in result.output and "finished steps are kept" not in result.stderr
    assert blocker.read_text() == "not a folder"


# ---- hostile checkpoints (issue 20): exit 2 naming file/key/tensor, store byte-identical ----------

GPT2 = NEOX.parent / "gpt2"
QKV0 = "gpt_neox.layers.0.attention.query_key_value.weight"


def _with_config(tmp_path: Path, base: Path, **changes) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(base, directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))
    return directory


def _with_weights(tmp_path: Path, name: str, tensors: dict) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(NEOX / "config.json", directory)
    if name.endswith(".bin"):
        hostile.torch_bin(directory / name, tensors)
    else:
        save_file(tensors, str(directory / name))
    return directory


def _indexed(tmp_path: Path, value) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(NEOX, directory)
    weight_map = {name: "model.safetensors" for name in load_file(str(NEOX / "model.safetensors"))}
    weight_map[QKV0] = value
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return directory


def _nested_config(tmp_path: Path) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(NEOX, directory)
    (directory / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return directory


def _bin_archive(tmp_path: Path, data_pkl: bytes, extra=()) -> Path:
    directory = tmp_path / "model"
    directory.mkdir()
    shutil.copy(NEOX / "config.json", directory)
    hostile.torch_zip(directory / "pytorch_model.bin", data_pkl, {}, extra=list(extra))
    return directory


def _neox_tensors(**changes) -> dict:
    return {**load_file(str(NEOX / "model.safetensors")), **changes}


HOSTILE_CHECKPOINTS = {  # case -> (make the checkpoint directory in tmp_path, texts of the message)
    "n_head true": (lambda t: _with_config(t, GPT2, n_head=True), ["config.json", "n_head", "True"]),
    "n_embd 64.9": (lambda t: _with_config(t, GPT2, n_embd=64.9), ["config.json", "n_embd", "64.9"]),
    "n_layer -1": (lambda t: _with_config(t, GPT2, n_layer=-1), ["config.json", "n_layer", "-1"]),
    "n_embd Infinity": (lambda t: _with_config(t, GPT2, n_embd=float("inf")), ["config.json", "n_embd"]),
    "model_type list": (
        lambda t: _with_config(t, NEOX, model_type=["gpt_neox"]),
        ["config.json", "model_type"],
    ),
    "kv heads without GQA": (
        lambda t: _with_config(t, NEOX, num_key_value_heads=2),
        ["config.json", "num_key_value_heads"],
    ),
    "config nested 100,000 deep": (_nested_config, ["config.json", "nested too deeply"]),
    "int64 Q/K": (
        lambda t: _with_weights(
            t, "model.safetensors", _neox_tensors(**{QKV0: np.ones((288, 96), np.int64)})
        ),
        [QKV0, "int64"],
    ),
    "complex .bin": (
        lambda t: _with_weights(
            t, "pytorch_model.bin", _neox_tensors(**{QKV0: np.ones((288, 96), np.complex64)})
        ),
        [QKV0, "complex64"],
    ),
    "weight_map int": (lambda t: _indexed(t, 5), ["model.safetensors.index.json", QKV0, "5"]),
    "weight_map null": (lambda t: _indexed(t, None), ["model.safetensors.index.json", QKV0, "None"]),
    "weight_map list": (lambda t: _indexed(t, ["a"]), ["model.safetensors.index.json", QKV0, "['a']"]),
    "weight_map outside": (lambda t: _indexed(t, "../x"), ["model.safetensors.index.json", "'../x'"]),
    "two data.pkl": (
        lambda t: _bin_archive(t, hostile.state_dict_pickle({}), [hostile.Member("b/data.pkl", b"")]),
        ["pytorch_model.bin", "2 '<archive>/data.pkl' members"],
    ),
    "state dict 5,000 deep": (
        lambda t: _bin_archive(t, hostile.nested_pickle(5000)),
        ["pytorch_model.bin", "nests dicts"],
    ),
}


@pytest.mark.parametrize("case", list(HOSTILE_CHECKPOINTS))
def test_hostile_checkpoint_exits_2_and_leaves_store_as_it_was(case, store_copy, snapshot, tmp_path):
    make, texts = HOSTILE_CHECKPOINTS[case]
    model = make(tmp_path)
    before = snapshot(store_copy)
    for store in (store_copy, tmp_path / "fresh.zarr"):
        result = invoke("run", "--model", str(model), "--store", str(store))
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert "Traceback" not in result.output
        for text in texts:
            assert text in result.stderr, (text, result.stderr)
    assert snapshot(store_copy) == before
    assert not (tmp_path / "fresh.zarr").exists()


# ---- --model values that are not checkpoints, and relative paths ------------------------------


def _fifo(tmp_path: Path) -> str:
    os.mkfifo(tmp_path / "fifo")
    return str(tmp_path / "fifo")


NOT_A_MODEL = {  # case -> (--model value from tmp_path, texts of the message)
    "/dev/null": (lambda t: "/dev/null", ["/dev/null: a character device"]),
    "a FIFO": (_fifo, ["fifo: a FIFO"]),
    "~ of no such user": (lambda t: "~nonexistentuser/x", ["'~nonexistentuser/x'", "no such user"]),
    "5,000 characters": (lambda t: "a" * 5000, ["'aaaa", "aaa...: File name too long"]),
}


@pytest.mark.parametrize("case", list(NOT_A_MODEL))
def test_model_that_is_not_a_checkpoint_exits_2(case, store_copy, snapshot, tmp_path):
    make, texts = NOT_A_MODEL[case]
    before = snapshot(store_copy)
    result = invoke("run", "--model", make(tmp_path), "--store", str(store_copy))
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert len(result.stderr) < 400
    for text in texts:
        assert text in result.stderr, (text, result.stderr)
    assert snapshot(store_copy) == before


def _orbax_trajectory(root: Path, steps: list[int]) -> None:
    """The gpt_neox fixture's weights as an orbax CheckpointManager directory (linen kernels)."""
    import orbax.checkpoint as ocp

    tensors = load_file(str(NEOX / "model.safetensors"))
    qkv = "gpt_neox.layers.{}.attention.query_key_value."
    params = {"gpt_neox": {"layers": {str(i): {"attention": {"query_key_value": {
        "kernel": tensors[qkv.format(i) + "weight"].astype(np.float32).T,
        "bias": tensors[qkv.format(i) + "bias"].astype(np.float32),
    }}} for i in range(2)}}}  # fmt: skip
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(root.absolute(), options=options) as manager:
        for step in steps:
            manager.save(step, args=ocp.args.StandardSave(params))
    shutil.copy(NEOX / "config.json", root / "config.json")


@pytest.mark.slow
def test_relative_orbax_path(tmp_path, monkeypatch, neox_store):
    """orbax accepts absolute paths only: a relative --model is made absolute first, and the
    store holds what the same weights give from safetensors."""
    _orbax_trajectory(tmp_path / "models" / "traj", [0, 1])
    monkeypatch.chdir(tmp_path)
    result = invoke("run", "--model", "models/traj", "--steps", "1", "--store", "s.zarr")
    assert result.exit_code == 0, result.output
    got = zarr.open_group("s.zarr", mode="r")["traj"]
    want = zarr.open_group(str(neox_store), mode="r")[KEY]
    assert got.attrs["source"] == str(tmp_path / "models" / "traj")
    for name in ("mean", "std", "singular_values", "entropy"):
        np.testing.assert_array_equal(got[name][:], want[name][:], err_msg=name)


# ---- arguments: exit 2 naming the argument, before anything is read or written -----------------


@pytest.mark.parametrize("size", ["-1", "-5GB", "0", "0.4", "infGB", "1e400g", "nan", "2EB", "1 << 30", ""])
@pytest.mark.parametrize("command", ["run", "baseline"])
def test_bad_memory_budget_exits_2(command, size, tmp_path):
    store = tmp_path / "s.zarr"
    args = ["--model", str(NEOX)] if command == "run" else ["--d", "8", "--d-head", "2", "--samples", "4"]
    result = invoke(command, *args, "--store", str(store), "--memory-budget", size)
    assert result.exit_code == 2, result.output
    assert "--memory-budget" in result.stderr and repr(size) in result.stderr
    assert "Traceback" not in result.output
    assert not store.exists()


def test_sizes():
    from spinjax.cli import Size

    convert = Size().convert
    assert convert("2GB", None, None) == 2 << 30 and convert("512MiB", None, None) == 512 << 20
    assert convert("1.5g", None, None) == 3 << 29 and convert("1e9", None, None) == 10**9
    assert convert(" 7 ", None, None) == 7 and convert("64kb", None, None) == 65536


@pytest.mark.parametrize("address", ["127.0.0.1:notaport", "127.0.0.1", ":1234", "host:0", "host:70000",
                                     "::1:1234", "[::1]", "-host:1234", "a b:1234"])  # fmt: skip
def test_bad_coordinator_exits_2_before_jax_sees_it(address, tmp_path, monkeypatch):
    import jax

    def never(*args, **kwargs):
        raise AssertionError("handed to JAX")

    monkeypatch.setattr(jax.distributed, "initialize", never)
    store = tmp_path / "s.zarr"
    args = ["--coordinator", address, "--num-processes", "2", "--process-id", "0"]
    result = invoke("run", "--model", str(NEOX), "--store", str(store), *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"error: --coordinator {address!r}: expected HOST:PORT")
    assert not store.exists()


def test_coordinator_address_forms():
    from spinjax.run.distributed import check_coordinator

    assert check_coordinator("node-001.cluster:1234") == ("node-001.cluster", 1234)
    assert check_coordinator("10.0.0.1:65535") == ("10.0.0.1", 65535)
    assert check_coordinator("[fe80::1]:8476") == ("fe80::1", 8476)


@pytest.mark.parametrize("process", ["0", "1"])
@pytest.mark.slow
def test_coordinator_timeout_names_the_coordinator(process, tmp_path):
    """Process 0 waits for a process 1 that never comes, process 1 for a coordinator that never
    answers: both give up after --join-timeout with exit 2 (JAX itself would abort, SIGABRT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"127.0.0.1:{port}"
    args = ["--coordinator", address, "--num-processes", "2", "--process-id", process, "--join-timeout", "1"]
    done = _subprocess("run", "--model", str(NEOX), "--store", "s.zarr", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    assert (
        f"error: --coordinator {address}: not every process joined within 1 s (process {process} of 2)"
        in (done.stderr)
    )
    assert "Traceback" not in done.stderr and not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("dpi", ["0", "-5", "19", "601", "20000"])
def test_plot_dpi_out_of_range_exits_2(dpi, neox_store, tmp_path):
    result = invoke("plot", str(neox_store), "--figure", "heads", "--dpi", dpi, "--out", str(tmp_path / "f"))
    assert result.exit_code == 2, result.output
    assert "--dpi" in result.stderr and dpi in result.stderr
    assert not (tmp_path / "f").exists()


@pytest.mark.parametrize("command", ["plot", "report"])
@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_out_that_cannot_be_a_folder_exits_2(command, where, neox_store, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("keep")
    out = file if where == "a file" else file / "figures"
    figure = ["--figure", "heads"] if command == "plot" else []
    result = invoke(command, str(neox_store), *figure, "--out", str(out))
    assert result.exit_code == 2, result.output
    assert "--out" in result.stderr and f"{file} is a file, not a folder" in result.stderr
    assert file.read_text() == "keep"


def test_too_many_pixels_refused_before_drawing(tmp_path):
    from matplotlib.figure import Figure

    from spinjax.analysis.figures import MAX_PIXELS, save
    from spinjax.errors import InputError

    fig = Figure(figsize=(12.8, 84))  # the histogram grid of a 128-head layer
    with pytest.raises(InputError, match=r"--dpi 600: hist would be 7680 x 50400 pixels"):
        save(fig, tmp_path / "hist", dpi=600)
    assert list(tmp_path.iterdir()) == []
    assert 12.8 * 84 * 150**2 < MAX_PIXELS  # the default dpi draws it
