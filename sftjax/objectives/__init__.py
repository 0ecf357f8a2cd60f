"""Training objectives: each a loss over the same model (sft now; reward, dpo, distill later)."""
