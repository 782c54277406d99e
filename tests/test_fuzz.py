"""A fixed-seed sample of the fuzz campaign (``tools/fuzz.py``): exporter-style graphs under
random options never raise, never write an invalid model, and ratio 0 stays the identity.
The campaign itself (1000+ graphs) is a tool run."""

from __future__ import annotations

from tests.helpers import tool_module

fuzz = tool_module("fuzz")

SEED = 15
SAMPLE = 40

def test_fixed_seed_sample_has_no_traceback_invalid_output_or_identity_change():
    results = fuzz.campaign(SAMPLE, SEED)
    failures = [f"case {r.index}: {r.kind}: {r.cause}\n  argv {r.argv}\n  patterns {r.patterns}"
                f"\n  replay: python tools/fuzz.py --seed {SEED} --first {r.index} --cases 1"
                for r in results if r.kind in fuzz.FAILURES]
    assert not failures, "\n".join(failures)
    kinds = {r.kind for r in results}
    assert {"ok", "refused"} <= kinds, kinds
    assert any(r.extras["identity"] and r.kind == "ok" for r in results)


def test_bad_values_and_destinations_are_classed_as_refusals(tmp_path):
    case, options = fuzz.draw_case(SEED, 0)
    model = tmp_path / "model.onnx"
    model.write_bytes(case.model.SerializeToString())
    kind, detail, _ = fuzz.check_case(model, case.run_shape, ["--prune", "1.5"],
                                      tmp_path / "out.onnx", identity=False)
    assert (kind, detail) == ("refused", "onnx-udfc: error: pruning ratio 1.5 is outside [0, 1)")
    kind, _, cause = fuzz.check_case(model, case.run_shape, ["--prune", "0.3"],
                                     tmp_path / "missing" / "out.onnx", identity=False)
    assert kind == "refused", cause
