"""Test-wide settings.

Parity tests compare float32 results with transformers (torch). XLA on CPU may run float32 matmuls at reduced
precision by default, so every test forces the highest matmul precision: differences then come from summation
order alone, and the stated tolerances hold.
"""

import jax

jax.config.update("jax_default_matmul_precision", "highest")
