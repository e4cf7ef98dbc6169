"""sidp's AMX products against oneDNN's, on packed bf16 weights as a decode step meets them.

A step runs SmolLM2's four projections through 30 layers of distinct weights (212 MB in bf16, too much
for any cache), so each product reads its weight from memory: the median milliseconds of such a step,
for several row counts, through oneDNN (`mkldnn::_linear_pointwise`, what `sidp.model.linear.linear`
called before) and through `linear` (sidp's tile kernel up to AMX_MAX_ROWS rows, oneDNN above). The
two alternate, twice each, so that a noisy host shows in the spread. Writes JSON.
  python benchmarks/matmul_amx.py [--threads N] [--out FILE]
"""

from __future__ import annotations

import sys

import torch

from sidp.bench.report import script_args, write_script_report
from sidp.bench.timing import median_ms
from sidp.model import linear

SHAPES = {"qkv": (960, 576), "o": (576, 576), "gate_up": (3072, 576), "down": (576, 1536)}  # SmolLM2's
LAYERS = 30


def step_ms(weights: list[dict], rows: int, product, repeats: int = 11, dtype=torch.bfloat16) -> float:
    """Median ms of one step: every layer's four products on `rows` rows."""
    xs = {name: torch.randn(rows, k, dtype=dtype) for name, (_, k) in SHAPES.items()}

    def step():
        for layer in weights:
            for name, weight in layer.items():
                product(xs[name], weight)

    step()
    step()  # median_ms warms up once more
    return median_ms(step, repeats=repeats)


def read_ms(plain: list[dict]) -> float:
    """Median ms of reading every weight of the step once (a sum over its bytes): the memory's floor."""
    flat = [w.view(-1).view(torch.float32) for layer in plain for w in layer.values()]
    return median_ms(lambda: [w.sum() for w in flat], repeats=11)


def call_us(product) -> float:
    """Median us of one row through a 32x32 packed weight: what a call costs beside its arithmetic."""
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    weight = linear.packed(torch.randn(32, 32, dtype=torch.bfloat16))
    return median_ms(product, x, weight, repeats=2000) * 1e3


def main() -> None:
    args = script_args("matmul_amx")
    if not linear.on_amx_tiles(linear.packed(torch.zeros(SHAPES["o"], dtype=torch.bfloat16))):
        sys.exit("this CPU (or SIDP_CPU_ISA) runs no AMX path: nothing to compare")
    torch.manual_seed(0)
    plain = [{n: torch.randn(s, dtype=torch.bfloat16) for n, s in SHAPES.items()} for _ in range(LAYERS)]
    weights = [{name: linear.packed(w) for name, w in layer.items()} for layer in plain]
    floor = read_ms(plain)
    calls = {"onednn_us": call_us(linear.onednn_linear), "sidp_us": call_us(linear.linear)}
    print(
        f"reading the step's weights: {floor:.2f} ms; one call on a 32x32 weight: "
        f"oneDNN {calls['onednn_us']:.1f} us, sidp {calls['sidp_us']:.1f} us"
    )
    print(f"{'rows':>5} {'oneDNN ms':>18} {'sidp ms':>18} {'ratio':>6}  ({args.threads} threads)")
    rows_out = []
    for rows in (1, 8, 32, 64, 128, 256):
        runs = {"onednn_ms": [], "sidp_ms": []}
        for _ in range(2):
            runs["onednn_ms"].append(step_ms(weights, rows, linear.onednn_linear))
            runs["sidp_ms"].append(step_ms(weights, rows, linear.linear))
        row = {"rows": rows, **runs, "ratio": min(runs["sidp_ms"]) / min(runs["onednn_ms"])}
        rows_out.append(row)
        print(
            f"{rows:>5} {' '.join(f'{t:8.2f}' for t in runs['onednn_ms']):>18} "
            f"{' '.join(f'{t:8.2f}' for t in runs['sidp_ms']):>18} {row['ratio']:>6.2f}"
        )
    report = {
        "amx_max_rows": linear.AMX_MAX_ROWS,
        "read_ms": floor,
        "call_on_32x32": calls,
        "layers": LAYERS,
        "shapes": SHAPES,
        "rows": rows_out,
    }
    write_script_report("matmul_amx", args, report)


if __name__ == "__main__":
    main()
