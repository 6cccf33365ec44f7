"""Checkpoints in Hugging Face layout made with numpy alone (no torch), for the hub tests and
benchmarks/bench_hub.py.

- :func:`torch_zip`: a ``torch.save``-style zip of a state dict: ``data.pkl`` (protocol 2, the
  opcodes torch writes: ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2``,
  persistent ``('storage', torch.HalfStorage, key, 'cpu', numel)`` records), ``byteorder``,
  ``data/<key>`` per tensor, ``version``; written to a path, a tensor may be given as
  ``(dtype, shape, fill)`` where ``fill(array_slice_start, rows)`` makes rows on demand and rows
  left all zero become holes of a sparse file (the benchmark's multi-GB checkpoints);
- :func:`neox_state`, :func:`gpt2_state` and their configs: Pythia- and GPT-2-shaped models;
- :func:`hf_files`: a checkpoint's files: ``config.json`` and single or sharded ``.bin`` /
  ``.safetensors`` weights with the index json that transformers writes.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save as safetensors_bytes

_STORAGE = {
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(ml_dtypes.bfloat16): "BFloat16Storage",
}

Fill = Callable[[int, int], np.ndarray]  # (first row, number of rows) -> rows
Lazy = tuple[np.dtype, tuple[int, ...], Fill]


# ---- data.pkl, opcode by opcode (pickle cannot name torch's globals without importing torch)


def _str(s: str) -> bytes:
    data = s.encode()
    return b"X" + len(data).to_bytes(4, "little") + data  # BINUNICODE


def _int(x: int) -> bytes:
    data = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True) if x else b""
    return b"\x8a" + bytes([len(data)]) + data  # LONG1


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()  # GLOBAL


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _ordered_dict() -> bytes:
    return _global("collections", "OrderedDict") + b")R"  # EMPTY_TUPLE REDUCE


def data_pkl(tensors: dict[str, tuple[np.dtype, tuple[int, ...]]]) -> bytes:
    """The pickle torch writes for a state dict of contiguous tensors, storage i for tensor i."""
    out = [b"\x80\x02", _ordered_dict(), b"("]  # PROTO 2, the state dict, MARK for SETITEMS
    for key, (name, (dtype, shape)) in enumerate(tensors.items()):
        numel = int(np.prod(shape, dtype=np.int64))
        stride = [int(np.prod(shape[i + 1 :], dtype=np.int64)) for i in range(len(shape))]
        pid = _tuple([_str("storage"), _global("torch", _STORAGE[np.dtype(dtype)]), _str(str(key)),
                      _str("cpu"), _int(numel)])  # fmt: skip
        args = [pid + b"Q", _int(0), _tuple([_int(s) for s in shape]), _tuple([_int(s) for s in stride]),
                b"\x89", _ordered_dict()]  # fmt: skip  # BINPERSID ... NEWFALSE
        out += [_str(name), _global("torch._utils", "_rebuild_tensor_v2"), _tuple(args), b"R"]
    out += [b"u."]  # SETITEMS STOP
    return b"".join(out)


# ---- the zip


class _Sparse(io.RawIOBase):
    """A file written through zipfile where long runs of zeros become holes."""

    def __init__(self, path: Path):
        self._f = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._end = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) >= 1 << 16 and not np.frombuffer(view, np.uint8).any():
            self._f.seek(len(view), os.SEEK_CUR)
        else:
            self._f.write(view)
        self._end = max(self._end, self._f.tell())
        return len(view)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        if not self._f.closed:
            self._f.truncate(self._end)
            super().close()
            self._f.close()


def torch_zip(tensors: dict[str, np.ndarray | Lazy], path: Path | None = None, archive: str = "archive"):
    """``tensors`` as torch.save writes them: the zip's bytes, or written (sparse) to ``path``."""
    meta = {n: (t.dtype, t.shape) if isinstance(t, np.ndarray) else (np.dtype(t[0]), t[1])
            for n, t in tensors.items()}  # fmt: skip
    target = io.BytesIO() if path is None else _Sparse(path)
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{archive}/data.pkl", data_pkl(meta))
        zf.writestr(f"{archive}/byteorder", "little")
        for key, t in enumerate(tensors.values()):
            info = zipfile.ZipInfo(f"{archive}/data/{key}")
            with zf.open(info, "w", force_zip64=True) as out:
                if isinstance(t, np.ndarray):
                    out.write(np.ascontiguousarray(t).tobytes())
                    continue
                dtype, shape, fill = t
                row = int(np.prod(shape[1:], dtype=np.int64)) * np.dtype(dtype).itemsize
                step = max(1, (16 << 20) // max(row, 1))
                for first in range(0, shape[0], step):
                    rows = fill(first, min(step, shape[0] - first))
                    out.write(np.ascontiguousarray(rows, dtype=dtype).tobytes())
        zf.writestr(f"{archive}/version", "3\n")
    if path is None:
        return target.getvalue()
    target.close()
    return path


# ---- models


def neox_config(d_model: int, n_layers: int, n_heads: int, vocab: int = 128) -> dict:
    return {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "hidden_size": d_model,
        "num_hidden_layers": n_layers, "num_attention_heads": n_heads, "intermediate_size": 4 * d_model,
        "vocab_size": vocab, "max_position_embeddings": 2048, "rotary_pct": 0.25, "torch_dtype": "float16",
    }  # fmt: skip


def neox_shapes(d: int, n_layers: int, vocab: int = 128) -> dict[str, tuple[int, ...]]:
    """Pythia's tensors in its state dict order."""
    shapes = {"gpt_neox.embed_in.weight": (vocab, d)}
    for i in range(n_layers):
        p = f"gpt_neox.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (d,), p + "input_layernorm.bias": (d,),
            p + "post_attention_layernorm.weight": (d,), p + "post_attention_layernorm.bias": (d,),
            p + "attention.query_key_value.weight": (3 * d, d),
            p + "attention.query_key_value.bias": (3 * d,),
            p + "attention.dense.weight": (d, d), p + "attention.dense.bias": (d,),
            p + "mlp.dense_h_to_4h.weight": (4 * d, d), p + "mlp.dense_h_to_4h.bias": (4 * d,),
            p + "mlp.dense_4h_to_h.weight": (d, 4 * d), p + "mlp.dense_4h_to_h.bias": (d,),
        }  # fmt: skip
    shapes |= {"gpt_neox.final_layer_norm.weight": (d,), "gpt_neox.final_layer_norm.bias": (d,),
               "embed_out.weight": (vocab, d)}  # fmt: skip
    return shapes


def neox_state(d: int, n_layers: int, seed: int = 0, vocab: int = 128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) * (0.02 if len(shape) > 1 else 0.1) + (len(shape) == 1)).astype(
            np.float16
        )
        for name, shape in neox_shapes(d, n_layers, vocab).items()
    }


def gpt2_config(d_model: int, n_layers: int, n_heads: int, vocab: int = 128) -> dict:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": d_model,
            "n_layer": n_layers, "n_head": n_heads, "vocab_size": vocab, "n_positions": 64}  # fmt: skip


def gpt2_state(d: int, n_layers: int, seed: int = 0, vocab: int = 128) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {"wte.weight": (vocab, d), "wpe.weight": (64, d)}
    for i in range(n_layers):
        p = f"h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,), p + "attn.c_attn.weight": (d, 3 * d),
            p + "attn.c_attn.bias": (3 * d,), p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,), p + "mlp.c_fc.weight": (d, 4 * d),
            p + "mlp.c_fc.bias": (4 * d,), p + "mlp.c_proj.weight": (4 * d, d), p + "mlp.c_proj.bias": (d,),
        }  # fmt: skip
    shapes |= {"ln_f.weight": (d,), "ln_f.bias": (d,)}
    return {name: (rng.standard_normal(shape) * 0.02).astype(np.float32) for name, shape in shapes.items()}


# ---- a checkpoint's files


def hf_files(
    state: dict[str, np.ndarray], config: dict, fmt: str = "bin", shards: int = 1
) -> dict[str, bytes]:
    """config.json and the weights as transformers names them: ``pytorch_model.bin`` /
    ``model.safetensors``, or ``shards`` files ``...-0000k-of-0000n...`` and the index json."""
    names = list(state)
    parts = [names[len(names) * k // shards : len(names) * (k + 1) // shards] for k in range(shards)]
    stem, suffix = ("pytorch_model", ".bin") if fmt == "bin" else ("model", ".safetensors")
    files = {"config.json": json.dumps(config, indent=2).encode()}
    weight_map = {}
    for k, part in enumerate(parts):
        file = f"{stem}{suffix}" if shards == 1 else f"{stem}-{k + 1:05d}-of-{shards:05d}{suffix}"
        tensors = {n: state[n] for n in part}
        if fmt == "bin":
            files[file] = torch_zip(tensors, archive=file.removesuffix(".bin"))
        else:
            files[file] = safetensors_bytes(tensors, {"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    if shards > 1:
        total = sum(a.nbytes for a in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        files[f"{stem}{suffix}.index.json"] = json.dumps(index, indent=2).encode()
    return files


def write_dir(files: dict[str, bytes], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory
