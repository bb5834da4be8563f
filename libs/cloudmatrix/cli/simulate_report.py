"""`cmx simulate --paper | --validate | --sensitivity`: the simulator against the paper's rows,
printed for a reader and returned as JSON (docs/simulator.md)."""
from __future__ import annotations

from cloudmatrix.simulator.calibration import CONSTANTS, FITTED
from cloudmatrix.simulator.paper import BATCH_GRID, BOUND, Row, median_abs_error, paper_rows, slo_batches
from cloudmatrix.simulator.validation import bands, leave_one_out, ranges, split_errors
from cloudmatrix.simulator.validation import sensitivity as sensitivity_of
from cloudmatrix.simulator.validation import validate as validated


def paper(with_bands: bool = False) -> dict:
    rows = paper_rows()
    band = bands(ranges(FITTED, leave_one_out())) if with_bands else {}
    _print_rows(rows, band)
    batches = slo_batches()
    _print_batches(batches)
    errors = split_errors(rows)
    print(f"\nheld out: {errors['held_out_within']} of {errors['held_out']} within +-{BOUND:.0%}, median absolute "
          f"error {errors['held_out_median_abs_error']:.1%}, largest {errors['held_out_max_abs_error']:.1%}; "
          f"training: median {errors['train_median_abs_error']:.1%} (`cmx simulate --validate` for the calibration)")
    return {"rows": [r.as_dict() | ({"band": band[r.key]} if band else {}) for r in rows], "slo_batches": batches,
            "median_abs_error": median_abs_error(rows), "errors": errors,
            "calibration": FITTED.values()}


def validate() -> dict:
    report = validated()
    print("pre-registered constants (simulator/calibration.py), fitted on the training rows only:")
    for c in report["constants"]:
        low, high = c["range"]
        print(f"  {c['name']:<15} {_value(c['fitted'], c['unit'])} in [{_value(c['low'], c['unit'])}, "
              f"{_value(c['high'], c['unit'])}]; leave-one-out range {_value(low, c['unit'])} to "
              f"{_value(high, c['unit'])}")
        print(f"  {'':<15} {c['meaning']}; bounds: {c['bounds']}")
    refit = report["refit_from_prior"]
    print("refit from the prior: " + ", ".join(f"{k} {v:.4g}" for k, v in refit.items()))
    print(f"training rows: {', '.join(report['training'])}\n")
    rows = [Row(**{k: r[k] for k in Row.__dataclass_fields__}) for r in report["rows"]]
    _print_rows(rows, {r["key"]: tuple(r["band"]) for r in report["rows"]})
    print("\nleave-one-out (each training row predicted by the constants fitted on the other three):")
    for key, loo in report["leave_one_out"].items():
        print(f"  {key:<20} {loo['error']:+.1%}")
    _print_batches(report["slo_batches"])
    e = report["errors"]
    print(f"\nheld out: {e['held_out_within']} of {e['held_out']} within +-{BOUND:.0%}, median absolute error "
          f"{e['held_out_median_abs_error']:.1%}, largest {e['held_out_max_abs_error']:.1%}; training median "
          f"{e['train_median_abs_error']:.1%}")
    return report


def sensitivity() -> dict:
    table = sensitivity_of()
    keys = list(next(iter(table.values())))
    print("each row's change with one constant at its lower / upper bound (the others as fitted):")
    print(f"{'row':<20} " + " ".join(f"{c.name:>23}" for c in CONSTANTS))
    for key in keys:
        print(f"{key:<20} " + " ".join(f"{table[c.name][key][0]:>+11.1%}/{table[c.name][key][1]:<+11.1%}"
                                       for c in CONSTANTS))
    return {name: {k: {"at_low": v[0], "at_high": v[1]} for k, v in rows.items()} for name, rows in table.items()}


def _print_rows(rows: list[Row], band: dict[str, tuple[float, float]]) -> None:
    print(f"{'table':<14} {'row':<44} {'metric':<22} {'paper':>9} {'model':>9} {'error':>8}  {'split':<9} bound"
          + ("  band" if band else ""))
    for r in rows:
        verdict = "-" if r.bound is None else f"+-{r.bound:.0%} {'ok' if r.within else 'MISSED'}"
        low_high = f"  {_figure(band[r.key][0])} - {_figure(band[r.key][1])}" if band else ""
        print(f"{r.table:<14} {r.label:<44} {r.metric:<22} {_figure(r.paper):>9} {_figure(r.predicted):>9} "
              f"{r.error:>+8.1%}  {r.split:<9} {verdict}{low_high}")
        if "tokens_per_s_per_npu" in r.shown:
            print(f"{'':<14}   tokens/s per NPU: paper {r.shown['paper_tokens_per_s_per_npu']:,.0f}, model "
                  f"{r.shown['tokens_per_s_per_npu']:,.0f} ({r.shown['microbatches']} microbatch(es))")


def _print_batches(batches: list[dict]) -> None:
    print(f"\nlargest batch within each TPOT SLO (sizes tried: multiples of {BATCH_GRID} per NPU; the model "
          f"chooses one or two microbatches):")
    for b in batches:
        found = (f"batch {b['predicted_batch_per_npu']} (TPOT {b['predicted_tpot_ms']:.1f} ms, "
                 f"{b['predicted_tokens_per_s_per_npu']:,.0f} tokens/s per NPU, "
                 f"{b['predicted_microbatches']} microbatch(es))") if b["predicted_tpot_ms"] \
            else f"no batch of {BATCH_GRID} or more meets it"
        verdict = "matches" if b["matches"] else "MISSED"
        print(f"  SLO {b['slo_ms']} ms, {b['prompt']}/{b['output']}: paper batch {b['paper_batch_per_npu']}, "
              f"model {found}: {verdict}")


def _value(v: float, unit: str) -> str:
    return f"{v * 1e6:.2f} us" if unit == "s" else f"{v:.3f}"


def _figure(value: float) -> str:
    return f"{value:,.3f}" if value < 10 else f"{value:,.1f}"
