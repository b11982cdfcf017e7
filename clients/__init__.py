"""Python clients for the steering server (see `clients.steering_client`)."""

from clients.steering_client import (
    AsyncSteeringClient,
    ChatResult,
    CompareResult,
    Steering,
    SteeringClient,
    SteeringServerError,
    VariantResult,
)

__all__ = ["AsyncSteeringClient", "ChatResult", "CompareResult", "Steering", "SteeringClient",
           "SteeringServerError", "VariantResult"]
