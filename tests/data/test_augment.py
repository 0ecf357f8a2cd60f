"""Prompt-token noise (sftjax.data.augment): only eligible prompt tokens change, at about the asked rate, per task,
deterministically for a given generator; the result never changes targets or masks."""

import numpy as np

from sftjax.data.augment import eligible, prompt_noise, with_prompt_noise


def _batch():
    # Two packed examples in one row of 12: [BOS p p p : a EOS] [BOS p p :] a] + one pad slot.
    tokens = np.array([[1, 10, 11, 12, 13, 50, 2, 1, 20, 21, 22, 60]], np.int32)
    loss_mask = np.array([[0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 0]], np.float32)  # targets[t] = tokens[t + 1]
    segment_ids = np.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 0]], np.int32)
    positions = np.array([[0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 0]], np.int32)
    task_ids = np.array([[0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1]], np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, 1), "loss_mask": loss_mask,
            "segment_ids": segment_ids, "positions": positions, "task_ids": task_ids}


def test_eligible_is_the_prompt_without_bos_cue_answer_and_padding():
    np.testing.assert_array_equal(eligible(_batch())[0],
                                  [0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0])  # the cue (":") and "a", EOS are kept


def test_noise_touches_only_eligible_tokens_of_tasks_with_a_rate():
    batch = _batch()
    big = {k: np.repeat(v, 2000, axis=0) for k, v in batch.items()}
    out = prompt_noise(big, np.array([0.5, 0.0]), np.random.default_rng(0))
    changed = out["tokens"] != big["tokens"]
    assert not changed[:, 7:].any()  # task 1 has rate 0; padding never changes
    assert not changed[~eligible(big)].any()
    share = changed[:, 1:4].mean()  # a draw from the 5 eligible tokens of a row can be the same token: 0.5 * 4/5
    assert abs(share - 0.5 * 4 / 5) < 0.02, share
    assert set(np.unique(out["tokens"][:, 1:4])) == {10, 11, 12, 20, 21}  # drawn from the eligible tokens
    for k in ("targets", "loss_mask", "segment_ids", "positions", "task_ids"):
        np.testing.assert_array_equal(out[k], big[k])
    np.testing.assert_array_equal(batch["tokens"], _batch()["tokens"])  # the input is not modified
    again = prompt_noise(big, np.array([0.5, 0.0]), np.random.default_rng(0))
    np.testing.assert_array_equal(again["tokens"], out["tokens"])


def test_no_rate_returns_the_batch():
    batch = _batch()
    assert prompt_noise(batch, np.zeros(2), np.random.default_rng(0)) is batch


class _Rows:
    """A stand-in for DataIterator: the same packed row repeated 500 times per batch, its position advancing."""

    process_index = 0

    def __init__(self, row=0):
        self.row = row

    def state(self):
        return {"epoch": 0, "position": 0, "row": self.row}

    def __next__(self):
        self.row += 1
        return {k: np.repeat(v, 500, axis=0) for k, v in _batch().items()}


def test_the_augmentation_step_is_a_pipeline_stage_that_resumes_exactly():
    plain = _Rows()
    assert with_prompt_noise(plain, [0.0, 0.0], seed=0) is plain  # nothing to add: the iterator itself
    first = with_prompt_noise(_Rows(), [0.5, 0.0], seed=0)
    stream = [next(first)["tokens"] for _ in range(3)]
    assert first.state() == {"epoch": 0, "position": 0, "row": 3}  # the wrapped iterator's state
    assert not np.array_equal(stream[0], stream[1])  # every batch draws its own noise
    resumed = with_prompt_noise(_Rows(row=2), [0.5, 0.0], seed=0)  # restored where the third batch starts
    np.testing.assert_array_equal(next(resumed)["tokens"], stream[2])
    other_seed = with_prompt_noise(_Rows(), [0.5, 0.0], seed=1)
    assert not np.array_equal(next(other_seed)["tokens"], stream[0])
