"""How fast this CPU multiplies bf16 against float32, and what widening a bf16 weight costs.

Prints median milliseconds for F.linear on SmolLM2's gate/up shape (576 -> 3072) at several row counts:
float32, native bfloat16, bfloat16 with the weight prepacked for oneDNN (`sidp.model.linear.packed`,
multiplied by oneDNN; only where the CPU multiplies bf16 in hardware), the bf16 weight widened to float32
whole and then multiplied, and sidp.model.linear as the decoder calls it (packed where the CPU has bf16
instructions, and up to 128 rows on sidp's AMX kernel where it has AMX; elsewhere widened in L2-sized
chunks, a single row narrowed to bf16 instead). Writes JSON too.
  python benchmarks/matmul_dtypes.py [--threads N] [--out FILE]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sidp.bench.report import script_args, write_script_report
from sidp.bench.timing import median_ms
from sidp.model.linear import compute_dtype, linear, native_matmul, onednn_linear, packed


def main() -> None:
    args = script_args("matmul_dtypes")
    weight = torch.randn(3072, 576, dtype=torch.bfloat16)
    weight32 = weight.float()
    scratch = torch.empty_like(weight32)
    native = native_matmul(torch.bfloat16)
    weight_packed = packed(weight) if native else None
    sidp_dtype = compute_dtype(torch.bfloat16)
    columns = ("rows", "float32", "bfloat16", "packed", "widened", "sidp")
    print(" ".join(f"{c:>9}" for c in columns) + f"  (ms, {torch.get_num_threads()} threads)")
    rows_out = []
    for rows in (1, 2, 4, 8, 16, 64, 256):
        x = torch.randn(rows, 576, dtype=torch.bfloat16)
        x32 = x.float()
        row = {
            "rows": rows,
            "float32": median_ms(F.linear, x32, weight32),
            "bfloat16": median_ms(F.linear, x, weight),
            "packed": median_ms(onednn_linear, x, weight_packed) if native else None,
            "widened": median_ms(lambda a: F.linear(a, scratch.copy_(weight)), x32),
            "sidp": median_ms(linear, x.to(sidp_dtype), weight_packed if native else weight),
        }
        rows_out.append(row)
        print(" ".join(f"{row[c]:>9.2f}" if row[c] is not None else f"{'-':>9}" for c in columns))
    report = {
        "rows": rows_out,
    }
    write_script_report("matmul_dtypes", args, report)


if __name__ == "__main__":
    main()
