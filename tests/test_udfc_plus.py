"""udfc+: the moment-based reconstruction, its graph glue and the data-aware mode."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnx_udfc import api
from onnx_udfc.moments.gaussian import Activation, gaussian_moments
from onnx_udfc.moments.propagated import TensorMoments
from onnx_udfc.moments.reconstruction import reconstruction
from tests.helpers import assert_refused, bn_chain, initializers, max_diff, random_feeds, run


def test_solver_matches_least_squares_on_samples():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T / 6 + 0.05 * np.eye(6)
    mu = rng.normal(size=6) * 0.5
    mean, c = gaussian_moments(mu, cov, Activation("relu"))
    kept, pruned = np.array([0, 2, 3, 5]), np.array([1, 4])
    coef, const, rel = reconstruction(TensorMoments(mean, c), kept, pruned, lam=0.0)
    x = np.maximum(rng.multivariate_normal(mu, cov, size=300_000), 0)
    design = np.hstack([x[:, kept], np.ones((len(x), 1))])
    sol, *_ = np.linalg.lstsq(design, x[:, pruned], rcond=None)
    assert np.abs(coef - sol[:-1].T).max() < 0.03
    assert np.abs(const - sol[-1]).max() < 0.03
    resid = x[:, pruned] - design @ sol
    assert np.allclose(rel, resid.var(0) / x[:, pruned].var(0), atol=0.03)


def test_exact_copy_is_reconstructed_exactly():
    m = TensorMoments(np.array([1.0, 2.0, 0.5]), np.array([[1.0, 0.2, 0.5],
                                                           [0.2, 2.0, 0.1],
                                                           [0.5, 0.1, 0.25]]))
    coef, const, rel = reconstruction(m, np.array([0, 1]), np.array([2]), lam=0.0)
    assert coef[0] == pytest.approx([0.5, 0.0], abs=1e-9)
    assert const[0] == pytest.approx(0.0, abs=1e-9)
    assert rel[0] == pytest.approx(0.0, abs=1e-9)


def test_compress_udfc_plus_exact_on_duplicate_channel():
    # channel 5 = 0.3 x channel 0 after BN; the synthetic BN statistics are not those of any
    # data (var5 = var0), so the moments are measured on the test inputs (data-aware mode)
    model = bn_chain()
    feeds = random_feeds(model, 2, 1)
    plain, _ = api.compress(model, prune=0.1, method="prune", target="fake")
    plus, report = api.compress(model, prune=0.1, method="udfc+", calibration=feeds, target="fake")
    comp = [entry["compensation"] for entry in report.to_dict()["layers"]
            if entry.get("compensation")]
    assert comp and all(c["compensated"] for c in comp)
    assert max_diff(model, plus) < 0.05 * max_diff(model, plain)


def test_calibration_and_quantization_run():
    model = bn_chain()
    feeds = random_feeds(model, batch=16, seed=4)
    ref = run(model, feeds)[0]
    errs = {}
    for name, kw in {"prune": {"method": "prune"}, "plus": {"method": "udfc+"},
                     "cal": {"method": "udfc+", "calibration": feeds}}.items():
        out, _ = api.compress(model, prune=0.3, bits=6, **kw)
        errs[name] = float(np.abs(run(out, feeds)[0] - ref).mean())
    assert errs["cal"] <= errs["prune"]
    assert errs["plus"] < errs["prune"] * 1.5


def test_bias_correction_reduces_mean_error():
    model = bn_chain()
    feeds = random_feeds(model, batch=32, seed=5)
    ref = run(model, feeds)[0]
    rtn, _ = api.compress(model, bits=3, method="prune", target="fake")
    plus, _ = api.compress(model, bits=3, method="udfc+", calibration=feeds, target="fake")
    bias = {k: float(np.abs((run(m, feeds)[0] - ref).mean(0)).mean())
            for k, m in {"rtn": rtn, "plus": plus}.items()}
    assert bias["plus"] < bias["rtn"]


def test_seed_picks_the_synthetic_samples_reproducibly(digits_model):
    def run_seed(seed: int):
        return api.compress(str(digits_model), prune=0.3, bits=4, method="udfc+",
                            moments="sampled", seed=seed, target="fake")

    (a, report), (b, _), (c, _) = run_seed(0), run_seed(0), run_seed(1)
    wa, wb, wc = initializers(a), initializers(b), initializers(c)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert any(wa[k].shape == wc[k].shape and not np.array_equal(wa[k], wc[k]) for k in wa)
    assert report.to_dict()["config"]["method"]["seed"] == 0


def test_seed_starts_the_inversion(digits_model, monkeypatch):
    from onnx_udfc.moments import inverted as inversion

    seen = []
    real = inversion.cached_inverted_inputs

    def spy(model, *a, **k):
        seen.append(k.get("seed"))
        return real(model, steps=2, seed=k.get("seed", 0))

    monkeypatch.setattr(inversion, "cached_inverted_inputs", spy)
    api.compress(str(digits_model), prune=0.3, method="udfc+", moments="inverted", seed=5,
        target="fake")
    assert seen == [5]


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_refused_before_anything_runs(digits_model, seed):
    from onnx_udfc.core.errors import UdfcError

    with pytest.raises(UdfcError, match="seed must be a non-negative integer"):
        api.compress(str(digits_model), prune=0.3, method="udfc+", seed=seed, target="fake")


def test_cli_bad_seed_is_a_one_line_usage_error(digits_model, tmp_path, capsys):
    assert_refused(capsys, tmp_path / "o.onnx", "seed must be a non-negative integer",
                   "compress", str(digits_model), "--method", "udfc+", "--seed", "-3",
                       "--target", "fake")


def test_channels_last_activations_are_measured_on_their_channel_axis():
    # A transformer MLP's activations are [N, T, C]: sampled moments read axis 2, not T.
    import gzip
    from pathlib import Path

    fixture = Path(__file__).parent / "fixtures" / "zoo" / "transformer__dynamo.onnx.gz"
    model = onnx.load_from_string(gzip.decompress(fixture.read_bytes()))
    _, report = api.compress(model, prune=0.2, method="udfc+", target="fake",
                             moments="sampled")
    comps = [x["compensation"] for x in report.layers if x["compensation"]]
    assert len(comps) == 2 and all(c["compensated"] for c in comps)
