"""cluster.ray_errors on errors a real Ray task raised."""

from __future__ import annotations

import pytest
import ray

from cluster.ray_errors import reason, remote_cause

pytestmark = pytest.mark.usefixtures("ray_session")


@ray.remote(num_cpus=0)
def _fails(message: str):
    raise ValueError(message)


def test_remote_cause_and_reason_unwrap_a_ray_task_error():
    with pytest.raises(ValueError) as err:          # as_instanceof_cause: still a ValueError
        ray.get(_fails.remote("unknown model 'x'"))
    wrapped = err.value
    assert isinstance(wrapped, ray.exceptions.RayTaskError)
    cause = remote_cause(wrapped)
    assert type(cause) is ValueError and str(cause) == "unknown model 'x'"
    assert reason(wrapped) == "ValueError: unknown model 'x'"
    assert reason(ray.exceptions.RayTaskError("f", "tb", ValueError("long " * 100))) == ("ValueError: " + "long " * 100)[:300]


def test_other_errors_pass_through():
    e = RuntimeError("plain")
    assert remote_cause(e) is e
    assert reason(e) == "RuntimeError: plain"
    assert reason(TimeoutError()) == "TimeoutError:"
