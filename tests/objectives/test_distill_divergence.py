"""The divergences of knowledge distillation against TRL's `GKDTrainer.generalized_jsd_loss` and a float64 numpy
implementation of the formulas, and their properties (zero on identical logits, non-negative, finite values and
gradients when probabilities underflow).

Tolerances: divergences are O(1) here (unit-normal logits, V = 50: 0.02 to ~3); float32 against TRL (torch
float32) and against float64 numpy: absolute 1e-6 (float32 rounding only), and the same for the gradients w.r.t.
the student logits against torch autograd. With a logit of +1e4 reverse KL reaches ~1e4: relative 1e-6 there.
Identical logits: <= 1e-6.
"""

import os

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental warns on import otherwise

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from trl.experimental.gkd.gkd_trainer import GKDTrainer  # noqa: E402

from sftjax.objectives.distill import DIVERGENCES, divergence  # noqa: E402

ATOL = 1e-6
B, T, V = 3, 5, 50
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (1.0, 0.9, 2.0)


def _logits(seed, shape=(B, T, V), scale=1.0):
    """(student, teacher) float32 logits, O(1) divergences between them."""
    rng = np.random.RandomState(seed)
    return (scale * rng.randn(*shape)).astype(np.float32), (scale * rng.randn(*shape)).astype(np.float32)


def _labels(seed):
    """[B, T] labels with -100 (ignored) at a few positions, at least one kept."""
    rng = np.random.RandomState(100 + seed)
    labels = rng.randint(0, V, (B, T))
    labels[rng.rand(B, T) < 0.3] = -100
    labels[0, -1] = 1
    return labels


def _log_softmax64(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _numpy_divergence(student, teacher, kind, beta=0.5, temperature=1.0):
    """The module docstring's formulas in float64, written independently of the JAX code."""
    log_s, log_t = _log_softmax64(student / temperature), _log_softmax64(teacher / temperature)
    p_s, p_t = np.exp(log_s), np.exp(log_t)
    kl = lambda p, log_p, log_q: np.sum(p * (log_p - log_q), axis=-1)  # noqa: E731
    if kind == "forward_kl" or (kind == "jsd" and beta == 0):  # TRL's endpoints (the formula gives 0 there)
        return kl(p_t, log_t, log_s)
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1):
        return kl(p_s, log_s, log_t)
    log_m = np.logaddexp(np.log(beta) + log_t, np.log(1 - beta) + log_s)  # log(beta p_t + (1 - beta) p_s)
    return beta * kl(p_t, log_t, log_m) + (1 - beta) * kl(p_s, log_s, log_m)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jsd_matches_trl(seed, beta, temperature):
    """Sum over unmasked positions / their count == TRL's generalized_jsd_loss(reduction="batchmean")."""
    student, teacher, labels = *_logits(seed), _labels(seed)
    ref = GKDTrainer.generalized_jsd_loss(torch.from_numpy(student), torch.from_numpy(teacher),
                                          labels=torch.from_numpy(labels), beta=beta, temperature=temperature,
                                          reduction="batchmean").item()
    mask = labels != -100
    per_position = np.asarray(divergence(jnp.asarray(student), jnp.asarray(teacher), "jsd", beta, temperature))
    assert per_position.shape == (B, T) and per_position.dtype == np.float32
    ours = per_position[mask].sum() / mask.sum()
    assert 0.01 < ref < 10  # O(1) (the smallest, beta 0.1 at temperature 2, ~0.02)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=ATOL)


@pytest.mark.parametrize("beta", BETAS)
def test_gradients_match_trl(beta):
    """d(batchmean loss) / d(student logits) equals torch autograd's through TRL's loss (entries ~1e-2)."""
    student, teacher, labels = *_logits(9), _labels(9)
    torch_student = torch.from_numpy(student).requires_grad_()
    GKDTrainer.generalized_jsd_loss(torch_student, torch.from_numpy(teacher), labels=torch.from_numpy(labels),
                                    beta=beta, temperature=0.9).backward()
    mask = jnp.asarray(labels != -100)
    def loss(s):
        return jnp.sum(divergence(s, jnp.asarray(teacher), "jsd", beta, 0.9) * mask) / mask.sum()

    ours = jax.jit(jax.grad(loss))(jnp.asarray(student))
    np.testing.assert_allclose(ours, torch_student.grad.numpy(), rtol=0, atol=ATOL)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_kl_kinds_are_jsd_endpoints(temperature):
    """TRL's convention: jsd with beta 0 is forward KL(p_t || p_s), with beta 1 reverse KL(p_s || p_t)."""
    student, teacher = map(jnp.asarray, _logits(3))
    div = lambda kind, beta=0.5: divergence(student, teacher, kind, beta, temperature)  # noqa: E731
    np.testing.assert_allclose(div("forward_kl"), div("jsd", 0.0), rtol=0, atol=ATOL)
    np.testing.assert_allclose(div("reverse_kl"), div("jsd", 1.0), rtol=0, atol=ATOL)
    # The endpoints are KL in the right direction (not swapped): forward KL is the expectation under the teacher.
    np.testing.assert_allclose(div("forward_kl"), _numpy_divergence(*_logits(3), "forward_kl",
                                                                    temperature=temperature), rtol=0, atol=ATOL)


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in BETAS])
def test_matches_numpy_float64(kind, beta, temperature):
    student, teacher = _logits(4)
    ours = divergence(jnp.asarray(student), jnp.asarray(teacher), kind, beta, temperature)
    np.testing.assert_allclose(ours, _numpy_divergence(student, teacher, kind, beta, temperature), rtol=0,
                               atol=ATOL)


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in BETAS])
def test_properties(kind, beta):
    """Zero on identical logits (any leading shape), non-negative elsewhere, float32 from bfloat16 inputs."""
    student, teacher = _logits(5, shape=(4, 7, V), scale=4.0)
    same = divergence(jnp.asarray(teacher), jnp.asarray(teacher), kind, beta, 0.9)
    assert same.shape == (4, 7) and float(jnp.max(jnp.abs(same))) <= ATOL
    values = divergence(jnp.asarray(student), jnp.asarray(teacher), kind, beta, 2.0)
    assert bool(jnp.all(values >= 0)) and bool(jnp.all(values > 1e-3))
    low = divergence(jnp.asarray(student[0, 0], jnp.bfloat16), jnp.asarray(teacher[0, 0], jnp.bfloat16), kind, beta)
    assert low.shape == () and low.dtype == jnp.float32


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5)] + [("jsd", b) for b in BETAS])
def test_extreme_logits_finite(kind, beta):
    """Probabilities that underflow to 0 (one logit +1e4 in the student, the teacher or both): finite values that
    match float64, and finite gradients w.r.t. the student logits."""
    student, teacher = _logits(6, shape=(3, V))
    student[0, 3] = 1e4
    teacher[1, 7] = 1e4
    student[2, 11] = teacher[2, 11] = 1e4
    grad_fn = jax.grad(lambda s: jnp.sum(divergence(s, jnp.asarray(teacher), kind, beta, 0.9)))
    for t in (1.0, 0.9):
        values = np.asarray(divergence(jnp.asarray(student), jnp.asarray(teacher), kind, beta, t))
        ref = _numpy_divergence(student, teacher, kind, beta, t)
        assert np.all(np.isfinite(values)) and np.all(values >= 0)
        np.testing.assert_allclose(values, ref, rtol=1e-6, atol=ATOL)  # reverse KL reaches ~1e4 here
    assert bool(jnp.all(jnp.isfinite(grad_fn(jnp.asarray(student)))))


@pytest.mark.parametrize("kind,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_masked_vocabulary_rows(kind, beta):
    """Logits of -inf in both models (padded vocabulary rows) contribute nothing, to values or gradients."""
    student, teacher = _logits(7, shape=(2, V))
    padded = lambda x: jnp.asarray(x).at[:, -5:].set(-jnp.inf)  # noqa: E731
    values = divergence(padded(student), padded(teacher), kind, beta)
    np.testing.assert_allclose(values, divergence(jnp.asarray(student[:, :-5]), jnp.asarray(teacher[:, :-5]), kind,
                                                  beta), rtol=0, atol=ATOL)
    grads = jax.grad(lambda s: jnp.sum(divergence(s, padded(teacher), kind, beta)))(padded(student))
    assert bool(jnp.all(jnp.isfinite(grads))) and bool(jnp.all(grads[:, -5:] == 0))


def test_rejects_bad_arguments():
    student, teacher = map(jnp.asarray, _logits(8, shape=(2, V)))
    with pytest.raises(ValueError, match="unknown divergence"):
        divergence(student, teacher, "kl")
    with pytest.raises(ValueError, match="beta"):
        divergence(student, teacher, "jsd", beta=1.5)
    with pytest.raises(ValueError, match="shared vocabulary"):
        divergence(student, teacher[:, :-1], "forward_kl")
    assert DIVERGENCES == ("forward_kl", "reverse_kl", "jsd")
