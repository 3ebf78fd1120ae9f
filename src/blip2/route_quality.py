"""How far each CPU route's outputs are from fp32's: the table that bounds what `dtype="auto"` may pick (routes.py).

Measured by `python bench/quality.py --full-bf16` and `python bench/quality.py --routes int8,int8-activations` on
the full-size blip2-opt-2.7b architecture with random weights (4 images x 4 prompts, 164 positions teacher-forced,
20 greedy tokens each; `bench/results/quality_bf16_int8.json`, `quality_int8_int8_activations.json`) and written here
by `python bench/quality.py --table-from` with both files (the later file's int8 replaces the earlier one's).
Quality does not depend on the machine (the same arithmetic, up to the order of sums), so the table ships with the
package; speed does, and routes.py measures it on the running machine.

Routes, by the arithmetic they run:
- `fp32`: the reference's (token-identical to `transformers` in fp32, tests/test_parity.py);
- `bf16`: bf16 weights and activations on PyTorch's bf16 kernels, the arithmetic of `transformers` in bf16: the
  yardstick;
- `bf16-fp32-sums`: bf16 weights and activations, products with many positions summed in fp32 on widened weights
  (`quant.bf16_sums_in_fp32`);
- `int8`: int8 language-model weights (`_weight_int8pack_mm` for decoding, fp32 on widened weights for prefill),
  bf16-stored vision weights multiplied in fp32;
- `int8-activations`: int8 weights in every linear layer of the language model and the vision encoder, activations
  quantized to int8 per position with outliers above 6 multiplied in fp32 (`quant._int8_activations_mm`).

`dtype="auto"` may pick a route only if its top-1 agreement with fp32 is at least the yardstick's. A route not in
the table (int8 with a bf16 vision encoder) is never picked.
"""

from __future__ import annotations

SOURCE = "python bench/quality.py --full-bf16; python bench/quality.py --routes int8,int8-activations"
YARDSTICK = "bf16"

# route: largest |logit - fp32 logit| / largest |fp32 logit|, share of positions where fp32's next token is the
# route's, share of the 4 greedy 20-token outputs identical to fp32's
QUALITY: dict[str, dict[str, float]] = {
    "fp32": {"max_relative_deviation": 0.0, "top1_agreement": 1.0, "greedy_identical_share": 1.0},
    "bf16": {"max_relative_deviation": 0.0183, "top1_agreement": 0.9268, "greedy_identical_share": 0.5},
    "bf16-fp32-sums": {"max_relative_deviation": 0.0153, "top1_agreement": 0.9024, "greedy_identical_share": 0.75},
    "int8": {"max_relative_deviation": 0.0318, "top1_agreement": 0.8415, "greedy_identical_share": 0.0},
    "int8-activations": {"max_relative_deviation": 0.0442, "top1_agreement": 0.8537, "greedy_identical_share": 0.0},
}


def allowed(route: str, table: dict[str, dict[str, float]] = QUALITY) -> bool:
    """Whether `dtype="auto"` may pick `route`: measured, and agreeing with fp32 at least as often as bf16 does."""
    return route in table and table[route]["top1_agreement"] >= table[YARDSTICK]["top1_agreement"]
