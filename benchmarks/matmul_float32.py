"""float32 products as a decode step meets them: MKL on plain weights against oneDNN on packed ones.

PyTorch sends a float32 F.linear to MKL. On the AMD EPYC this was written on, oneDNN multiplied the same
products faster from a weight packed once (`torch.ops.mkldnn._reorder_linear_weight`), so sidp packs
float32 weights there (`sidp.model.linear.packs`). Measured as benchmarks/matmul_amx.py measures a step:
SmolLM2's four projections through 30 layers of distinct weights (425 MB in float32), and its LM head
(49,152 x 576, 113 MB) apart, for several row counts; the two routes alternate, twice each. Writes JSON.
  python benchmarks/matmul_float32.py [--threads N] [--out FILE]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from matmul_amx import LAYERS, SHAPES, step_ms

from sidp.bench.report import script_args, write_script_report
from sidp.bench.timing import median_ms
from sidp.model import linear

LM_HEAD = (49152, 576)  # SmolLM2's (tied) head


def main() -> None:
    args = script_args("matmul_float32")
    torch.manual_seed(0)
    pack = torch.ops.mkldnn._reorder_linear_weight
    plain = [{n: torch.randn(s) for n, s in SHAPES.items()} for _ in range(LAYERS)]
    onednn = [{n: pack(w, None) for n, w in layer.items()} for layer in plain]
    head = torch.randn(LM_HEAD)
    head_packed = pack(head, None)
    routes = {"mkl": (F.linear, plain, head), "onednn": (linear.onednn_linear, onednn, head_packed)}
    print(
        f"{'rows':>5} {'MKL step ms':>18} {'oneDNN step ms':>18} {'MKL head ms':>18} {'oneDNN head ms':>18}"
    )
    rows_out = []
    for rows in (1, 8, 32, 64, 128, 256):
        x = torch.randn(rows, LM_HEAD[1])
        row = {"rows": rows, **{f"{r}_{part}_ms": [] for part in ("step", "head") for r in routes}}
        for _ in range(2):
            for name, (product, weights, head_weight) in routes.items():
                row[f"{name}_step_ms"].append(step_ms(weights, rows, product, dtype=torch.float32))
                row[f"{name}_head_ms"].append(median_ms(product, x, head_weight, repeats=11))
        rows_out.append(row)
        cells = [" ".join(f"{t:8.2f}" for t in row[k]) for k in list(row)[1:]]
        print(f"{rows:>5} " + " ".join(f"{c:>18}" for c in cells))
    report = {
        "sidp_packs_float32": linear.packs(torch.float32),
        "layers": LAYERS,
        "shapes": {**SHAPES, "lm_head": LM_HEAD},
        "rows": rows_out,
    }
    write_script_report("matmul_float32", args, report)


if __name__ == "__main__":
    main()
