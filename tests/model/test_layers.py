"""The hand-written backward passes of `linear` and `gated_activation` equal autodiff of the plain expressions.

Both compute the same products as autodiff, arranged differently, so float32 results agree to 1e-6 relative
(summation order of the flattened weight-gradient dot); with bfloat16 inputs to bf16 rounding (2e-2 relative).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sftjax.model.layers import activation, gated_activation, linear


def _normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape).astype(dtype)


@pytest.mark.parametrize("x_shape", [(7, 12), (3, 5, 12), (2, 3, 4, 12)])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2e-2)])
def test_linear_gradients_equal_autodiff(x_shape, dtype, rtol):
    x, w = _normal(0, x_shape, dtype), _normal(1, (12, 9), dtype)
    probe = _normal(2, (*x_shape[:-1], 9))  # a random cotangent, so every output element matters

    def loss(matmul):
        return lambda x, w: jnp.sum(matmul(x, w).astype(jnp.float32) * probe)

    value, grads = jax.value_and_grad(loss(linear), argnums=(0, 1))(x, w)
    ref_value, ref_grads = jax.value_and_grad(loss(jnp.dot), argnums=(0, 1))(x, w)
    np.testing.assert_allclose(value, ref_value, rtol=rtol)
    for ours, ref in zip(grads, ref_grads):
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        scale = float(jnp.abs(ref.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=0,
                                   atol=rtol * scale)


def test_linear_inside_jit_scan_and_remat():
    """The layer stack's setting: weights sliced by a scan, the body rematerialised."""
    xs, ws = _normal(0, (2, 6, 8)), _normal(1, (3, 8, 8))

    def stack(matmul):
        body = jax.checkpoint(lambda x, w: (jnp.tanh(matmul(x, w)), None))
        return jax.jit(jax.grad(lambda ws, xs: jnp.sum(jax.lax.scan(body, xs, ws)[0] ** 2)))

    np.testing.assert_allclose(stack(linear)(ws, xs), stack(jnp.dot)(ws, xs), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["silu", "gelu", "gelu_pytorch_tanh", "relu"])
def test_gated_activation_gradients_equal_autodiff(name):
    gate, up, probe = 3 * _normal(0, (2, 5, 16)), _normal(1, (2, 5, 16)), _normal(2, (2, 5, 16))

    def loss(glu):
        return lambda gate, up: jnp.sum(glu(gate, up) * probe)

    ours = jax.grad(loss(lambda g, u: gated_activation(name, g, u)), argnums=(0, 1))(gate, up)
    ref = jax.grad(loss(lambda g, u: activation(name, g) * u), argnums=(0, 1))(gate, up)
    for a, b in zip(ours, ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
