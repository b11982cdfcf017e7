"""Python clients for the steering server (see `clients.steering_client`)."""

from clients.readout import Inspection, Vector
from clients.steering_client import (
    AsyncSteeringClient,
    ChatResult,
    CompareEvent,
    CompareResult,
    Condition,
    Steering,
    SteeringClient,
    SteeringServerError,
    VariantResult,
)

__all__ = ["AsyncSteeringClient", "ChatResult", "CompareEvent", "CompareResult", "Condition",
           "Inspection", "Steering", "SteeringClient", "SteeringServerError", "VariantResult",
           "Vector"]
