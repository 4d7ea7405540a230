"""Helpers to test pipelines built on AETR: a fake step service with ready-made behaviours."""

from aetr.testing.behaviours import callback, callback_before_answer, fail, never, sequence, status, sync
from aetr.testing.step_service import Behaviour, Call, CallbackAnswer, StepRequest, StepService

__all__ = [
    "Behaviour",
    "Call",
    "CallbackAnswer",
    "StepRequest",
    "StepService",
    "callback",
    "callback_before_answer",
    "fail",
    "never",
    "sequence",
    "status",
    "sync",
]
