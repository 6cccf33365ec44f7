"""A checkpoint's scale does not reach the scale-free statistics of its store: the gpt_neox
fixture's fp16 weights multiplied by the power of two that brings them near fp16's maximum."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pytest
import xarray as xr
from conftest import NEOX
from safetensors.numpy import load_file, save_file

from spinjax.run.options import RunOptions
from spinjax.run.pipeline import run

SCALE_FREE = ("skew", "kurt", "kl_gauss_mm", "ks_normal", "stable_rank", "participation_ratio", "zhist")


@pytest.mark.slow
def test_fp16_weights_near_their_maximum_give_the_statistics_of_the_fixture(neox_store, tmp_path):
    big = tmp_path / "gpt_neox"
    shutil.copytree(NEOX, big)
    tensors = load_file(str(NEOX / "model.safetensors"))
    largest = max(float(np.abs(t.astype(np.float32)).max()) for t in tensors.values())
    k = math.floor(math.log2(65504 / largest))  # exact in fp16: a power of two, no overflow
    save_file({n: np.ldexp(t.astype(np.float32), k).astype(np.float16) for n, t in tensors.items()},
              str(big / "model.safetensors"))  # fmt: skip
    path = tmp_path / "s.zarr"
    run(str(big), RunOptions(steps="all", store=path))
    got, ref = xr.open_zarr(path, group="gpt_neox"), xr.open_zarr(neox_store, group="gpt_neox")
    assert float(got["max"].sel(matrix="W_Q").max()) > 8000 and np.isfinite(got["kurt"].values).all()
    for name in SCALE_FREE:
        np.testing.assert_array_equal(got[name].values, ref[name].values, err_msg=name)
    np.testing.assert_array_equal(got["std"].values, np.ldexp(ref["std"].values, [k, k, 2 * k]))
