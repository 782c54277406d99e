"""Coverage benchmark over the zoo written by ``tools/make_zoo.py``.

For every model of the zoo's ``manifest.json`` (torch-free; runs on the committed fixtures too):

* analysis: channels, share prunable under the default policy (residual / gate-coupled groups
  left alone, as in the paper) and with ``--prune-coupled``, what stays fixed and why;
* ratio 0: the output must equal the original's (max abs diff reported, must be < 1e-5);
* 50 % pruning: params and FLOPs before/after (plain pruning, default policy);
* 30 % pruning + 6-bit ``udfc`` (``api.compress(path, target="fake", prune=0.3,
  method="udfc", bits=6)``)
  against the original on random N(0, 1) inputs: cosine, top-1 agreement, max abs error
  (also relative to the largest reference output), and the same for plain pruning + plain
  6-bit round-to-nearest (``method="prune"``) as the uncompensated baseline; how many pruned /
  quantized layers were compensated, and why the others were not.

Every compressed model passed the full ``onnx.checker`` inside ``api.compress`` and ran in ONNX
Runtime here. Usage::

    python tools/bench_zoo.py                                  # bench_out/zoo -> table + JSON
    python tools/bench_zoo.py --zoo tests/fixtures/zoo --samples 8
    python tools/bench_zoo.py --only resnet50,transformer --json out.json --md out.md
    python tools/bench_zoo.py --no-scale-through-curved        # activation policy variants
    python tools/bench_zoo.py --no-prune-through-curved
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from onnx_udfc import api  # noqa: E402
from onnx_udfc.channels import absorbers as compensate  # noqa: E402
from onnx_udfc.core import ort as V  # noqa: E402
from onnx_udfc.core.io import graph_inputs  # noqa: E402
from onnx_udfc.report.verify import compare  # noqa: E402

# The settings these figures were measured with (before presets): plain pruning, float weights
# unless bits are given, the paper's grid per tensor.
PLAIN = {"target": "fake", "method": "prune"}


def load(path: Path) -> onnx.ModelProto:
    """A zoo file: plain ``.onnx`` or gzipped ``.onnx.gz`` (light skeletons are materialised)."""
    if path.suffix == ".gz":
        model = onnx.load_from_string(gzip.decompress(path.read_bytes()))
    else:
        model = api.load(str(path))
    if any(n.op_type == "ConstantOfShape" for n in model.graph.node) and \
            path.name.startswith("light_"):
        from zoo_light import materialise

        model = materialise(model)
    return model


def feeds(model: onnx.ModelProto, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` random samples: one batch when the batch axis is dynamic, else one run each."""
    inputs = graph_inputs(model)
    dims0 = [i.type.tensor_type.shape.dim[0] for i in inputs]
    if all(not d.HasField("dim_value") for d in dims0):
        return [V.make_inputs(model, batch=n, seed=seed)[0]]
    return [V.make_inputs(model, batch=1, seed=seed + k)[0] for k in range(n)]


def run_all(model: onnx.ModelProto, samples: list[dict]) -> list[np.ndarray]:
    sess = V.session(model, optimize=False)
    outs = [sess.run(None, f) for f in samples]
    return [np.concatenate([o[i] for o in outs]) for i in range(len(outs[0]))]


def fidelity(ref: list[np.ndarray], got: list[np.ndarray]) -> dict[str, float | None]:
    f = compare(ref[:1], got[:1], ["out"])[0]
    scale = float(np.abs(ref[0]).max()) or 1.0
    return {"cosine": f.cosine, "top1": f.top1_agreement, "max_abs": f.max_abs,
            "max_rel": f.max_abs / scale}


def short(reason: str) -> str:
    """A fixed-channel reason without node names, for counting."""
    reason = re.sub(r" at '[^']*'$", "", reason)
    reason = re.sub(r"'[^']*'", "'…'", reason)
    return reason


def compensation_summary(report) -> dict[str, Any]:
    pruned = [x["compensation"] for x in report.layers if x.get("compensation")]
    quant = [x["quantization"] for x in report.layers if x.get("quantization")]
    why_p = collections.Counter(short(c.get("reason", "")) for c in pruned
                                if not c["compensated"])
    why_q = collections.Counter(short(q.get("reason", "")) for q in quant
                                if not q["scale_compensated"])
    approx = collections.Counter(", ".join(c["activations"]) for c in pruned
                                 if c.get("compensated") and c.get("activations"))
    return {"pruned_layers": len(pruned),
            "pruned_compensated": sum(bool(c["compensated"]) for c in pruned),
            "pruned_not_why": dict(why_p.most_common()),
            "pruned_through": dict(approx.most_common()),
            "quant_layers": len(quant),
            "quant_compensated": sum(bool(q["scale_compensated"]) for q in quant),
            "quant_not_why": dict(why_q.most_common())}


def bench(path: Path, entry: dict, args) -> dict[str, Any]:
    t0 = time.perf_counter()
    model = load(path)
    out: dict[str, Any] = {"file": path.name, "arch": entry.get("arch", path.stem),
                           "variant": entry.get("variant", ""),
                           "exporter": entry.get("exporter", "")}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    api.normalize(m)
    a = api.analyse(m)
    groups = a.groups
    out["channels"] = int(sum(g.size for g in groups))
    out["prunable_default"] = int(sum(g.prunable for g in groups if not g.coupled))
    out["prunable_coupled"] = int(sum(g.prunable for g in groups))
    fixed = collections.Counter()
    for g in groups:
        for reason in g.fixed.values():
            fixed[short(reason)] += 1
        if g.coupled and g.prunable:
            fixed["coupled (residual Add / gate Mul): pruned only with --prune-coupled"] += \
                g.prunable
    out["fixed"] = dict(fixed.most_common())
    out["unsupported"] = dict(collections.Counter(short(r) for _, r in
                                                  a.channels.unsupported).most_common())
    del m, a

    samples = feeds(model, args.samples, args.seed)
    ref = run_all(model, samples)
    m0, _ = api.compress(model, **PLAIN, prune=0.0)
    out["ratio0_max_abs"] = float(max(np.abs(x - y).max() for x, y in
                                      zip(ref, run_all(m0, samples), strict=True)))
    del m0
    m50, r50 = api.compress(model, **PLAIN, prune=0.5, prune_coupled=args.prune_coupled)
    run_all(m50, samples[:1])  # must run
    out.update(params_before=r50.params_before, params_after=r50.params_after,
               flops_before=r50.flops_before, flops_after=r50.flops_after)
    del m50
    mq, rq = api.compress(model, **PLAIN, prune=0.3, method="udfc", bits=6,
                          prune_coupled=args.prune_coupled)
    out["udfc_30_6bit"] = fidelity(ref, run_all(mq, samples))
    out["compensation"] = compensation_summary(rq)
    out["flops_30"] = rq.flops_after
    del mq
    mp, _ = api.compress(model, **PLAIN, prune=0.3, bits=6,
                         prune_coupled=args.prune_coupled)
    out["plain_30_6bit"] = fidelity(ref, run_all(mp, samples))
    del mp
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def pct(a: float, b: float) -> str:
    return f"{100.0 * a / b:.0f}%" if b else "-"


def human(n: float) -> str:
    for unit, k in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= k:
            return f"{n / k:.1f}{unit}"
    return f"{n:.0f}"


def table(rows: list[dict]) -> str:
    head = ("| model | export | prunable channels (default / coupled too) | params 50 % | "
            "FLOPs 50 % | 30 % + 6-bit udfc: cos / top-1 / max abs (rel) | plain: cos / top-1 | "
            "compensated (pruned, quant) | ratio 0 |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        q, p, c = r["udfc_30_6bit"], r["plain_30_6bit"], r["compensation"]
        top1 = f"{q['top1']:.2f}" if q["top1"] is not None else "-"
        ptop1 = f"{p['top1']:.2f}" if p["top1"] is not None else "-"
        lines.append(
            f"| {r['arch']} | {r['variant']} | "
            f"{pct(r['prunable_default'], r['channels'])} / "
            f"{pct(r['prunable_coupled'], r['channels'])} of {r['channels']} | "
            f"{human(r['params_before'])} -> {human(r['params_after'])} | "
            f"{human(r['flops_before'])} -> {human(r['flops_after'])} | "
            f"{q['cosine']:.4f} / {top1} / {q['max_abs']:.3g} ({q['max_rel']:.2g}) | "
            f"{p['cosine']:.4f} / {ptop1} | "
            f"{c['pruned_compensated']}/{c['pruned_layers']}, "
            f"{c['quant_compensated']}/{c['quant_layers']} | "
            f"{'ok' if r['ratio0_max_abs'] < 1e-5 else r['ratio0_max_abs']} |")
    return "\n".join(lines)


def reasons(rows: list[dict]) -> str:
    """Per architecture: what stays fixed and why (first variant seen), as a list."""
    seen, lines = set(), []
    for r in rows:
        key = (r["arch"], r["variant"])
        if r["arch"] in seen and not r["variant"].startswith("dynamo_bn"):
            continue
        seen.add(r["arch"])
        fixed = "; ".join(f"{n}x {why}" for why, n in r["fixed"].items()) or "nothing"
        lines.append(f"- **{key[0]}** ({key[1]}): {fixed}")
        c = r["compensation"]
        if c["pruned_not_why"]:
            lines.append("  - pruned, not compensated: " + "; ".join(
                f"{n}x {w}" for w, n in c["pruned_not_why"].items()))
        if c["pruned_through"]:
            lines.append("  - compensated through curved activations: " + "; ".join(
                f"{n}x {w}" for w, n in c["pruned_through"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", type=Path, default=ROOT / "bench_out" / "zoo")
    ap.add_argument("--only", default="", help="comma-separated architecture names")
    ap.add_argument("--skip", default="", help="comma-separated architecture names")
    ap.add_argument("--variants", default="", help="comma-separated export variants")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prune-coupled", action="store_true")
    ap.add_argument("--no-scale-through-curved", action="store_true",
                    help="no Eq. 21 scale through ReLU-like curved activations")
    ap.add_argument("--no-prune-through-curved", action="store_true",
                    help="no pruning reconstruction through non-homogeneous activations")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--md", type=Path, default=None)
    ap.add_argument("--update", action="store_true",
                    help="replace only the benched rows of an existing --json file")
    args = ap.parse_args(argv)
    compensate.SCALE_THROUGH_CURVED = not args.no_scale_through_curved
    compensate.PRUNE_THROUGH_CURVED = not args.no_prune_through_curved
    manifest = json.loads((args.zoo / "manifest.json").read_text())
    only = {s for s in args.only.split(",") if s}
    skip = {s for s in args.skip.split(",") if s}
    variants = {s for s in args.variants.split(",") if s}
    rows = []
    for entry in manifest:
        if (only and entry["arch"] not in only) or entry["arch"] in skip or \
                (variants and entry["variant"] not in variants):
            continue
        path = args.zoo / entry["file"]
        try:
            row = bench(path, entry, args)
        except Exception as exc:  # a failure is a finding: report it, go on
            row = {"file": entry["file"], "arch": entry["arch"], "error": repr(exc)[:300]}
            print(f"{entry['file']}: ERROR {row['error']}", flush=True)
            rows.append(row)
            continue
        rows.append(row)
        q = row["udfc_30_6bit"]
        print(f"{entry['file']}: prunable {row['prunable_default']}/{row['channels']}, "
              f"FLOPs 50% {row['flops_after'] / row['flops_before']:.2f}, "
              f"udfc cos {q['cosine']:.4f}, plain cos {row['plain_30_6bit']['cosine']:.4f}, "
              f"{row['seconds']} s", flush=True)
    if args.update and args.json and args.json.is_file():
        fresh = {r["file"]: r for r in rows}
        old = json.loads(args.json.read_text())
        rows = [fresh.pop(r["file"], r) for r in old] + list(fresh.values())
    good = [r for r in rows if "error" not in r]
    text = table(good) + "\n\n" + reasons(good) + "\n"
    bad = [r for r in rows if "error" in r]
    if bad:
        text += "\nErrors:\n" + "\n".join(f"- {r['file']}: {r['error']}" for r in bad) + "\n"
    print(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.md:
        args.md.write_text(text)
    return 1 if bad or any(r["ratio0_max_abs"] >= 1e-5 for r in good) else 0


if __name__ == "__main__":
    raise SystemExit(main())

