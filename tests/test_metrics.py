"""ACC / Forgetting / BWT / task-id accuracy, checked against hand-computed values."""
import math

import numpy as np
import pytest

from softtf import metrics

NAN = float("nan")
# A[i, j]: accuracy on task j after training task i
A = [
    [90.0, NAN, NAN],
    [80.0, 70.0, NAN],
    [60.0, 75.0, 50.0],
]


def test_average_accuracy():
    assert metrics.average_accuracy(A, 0) == 90.0
    assert metrics.average_accuracy(A, 1) == 75.0
    assert metrics.average_accuracy(A) == pytest.approx((60 + 75 + 50) / 3)
    assert metrics.average_accuracy(A, -1) == metrics.average_accuracy(A, 2)


def test_forgetting_uses_max_over_previous_rows():
    assert math.isnan(metrics.forgetting(A, 0))
    assert metrics.forgetting(A, 1) == pytest.approx(90 - 80)
    # task 0: max(90, 80) - 60 = 30; task 1: max(70) - 75 = -5
    assert metrics.forgetting(A) == pytest.approx((30 + -5) / 2)


def test_bwt():
    assert metrics.backward_transfer(A) == pytest.approx(((60 - 90) + (75 - 70)) / 2)
    assert math.isnan(metrics.backward_transfer([[50.0]]))


def test_zero_forgetting_matrix():
    Z = np.tril(np.full((4, 4), 88.0)) + np.triu(np.full((4, 4), NAN), 1)
    assert metrics.forgetting(Z) == 0.0 and metrics.backward_transfer(Z) == 0.0


def test_summarize_json_ready():
    s = metrics.summarize(A)
    assert s["acc_curve"] == [90.0, 75.0, pytest.approx(185 / 3)]
    assert s["forgetting_curve"][0] is None and s["forgetting_curve"][1] == pytest.approx(10.0)
    assert s["acc"] == s["acc_curve"][-1] and s["forgetting"] == pytest.approx(12.5)
    assert metrics.summarize([[40.0]])["bwt"] is None


def test_task_id_accuracy():
    assert metrics.task_id_accuracy([0, 1, 1, 2], [0, 1, 2, 2]) == 75.0  # percent, the accuracy matrix's unit
    with pytest.raises(ValueError, match="predicted has 2 entries, true has 3"):
        metrics.task_id_accuracy([0, 1], [0, 1, 2])
    with pytest.raises(ValueError, match="no samples"):
        metrics.task_id_accuracy([], [])


@pytest.mark.parametrize(
    "bad, match",
    [
        ([[1.0, 2.0]], r"must be square \[n, n\]"),
        ([], r"must be square \[n, n\]"),
        ([[1.0, NAN], [NAN, 2.0]], r"A\[1, 0\] \(task 0 after training task 1\) is missing"),
    ],
)
def test_bad_matrices(bad, match):
    with pytest.raises(ValueError, match=match):
        metrics.average_accuracy(bad)


def test_bad_task_index():
    with pytest.raises(ValueError, match=r"forgetting: t must be a task index in \[-3, 2\], got 3"):
        metrics.forgetting(A, 3)
