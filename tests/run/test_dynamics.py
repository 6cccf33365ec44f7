"""Training dynamics: kernels (kernels/dynamics.py) against float64 references, planted level
crossings and repulsions, and the store pass (spinjax/dynamics.py) on tiny-pythia."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import xarray as xr
import zarr
from conftest import NEOX
from reference import js_divergence as js_reference

from spinjax.errors import InputError
from spinjax.kernels import dynamics as kd
from spinjax.kernels import js_divergence

# ---- float64 references ----------------------------------------------------------------------


def _kl_ref(p, q, pseudo=0.5):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    support = (p > 0) | (q > 0)
    p, q = p[support] + pseudo, q[support] + pseudo
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * np.log(p / q)))


def _events_ref(s, ol, orr, tol):
    """The documented rule, one pair at a time (s (T, k), overlaps (T, k, k) of one head)."""
    n_steps, k = s.shape
    codes = np.zeros((n_steps, k), np.int8)
    codes[0] = -1
    gap = np.array([[(s[t, i] - s[t, i + 1]) / s[t, i] for i in range(k - 1)] for t in range(n_steps)])
    for t in range(1, n_steps):
        for i in range(k - 1):
            kept = np.mean([(o[t, i, i] ** 2 + o[t, i + 1, i + 1] ** 2) / 2 for o in (ol, orr)])
            swapped = np.mean([(o[t, i, i + 1] ** 2 + o[t, i + 1, i] ** 2) / 2 for o in (ol, orr)])
            if swapped > 0.5 and min(gap[t - 1, i], gap[t, i]) < tol:
                codes[t, i] = 1
            elif t >= 2 and kept > 0.5 and gap[t - 1, i] < tol and gap[t - 2, i] > gap[t - 1, i] < gap[t, i]:
                kept_before = np.mean(
                    [(o[t - 1, i, i] ** 2 + o[t - 1, i + 1, i + 1] ** 2) / 2 for o in (ol, orr)]
                )
                codes[t, i] = 2 if kept_before > 0.5 else 0
    return codes


def _orthonormal(rng, d, k):
    return np.linalg.qr(rng.normal(size=(d, k)))[0]


# ---- kernels ---------------------------------------------------------------------------------


def test_top_singular_vectors_match_float64_svd():
    rng = np.random.default_rng(0)
    n_heads, n_kv, d_head, d, k = 6, 2, 4, 24, 3
    wq = rng.normal(0.0, 0.3, (n_heads, d_head, d)).astype(np.float32)
    wk = rng.normal(0.1, 0.5, (n_kv, d_head, d)).astype(np.float32)
    s, left, right = (np.asarray(a, np.float64) for a in kd.top_singular_vectors(wq, wk, k))
    assert s.shape == (n_heads, k) and left.shape == right.shape == (n_heads, d, k)
    for h in range(n_heads):
        w = wq[h].astype(np.float64).T @ wk[h // 3].astype(np.float64)  # GQA: 3 query heads per key
        u, s_ref, vt = np.linalg.svd(w)
        assert np.min(-np.diff(s_ref[: k + 1]) / s_ref[0]) > 1e-2  # well-separated: vectors defined
        np.testing.assert_allclose(s[h], s_ref[:k], rtol=0, atol=1e-5 * s_ref[0])
        # each vector equals the reference up to its sign, and left/right signs agree
        np.testing.assert_allclose(np.abs(np.sum(left[h] * u[:, :k], 0)), 1.0, atol=1e-4)
        np.testing.assert_allclose(np.abs(np.sum(right[h] * vt[:k].T, 0)), 1.0, atol=1e-4)
        np.testing.assert_allclose(np.diag(left[h].T @ w @ right[h]), s_ref[:k], atol=1e-5 * s_ref[0])
        np.testing.assert_allclose(left[h].T @ left[h], np.eye(k), atol=1e-5)
    # non-finite weights count as zero, like the spectrum
    bad = wq.copy()
    bad[1, 0, :5] = np.nan
    zeroed = np.where(np.isfinite(bad), bad, 0.0)
    got, want = kd.top_singular_vectors(bad, wk, k), kd.top_singular_vectors(zeroed, wk, k)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    with pytest.raises(ValueError, match="d_head"):
        kd.top_singular_vectors(wq, wk, d_head + 1)


def test_overlaps_match_float64():
    rng = np.random.default_rng(1)
    a = np.stack([_orthonormal(rng, 20, 4) for _ in range(3)])
    b = np.stack([_orthonormal(rng, 20, 4) for _ in range(3)])
    got = np.asarray(kd.overlaps(a.astype(np.float32), b.astype(np.float32)))
    want = np.abs(np.einsum("hdi,hdj->hij", a, b))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(want).max() < 0.9  # random directions: a real comparison, not all ones
    np.testing.assert_allclose(
        np.asarray(kd.overlaps(a, -a)), np.broadcast_to(np.eye(4), (3, 4, 4)), atol=1e-6
    )


def test_kl_and_js_against_float64():
    rng = np.random.default_rng(2)
    p = rng.poisson(rng.uniform(0, 30, (5, 40))).astype(np.uint32)
    q = rng.poisson(rng.uniform(0, 30, (5, 40))).astype(np.uint32)
    p[:, :6], q[:, 30:] = 0, 0  # bins with mass in one histogram only: plain KL would be infinite
    p[:, 10], q[:, 10] = 0, 0  # a bin empty in both: left out
    kl = np.asarray(kd.kl_smoothed(p, q))
    js = np.asarray(js_divergence(p, q))
    for i in range(5):
        assert kl[i] == pytest.approx(_kl_ref(p[i], q[i]), abs=1e-5)
        assert js[i] == pytest.approx(js_reference(p[i], q[i]), abs=1e-5)
    assert np.isfinite(kl).all() and (kl > 0.05).all()
    # by hand: P = (2, 0), Q = (0, 2) -> (2.5, 0.5)/3 against (0.5, 2.5)/3: (2/3) ln 5
    assert float(kd.kl_smoothed(np.array([2, 0, 0]), np.array([0, 2, 0]))) == pytest.approx(
        2 / 3 * np.log(5), rel=1e-6
    )
    np.testing.assert_array_equal(np.asarray(kd.kl_smoothed(p, p)), 0.0)
    # bins empty in both histograms do not change the value
    pad = np.zeros((5, 100), np.uint32)
    wide = np.asarray(kd.kl_smoothed(np.concatenate([p, pad], 1), np.concatenate([q, pad], 1)))
    np.testing.assert_allclose(wide, kl, rtol=1e-6)


# ---- planted crossings and repulsions --------------------------------------------------------


def _trajectory(values, rng, *, angles=None, left_only=False, d=32, d_head=4, jitter=1e-3):
    """Factors (T, 1, d_head, d) of one head whose W_QK = sum_i values[t, i] u_i v_i^T.

    Directions are fixed (up to a jitter of ``jitter``); ``values[:, i]`` follows the direction
    pair i, so the sorted order changes where two columns cross. The factors are mixed by a
    random invertible d_head x d_head matrix M (wq = M^T S U^T, wk = M^-1 V^T), so nothing is
    diagonal in the stored factors. ``angles[t]`` rotates the directions of columns 1 and 2
    within their plane at step t (left and right alike, or only the left ones).
    """
    u0, v0 = _orthonormal(rng, d, d_head), _orthonormal(rng, d, d_head)
    wq, wk = [], []
    for t, s in enumerate(values):
        u = np.linalg.qr(u0 + jitter * rng.normal(size=u0.shape))[0]
        v = np.linalg.qr(v0 + jitter * rng.normal(size=v0.shape))[0]
        if angles is not None:
            c, n = np.cos(angles[t]), np.sin(angles[t])
            u[:, 1:3] = u[:, 1:3] @ [[c, -n], [n, c]]
            v[:, 1:3] = v[:, 1:3] if left_only else v[:, 1:3] @ [[c, -n], [n, c]]
        m = rng.normal(size=(d_head, d_head)) + 3 * np.eye(d_head)
        wq.append(m.T @ np.diag(s) @ u.T)
        wk.append(np.linalg.inv(m) @ v.T)
    return np.asarray(wq, np.float32)[:, None], np.asarray(wk, np.float32)[:, None]


def _events(wq, wk, k=4, tol=kd.GAP_TOL):
    s, left, right = zip(
        *(kd.top_singular_vectors(q, kk, k) for q, kk in zip(wq, wk, strict=True)), strict=True
    )
    nan = np.full((1, k, k), np.nan, np.float32)
    ol = np.stack([nan] + [np.asarray(kd.overlaps(a, b)) for a, b in zip(left[:-1], left[1:], strict=True)])
    orr = np.stack(
        [nan] + [np.asarray(kd.overlaps(a, b)) for a, b in zip(right[:-1], right[1:], strict=True)]
    )
    s = np.stack([np.asarray(x) for x in s])
    codes = np.asarray(kd.mode_events(s, ol, orr, gap_tol=tol))[:, 0]
    np.testing.assert_array_equal(codes, _events_ref(s[:, 0], ol[:, 0], orr[:, 0], tol))
    return codes, s[:, 0]


def test_planted_crossing_is_a_crossing():
    rng = np.random.default_rng(3)
    # modes a, b (columns 1, 2) pass each other between steps 1 and 2; 0 and 3 stay far away
    values = np.array(
        [[3.0, 1.00, 0.85, 0.3], [3.0, 0.97, 0.93, 0.3], [3.0, 0.90, 0.97, 0.3], [3.0, 0.85, 1.0, 0.3]]
    )
    codes, s = _events(*_trajectory(values, rng))
    np.testing.assert_allclose(s, -np.sort(-values, 1), rtol=1e-4)
    expected = np.zeros((4, 4), np.int8)
    expected[0] = -1
    expected[2, 1] = 1  # pair (1, 2) between steps 1 and 2
    np.testing.assert_array_equal(codes, expected)
    # a near-degenerate pair whose plane turns: a crossing only past 45 degrees (swapped > 1/2)
    close = np.array([[3.0, 1.0, 0.97, 0.3]] * 3)
    for degrees, code in ((40, 0), (50, 1)):
        codes, _ = _events(*_trajectory(close, rng, angles=np.radians([0, 0, degrees])))
        assert codes[2, 1] == code and (codes[1:, [0, 2, 3]] == 0).all() and codes[1, 1] == 0
    # left directions swapped but right ones kept: the sides disagree, no event
    codes, _ = _events(*_trajectory(close, rng, angles=np.radians([0, 0, 90]), left_only=True))
    assert (codes[1:] == 0).all()
    # a swap across a wide gap at both steps is not a near-degenerate pair: no event
    wide = np.array([[3.0, 1.0, 0.7, 0.3]] * 2)
    codes, _ = _events(*_trajectory(wide, rng, angles=np.radians([0, 90])))
    assert (codes[1] == 0).all()


def test_planted_repulsion_is_a_repulsion():
    rng = np.random.default_rng(4)
    # modes a, b approach (relative gap 0.2 -> 0.03) and separate again, directions fixed
    values = np.array(
        [[3.0, 1.00, 0.80, 0.3], [3.0, 0.96, 0.93, 0.3], [3.0, 1.00, 0.82, 0.3], [3.0, 1.05, 0.80, 0.3]]
    )
    codes, _ = _events(*_trajectory(values, rng))
    expected = np.zeros((4, 4), np.int8)
    expected[0] = -1
    expected[2, 1] = 2  # the reopening is seen at step 2
    np.testing.assert_array_equal(codes, expected)
    # the same approach that stays outside the near-degenerate band is no event
    far = values.copy()
    far[1, 2] = 0.85  # relative gap 0.115 > 0.1
    codes, _ = _events(*_trajectory(far, rng))
    assert (codes[1:] == 0).all()
    # and with the directions of a and b exchanged at the closest approach it is a crossing
    swapped = values.copy()
    swapped[2:, 1:3] = swapped[2:, 2:0:-1]
    codes, _ = _events(*_trajectory(swapped, rng))
    assert codes[2, 1] == 1 and codes[3, 1] == 0
    # the gap closing and reopening right after the directions swapped is a crossing, then nothing
    codes, _ = _events(*_trajectory(values, rng, angles=np.radians([0, 90, 90, 90])))
    assert codes[1, 1] == 1 and (codes[2:] == 0).all()
    # a pair that only separates, or only approaches, has no event: the gap needs a minimum
    for gaps in ([0.97, 0.95, 0.85, 0.8], [0.8, 0.85, 0.95, 0.97]):
        one_way = np.array([[3.0, 1.0, g, 0.3] for g in gaps])
        codes, _ = _events(*_trajectory(one_way, rng))
        assert (codes[1:] == 0).all()


# ---- the pass over a store -------------------------------------------------------------------


def _factors(step: int, layer: int):
    from spinjax.sources import registry as models
    from spinjax.sources.layouts import layout_for

    source = models.resolve("tiny-pythia")
    checkpoint = source.open(step, f"step{step}")
    layout = layout_for(checkpoint.config, "test")
    return layout.extract(checkpoint.tensor, layer, layout.geometry(checkpoint.config, "test"))


def _svd64(step: int, layer: int, head: int):
    wq, wk = _factors(step, layer)
    u, s, vt = np.linalg.svd(wq[head].astype(np.float64).T @ wk[head].astype(np.float64))
    return u, s, vt.T


@pytest.fixture(scope="module")
def dyn_store(tiny_pythia, tmp_path_factory):
    """tiny-pythia steps 0, 1, 4 and a first dynamics pass (top_k 4); (path, result)."""
    from spinjax.run.dynamics import compute_dynamics
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path_factory.mktemp("dynamics") / "store.zarr"
    assert run("tiny-pythia", RunOptions(steps="0,1,4", store=path)).computed == [0, 1, 4]
    return path, compute_dynamics("tiny-pythia", path, top_k=4)


def test_show_lists_the_variables_over_all_steps(dyn_store):
    from spinjax.store import summary

    variables = summary(dyn_store[0])["models"]["tiny-pythia"]["variables"]
    assert "largest_change_step" in variables and "overlap_left" in variables
    assert not {"mode", "mode2", "zbin_edges", "bin_edges", "layer"} & set(variables)


def test_pass_writes_what_the_references_give(dyn_store):
    path, result = dyn_store
    assert (result.steps, result.top_k, result.read) == ([0, 1, 4], 4, [0, 1, 4])
    assert (result.pairs, result.reused) == ([(0, 1), (1, 4)], [])
    ds = xr.open_zarr(path, group="tiny-pythia")
    assert ds.attrs["dynamics"] == {
        "top_k": 4,
        "gap_tol": kd.GAP_TOL,
        "first_step": 0,
        "pairs": [[0, 1], [1, 4]],
    }
    assert ds["overlap_left"].dims == ("step", "layer", "head", "mode", "mode2")
    assert list(ds["mode"].values) == [0, 1, 2, 3] and ds["mode_event"].dtype == np.int8
    hist = ds["hist"].values.astype(np.float64)
    kl, js, change = (ds[n].values for n in ("kl_first", "js_first", "change_js"))
    ref_change = np.full(change.shape, np.nan)
    for t in range(3):
        for idx in np.ndindex(hist.shape[1:4]):
            assert kl[(t, *idx)] == pytest.approx(_kl_ref(hist[(t, *idx)], hist[(0, *idx)]), abs=2e-5)
            assert js[(t, *idx)] == pytest.approx(js_reference(hist[(t, *idx)], hist[(0, *idx)]), abs=2e-5)
            if t:
                ref_change[(t, *idx)] = js_reference(hist[(t, *idx)], hist[(t - 1, *idx)])
    assert (kl[0] == 0).all() and (kl[1:] > 0).any() and (js[1:] >= 0).all() and (js[2] > 0).any()
    np.testing.assert_allclose(change, ref_change, atol=2e-5)
    largest = np.array([1, 4])[np.argmax(ref_change[1:], axis=0)]
    np.testing.assert_array_equal(ds["largest_change_step"].values, largest)
    # overlaps of one head against float64 SVDs of the explicit W_QK (well-separated modes only)
    assert np.isnan(ds["overlap_left"].values[0]).all()
    for step, prev in ((1, 0), (4, 1)):
        (ua, sa, va), (ub, sb, vb) = _svd64(prev, 2, 1), _svd64(step, 2, 1)
        separated = [
            i
            for i in range(4)
            if all(min(abs(s[i] - s[j]) for j in range(16) if j != i) > 1e-3 * s[0] for s in (sa, sb))
        ]
        assert len(separated) >= 2
        sel = np.ix_(separated, separated)
        for name, a, b in (("overlap_left", ua, ub), ("overlap_right", va, vb)):
            want = np.abs(a[:, :4].T @ b[:, :4])
            np.testing.assert_allclose(
                ds[name].sel(step=step, layer=2, head=1).values[sel], want[sel], atol=1e-3
            )
    # codes: the documented rule, applied pair by pair to the stored values
    s = ds["singular_values"].sel(matrix="W_QK").values[..., :4]
    ol, orr, codes = ds["overlap_left"].values, ds["overlap_right"].values, ds["mode_event"].values
    for layer in range(4):
        for head in range(4):
            ref = _events_ref(s[:, layer, head], ol[:, layer, head], orr[:, layer, head], kd.GAP_TOL)
            np.testing.assert_array_equal(codes[:, layer, head], ref)


def test_rerun_and_new_steps_read_only_what_is_needed(dyn_store, tmp_path, snapshot):
    from spinjax.run.dynamics import compute_dynamics
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path / "store.zarr"
    shutil.copytree(dyn_store[0], path)
    before = snapshot(path)
    again = compute_dynamics("tiny-pythia", path, top_k=4)
    assert (again.read, again.pairs, again.reused) == ([], [], [(0, 1), (1, 4)])
    assert snapshot(path) == before  # nothing changed, not even a byte
    overlap_1_4 = xr.open_zarr(path, group="tiny-pythia")["overlap_left"].sel(step=4).values

    # a step inserted between two others and one appended: only their pairs are computed
    run("tiny-pythia", RunOptions(steps="2,8", store=path))
    more = compute_dynamics("tiny-pythia", path, top_k=4)
    assert (more.read, more.pairs, more.reused) == ([1, 2, 4, 8], [(1, 2), (2, 4), (4, 8)], [(0, 1)])
    ds = xr.open_zarr(path, group="tiny-pythia")
    assert ds.attrs["dynamics"]["pairs"] == [[0, 1], [1, 2], [2, 4], [4, 8]]
    (ua, _, _), (ub, _, _) = _svd64(2, 0, 0), _svd64(4, 0, 0)
    got = ds["overlap_left"].sel(step=4, layer=0, head=0).values
    assert abs(got[0, 0] - abs(ua[:, 0] @ ub[:, 0])) < 1e-3  # now the pair (2, 4), not (1, 4)
    assert not np.array_equal(ds["overlap_left"].sel(step=4).values, overlap_1_4)
    assert (ds["mode_event"].sel(step=0).values == -1).all()
    assert (ds["mode_event"].sel(step=[1, 2, 4, 8]).values >= 0).all()

    # a recomputed step resets its derived variables: only its pair is redone
    run("tiny-pythia", RunOptions(steps="8", store=path, recompute=True))
    assert np.isnan(xr.open_zarr(path, group="tiny-pythia")["overlap_left"].sel(step=8).values).all()
    redo = compute_dynamics("tiny-pythia", path, top_k=4)
    assert (redo.read, redo.pairs) == ([4, 8], [(4, 8)])

    # another top_k redoes every pair, with the new mode coordinates
    other = compute_dynamics("tiny-pythia", path, top_k=2)
    assert (other.read, len(other.pairs), other.reused) == ([0, 1, 2, 4, 8], 4, [])
    ds = xr.open_zarr(path, group="tiny-pythia")
    assert ds.sizes["mode"] == 2 and ds.attrs["dynamics"]["top_k"] == 2
    assert np.isfinite(ds["overlap_right"].sel(step=[1, 2, 4, 8]).values).all()

    # histogram-based variables are recomputed on every pass, without reading checkpoints
    assert (ds["largest_change_step"].values == 8).all()  # intervals grow: the last is largest
    hist = zarr.open_group(str(path / "tiny-pythia"), mode="r+")["hist"]
    first = list(ds["step"].values).index(0)
    hist[first, 0, 0, 0] = np.roll(hist[first, 0, 0, 0], 300)  # step 0 of (layer 0, head 0, W_Q) moved
    redo = compute_dynamics("tiny-pythia", path, top_k=2)
    ds = xr.open_zarr(path, group="tiny-pythia")
    assert redo.read == [] and ds["largest_change_step"].values[0, 0, 0] == 1
    assert (ds["largest_change_step"].values.ravel()[1:] == 8).all()
    assert ds["change_js"].sel(step=1, layer=0, head=0, matrix="W_Q") > 0.5
    assert ds["kl_first"].sel(step=1, layer=0, head=0, matrix="W_Q") > 1.0


def test_needs_two_finished_steps(neox_store, dyn_store):
    from spinjax.run.dynamics import compute_dynamics

    with pytest.raises(InputError, match="needs at least two finished steps; run more steps first"):
        compute_dynamics(str(NEOX), neox_store)
    with pytest.raises(InputError, match="no group"):
        compute_dynamics("tiny-pythia", neox_store)
    with pytest.raises(InputError, match="top-k"):
        compute_dynamics("tiny-pythia", dyn_store[0], top_k=0)


def test_cli_dynamics_summary_and_exit_codes(dyn_store, neox_store, tmp_path):
    import shutil

    from click.testing import CliRunner

    from spinjax.cli import main

    path = tmp_path / "copy.zarr"
    shutil.copytree(dyn_store[0], path)
    done = CliRunner().invoke(
        main, ["dynamics", "--model", "tiny-pythia", "--store", str(path), "--top-k", "4"]
    )
    assert done.exit_code == 0, done.output
    assert (
        "tiny-pythia: 3 steps, k=4, 0 pair(s) of steps computed (0 checkpoints read), 2 reused" in done.output
    )
    bad = CliRunner().invoke(main, ["dynamics", "--model", str(NEOX), "--store", str(neox_store)])
    assert bad.exit_code == 2 and "needs at least two finished steps" in bad.output


def test_dynamics_of_a_variant_group_with_ov(tiny_pythia, tmp_path):
    # the group `tiny-pythia@bias` (d + 1 columns, six matrices) as `spinjax run` named it
    from spinjax.run.dynamics import compute_dynamics
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path / "s.zarr"
    run("tiny-pythia", RunOptions(steps="0,4", store=path, variant="bias", ov=True, pairs="none"))
    res = compute_dynamics("tiny-pythia", path, top_k=4, variant="bias")
    assert res.key == "tiny-pythia@bias" and res.read == [0, 4] and res.pairs == [(0, 4)]
    g = zarr.open_group(str(path), mode="r")["tiny-pythia@bias"]
    overlap = g["overlap_left"][1]
    assert np.isfinite(overlap).all() and (overlap <= 1 + 1e-5).all() and overlap.max() > 0.5
    with pytest.raises(InputError, match="no group 'tiny-pythia'"):
        compute_dynamics("tiny-pythia", path)


@pytest.mark.slow
def test_dynamics_reads_the_revisions_the_run_recorded(tiny_pythia, tmp_path, monkeypatch):
    """A step's overlaps come from the checkpoint the run read (the group's ``revision``), not
    from what the source offers for that step now (a hub branch may have moved since)."""
    from spinjax.run import dynamics
    from spinjax.run.options import RunOptions
    from spinjax.run.pipeline import run

    path = tmp_path / "s.zarr"
    run("tiny-pythia", RunOptions(steps="0,4", store=path, pairs="none"))
    group = zarr.open_group(str(path), mode="r")["tiny-pythia"]
    recorded = {int(s): str(r) for s, r in zip(group["step"][:], group["revision"][:], strict=True)}
    asked, opener = [], dynamics.open_step

    def spy(source, step, variant="raw", ov=False, revision=None):
        asked.append((step, revision))
        return opener(source, step, variant, ov, revision)

    monkeypatch.setattr(dynamics, "open_step", spy)
    dynamics.compute_dynamics("tiny-pythia", path, top_k=4)
    assert asked == [(0, recorded[0]), (4, recorded[4])]
