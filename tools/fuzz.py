"""A standing fuzz campaign of ``onnx-udfc compress``: random exporter-style graphs
(:mod:`fuzz_graphs`) under random options, each run through the command line in-process.

Every case ends in one class:

* ``ok``: exit 0, and the output passes the full ONNX checker and runs in ONNX Runtime with the
  original's output shapes and finite values;
* ``refused``: exit 2 with exactly one stderr line ``onnx-udfc: error: ...`` and no file left;
* ``traceback``: an exception escaped, another exit status, or a refusal that printed more than
  one line or left a file behind;
* ``invalid``: exit 0 but the output fails the checker, does not run or changes output shapes;
* ``identity-violated``: ``--prune 0`` (or none), no bits, ``--target fake --method prune``,
  and the outputs differ from the original's beyond 1e-5.

Counts are printed by class, by pattern and by cause; every failing case is saved as
``OUT/case_SEED_I/`` (``model.onnx`` and ``case.json``) and replays with ``--replay DIR``.

    python tools/fuzz.py --cases 1000 --seed 0 --out bench_out/fuzz
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from fuzz_graphs import Case, draw  # noqa: E402  (the one graph generator, shared with the tests)

from onnx_udfc.cli import main as cli_main  # noqa: E402
from onnx_udfc.config import CRITERIA, METHODS, PRESETS, TARGETS  # noqa: E402

CLASSES = ("ok", "refused", "traceback", "invalid", "identity-violated")
FAILURES = ("traceback", "invalid", "identity-violated")
IDENTITY_TOLERANCE = 1e-5
# Values the command line must refuse in one line; drawn now and then instead of a good one.
BAD_VALUES = {"--prune": ["1.0", "-0.1", "nan", "abc"], "--bits": ["1", "9", "x", "4.5"],
              "--round-to": ["0", "-2"], "--budget-flops": ["0", "1.5"],
              "--alpha1": ["-1", "inf"], "--seed": ["-3"], "--block-size": ["1"]}


@dataclass
class Result:
    index: int
    kind: str
    patterns: list[str]
    argv: list[str]
    run_shape: list[int]
    detail: str = ""          # the refusal line, or what failed
    cause: str = ""           # a short signature to group failures by
    seconds: float = 0.0
    extras: dict = field(default_factory=dict)


# -- options -----------------------------------------------------------------------------------
@dataclass
class Options:
    argv: list[str]           # ``compress`` options without the model and ``-o``
    identity: bool            # ratio 0, no bits, fake target, plain pruning
    bad: str                  # a value the command line must refuse ("" when none)


def draw_options(rng: np.random.Generator, input_name: str, run_shape: list[int],
                 dynamic: bool) -> Options:
    """Random ``compress`` options; a few values are bad on purpose."""
    r = rng.random
    opts: dict[str, str | None] = {}
    if r() < 0.6:
        quick = [p for p in PRESETS if p != "max"]  # max inverts the model: seconds a case
        opts["--preset"] = "max" if r() < 0.03 else str(rng.choice(quick))
    if r() < 0.7:
        opts["--target"] = str(rng.choice(list(TARGETS)))
    if r() < 0.6:
        opts["--method"] = str(rng.choice(METHODS))
    if r() < 0.8:
        opts["--prune"] = "0" if r() < 0.25 else f"{rng.uniform(0, 0.6):.3f}"
    if r() < 0.4:
        opts["--bits"] = str(rng.integers(2, 9))
    if r() < 0.25:
        opts["--criterion"] = str(rng.choice(CRITERIA))
    if r() < 0.15:
        opts["--sequential"] = None
    if r() < 0.15:
        opts["--prune-coupled"] = None
    if r() < 0.1:
        opts["--fold-bn"] = None
    if r() < 0.1:
        opts["--round-to"] = str(rng.choice([2, 4]))
    if r() < 0.1:
        opts["--budget-flops"] = f"{rng.uniform(0.4, 0.95):.2f}"
    if r() < 0.15:
        opts["--granularity"] = str(rng.choice(["tensor", "channel"]))
    if r() < 0.1:
        opts["--quantizer"] = str(rng.choice(["paper", "symmetric", "asymmetric"]))
    if r() < 0.1:
        opts["--moments"] = str(rng.choice(["sampled", "propagated"]))
    if r() < 0.2:
        opts["--no-verify"] = None
    asks_identity = r() < 0.15  # keeping the options that must not change the outputs
    if asks_identity:
        opts.update({"--target": "fake", "--method": "prune", "--prune": "0"})
        for flag in ("--bits", "--budget-flops", "--sequential"):
            opts.pop(flag, None)
        if opts.get("--preset") in ("best", "max"):  # they imply --sequential
            opts.pop("--preset")
    bad = ""
    if not asks_identity and r() < 0.1:
        flag = str(rng.choice(list(BAD_VALUES)))
        opts[flag] = str(rng.choice(BAD_VALUES[flag]))
        bad = f"{flag} {opts[flag]}"
    argv = [part for k, v in opts.items() for part in ([k] if v is None else [k, v])]
    if dynamic and r() < 0.6:
        argv += ["--input-shape", f"{input_name}:{'x'.join(map(str, run_shape))}"]
    elif r() < 0.05:  # a shape that contradicts the model or names no input
        argv += ["--input-shape", str(rng.choice([f"{input_name}:1x3", "nope:1x3x8x8",
                                                  f"{input_name}:1x5x8x8"]))]
        bad = " ".join(argv[-2:])
    identity = not bad and opts.get("--method") == "prune" and opts.get("--target") == "fake" \
        and "--bits" not in opts and opts.get("--prune", "0") == "0" \
        and "--budget-flops" not in opts
    return Options(argv, identity, bad)


# -- one case ----------------------------------------------------------------------------------
def _session(source: str | bytes) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _outputs(source: str | bytes, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    return _session(source).run(None, feed)


def _feed(model: onnx.ModelProto, run_shape: list[int]) -> dict[str, np.ndarray]:
    elem = model.graph.input[0].type.tensor_type.elem_type
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    image = np.random.default_rng(1).standard_normal(run_shape).astype(dtype)
    return {model.graph.input[0].name: image}


def _cause(exc: BaseException) -> str:
    """Exception type, the two innermost frames inside the package, and the message's first
    line with numbers and quoted names blanked, so that one bug gives one cause."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "onnx_udfc" in f.filename]
    where = " > ".join(f"{Path(f.filename).stem}.{f.name}" for f in frames[-2:]) or "?"
    return f"{type(exc).__name__} at {where}: {_normalise(str(exc))}"


def _normalise(message: str) -> str:
    first = (message.strip().splitlines() or [""])[0]
    first = re.sub(r"'[^']*'", "'_'", first)
    return re.sub(r"\d+(\.\d+)?", "N", first)[:160]


def check_case(model_path: Path, run_shape: list[int], argv: list[str], out: Path,
               identity: bool) -> tuple[str, str, str]:
    """Run ``compress`` in-process and classify: (class, detail, cause)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = cli_main(["compress", str(model_path), *argv, "-o", str(out)])
        except SystemExit as exc:  # argparse
            code = exc.code
        except Exception as exc:  # the property under test: nothing escapes
            return "traceback", traceback.format_exc(), _cause(exc)
    err = stderr.getvalue().strip().splitlines()
    leftovers = [p.name for p in out.parent.glob(".udfc-*")]
    if code == 2:
        if len(err) == 1 and err[0].startswith("onnx-udfc: error:") and not out.exists() \
                and not leftovers:
            return "refused", err[0], _normalise(err[0].removeprefix("onnx-udfc: error: "))
        left = "left" if out.exists() or leftovers else "absent"
        return "traceback", "\n".join(err[-20:]), \
            f"dirty refusal: {len(err)} stderr lines, output {left}"
    if code != 0:
        return "traceback", "\n".join(err[-20:]), f"exit status {code}"
    return _check_output(model_path, run_shape, out, identity)


def _check_output(model_path: Path, run_shape: list[int], out: Path,
                  identity: bool) -> tuple[str, str, str]:
    if not out.exists():
        return "invalid", "exit 0 without an output file", "no output file"
    original = onnx.load(str(model_path))
    feed = _feed(original, run_shape)
    try:
        onnx.checker.check_model(str(out), full_check=True)
        after = _outputs(str(out), feed)
    except Exception as exc:  # checker and ORT raise several unrelated types
        return "invalid", str(exc)[:2000], f"{type(exc).__name__}: {_normalise(str(exc))}"
    before = _outputs(str(model_path), feed)
    shapes = ([a.shape for a in before], [a.shape for a in after])
    if shapes[0] != shapes[1]:
        return "invalid", f"output shapes {shapes[0]} -> {shapes[1]}", "output shapes changed"
    if not all(np.isfinite(a).all() for a in after):
        return "invalid", "non-finite outputs", "non-finite outputs"
    if identity:
        for a, b in zip(before, after, strict=True):
            worst = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
            if worst > _identity_tolerance(a):
                return "identity-violated", f"max abs difference {worst:.3g}", "outputs changed"
    return "ok", "", ""


def draw_case(seed: int, index: int) -> tuple[Case, Options]:
    """Case ``index`` of campaign ``seed``: the graph and the options."""
    rng = np.random.default_rng([seed, index])
    case = draw(rng)
    return case, draw_options(rng, case.input_name, case.run_shape, case.dynamic)


def _identity_tolerance(reference: np.ndarray) -> float:
    """1e-5, or a few units in the last place of a float16 output (a folded constant may
    round once more)."""
    ulp = float(np.finfo(reference.dtype).eps) * float(np.abs(reference).max(initial=1.0))
    return max(IDENTITY_TOLERANCE, 4 * ulp)


def run_case(index: int, case: Case, options: Options, workdir: Path) -> Result:
    folder = workdir / f"case_{index}"
    folder.mkdir()
    model_path = folder / "model.onnx"
    onnx.save(case.model, str(model_path))
    start = time.perf_counter()
    kind, detail, cause = check_case(model_path, case.run_shape, options.argv,
                                     folder / "out.onnx", options.identity)
    return Result(index, kind, case.patterns, options.argv, case.run_shape, detail, cause,
                  time.perf_counter() - start,
                  {"identity": options.identity, "bad_option": options.bad})


def save_failure(out: Path, seed: int, result: Result, model: onnx.ModelProto) -> Path:
    folder = out / f"case_{seed}_{result.index}"
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "case.json").write_text(json.dumps(asdict(result), indent=1))
    return folder


def replay(folder: Path) -> Result:
    """Run a saved failing case again."""
    saved = json.loads((folder / "case.json").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        kind, detail, cause = check_case(folder / "model.onnx", saved["run_shape"],
                                         saved["argv"], Path(tmp) / "out.onnx",
                                         saved["extras"]["identity"])
    return Result(saved["index"], kind, saved["patterns"], saved["argv"], saved["run_shape"],
                  detail, cause)


# -- the campaign ------------------------------------------------------------------------------
def campaign(cases: int, seed: int, out: Path | None = None, first: int = 0,
             progress: bool = False,
             skip: Callable[[Case, Options], bool] | None = None) -> list[Result]:
    """Run ``cases`` cases from index ``first`` on, leaving out those ``skip`` names (the
    suite's sample leaves out open bugs); failing ones are saved under ``out``."""
    results: list[Result] = []
    index = first
    with tempfile.TemporaryDirectory(prefix="udfc-fuzz-") as tmp:
        while len(results) < cases:
            case, options = draw_case(seed, index)
            if skip is None or not skip(case, options):
                results.append(run_case(index, case, options, Path(tmp)))
                if results[-1].kind in FAILURES and out is not None:
                    save_failure(out, seed, results[-1], case.model)
                if progress and len(results) % 50 == 0:
                    print(f"{len(results)}/{cases} cases", file=sys.stderr, flush=True)
            index += 1
    return results


def summary(results: list[Result]) -> dict:
    by_class = Counter(r.kind for r in results)
    by_pattern: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        for p in r.patterns:
            by_pattern[p][r.kind] += 1
    causes: dict[str, Counter] = defaultdict(Counter)
    for r in results:
        if r.kind == "refused":
            bad = r.extras.get("bad_option")
            causes[f"refused ({'a bad option' if bad else 'valid options'})"][r.cause] += 1
        elif r.kind != "ok":
            causes[r.kind][r.cause] += 1
    return {"cases": len(results), "classes": {k: by_class.get(k, 0) for k in CLASSES},
            "seconds": round(sum(r.seconds for r in results), 1),
            "identity_checked": sum(r.kind != "refused" and r.extras.get("identity", False)
                                    for r in results),
            "patterns": {p: dict(c) for p, c in sorted(by_pattern.items())},
            "causes": {k: dict(c.most_common()) for k, c in causes.items()},
            "bad_option_accepted": dict(Counter(r.extras.get("bad_option") for r in results
                                                if r.kind == "ok" and r.extras.get("bad_option"))),
            "failures": [{"index": r.index, "class": r.kind, "cause": r.cause}
                         for r in results if r.kind in FAILURES]}


def print_summary(s: dict) -> None:
    print(f"{s['cases']} cases in {s['seconds']} s: "
          + ", ".join(f"{k} {v}" for k, v in s["classes"].items())
          + f"; identity checked on {s['identity_checked']}")
    print(f"\n{'pattern':<28}" + "".join(f"{k:>10}" for k in CLASSES))
    for pattern, counts in s["patterns"].items():
        print(f"{pattern:<28}" + "".join(f"{counts.get(k, 0):>10}" for k in CLASSES))
    if s["bad_option_accepted"]:
        print("\nexit 0 despite a bad option: " + ", ".join(
            f"{k} ({v})" for k, v in s["bad_option_accepted"].items()))
    for kind, causes in s["causes"].items():
        print(f"\n{kind} by cause:")
        for cause, n in list(causes.items())[:25]:
            print(f"{n:>6}  {cause}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--first", type=int, default=0, help="index of the first case")
    parser.add_argument("--out", type=Path, default=Path("bench_out/fuzz"),
                        help="failing cases and summary.json go here")
    parser.add_argument("--replay", type=Path, metavar="DIR", help="rerun one saved case")
    args = parser.parse_args(argv)
    if args.replay:
        result = replay(args.replay)
        print(f"{result.kind}: {result.cause}\n{result.detail}")
        return 0 if result.kind not in FAILURES else 1
    args.out.mkdir(parents=True, exist_ok=True)
    s = summary(campaign(args.cases, args.seed, args.out, args.first, progress=True))
    (args.out / "summary.json").write_text(json.dumps(s, indent=1))
    print_summary(s)
    return 0 if not s["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
