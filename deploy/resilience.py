"""Which failures the ingress may retry, and which mean "too busy".

A request is resumed on another replica when its replica died or became
unreachable (a killed process, a lost node) or when the engine aborted it during
shutdown: in each case the work is lost but nothing is wrong with the request.
"""
from __future__ import annotations

from ray.exceptions import OwnerDiedError, RayActorError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError


class ReplicaAborted(Exception):
    """The engine ended a request with finish_reason 'abort' (it is shutting down)."""


RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError, OwnerDiedError, ReplicaAborted)
BACKPRESSURE = (BackPressureError,)


def describe(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__
