"""Request and response shapes: the OpenAI API's, plus the `steering` object and compare. One
module per endpoint over a shared base (as vLLM's `entrypoints/openai` protocol is laid out):

| module | what |
|---|---|
| `base` | the lenient base model (logs the unknown fields it ignores), the `steering` field, the sampling fields and their conversion, chat messages, usage, logprobs, stream chunks, errors |
| `chat` | `POST /v1/chat/completions` |
| `completions` | `POST /v1/completions` |
| `compare` | `POST /v1/steering/compare` |
| `models` | `GET /v1/models` |

Requests convert themselves, as vLLM's protocol does: `to_sampling_params(max_tokens, choice)`
gives the engine's sampling for one choice and `SteeringParams.to_spec(pack)` the library's
`SteeringSpec` (`steering` may be one object or a list of them, `parse_steering`: errors name the
element, `steering[1].generation_window`); limits that depend on the server's settings or on the
model are checked in `server.api.validation`. Stream chunks (`ChatCompletionChunk`,
`CompletionChunk`) send `usage` and `steering` only when set.
"""

from server.api.protocol.base import (
    ERROR_RESPONSES,
    INT64_MAX,
    INT64_MIN,
    MAX_MONITORS,
    MAX_STEERING_OBJECTS,
    Applied,
    AppliedSteering,
    ChatMessage,
    ChoiceLogprobs,
    ConditionParams,
    ConditionResult,
    ErrorDetail,
    ErrorResponse,
    Lenient,
    Monitored,
    MonitorObject,
    SteeringParams,
    SteeringValue,
    StreamOptions,
    TextPart,
    TokenLogprob,
    TopLogprob,
    Usage,
    parse_monitor,
    parse_steering,
)
from server.api.protocol.chat import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
    ResponseMessage,
    ToolCall,
    ToolCallDelta,
)
from server.api.protocol.compare import (
    CompareRequest,
    CompareResponse,
    CompareVariant,
    VariantResult,
)
from server.api.protocol.completions import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from server.api.protocol.models import ModelCard, ModelList

__all__ = [
    "ERROR_RESPONSES", "INT64_MAX", "INT64_MIN", "MAX_MONITORS", "MAX_STEERING_OBJECTS", "Applied",
    "AppliedSteering", "ChatChoice", "ChatChunkChoice", "ChatCompletionChunk",
    "ChatCompletionRequest", "ChatCompletionResponse", "ChatMessage", "ChoiceLogprobs",
    "CompareRequest", "CompareResponse", "CompareVariant", "CompletionChoice", "CompletionChunk",
    "CompletionLogprobs", "CompletionRequest", "CompletionResponse", "ConditionParams",
    "ConditionResult", "DeltaMessage", "ErrorDetail", "ErrorResponse", "Lenient", "ModelCard",
    "ModelList", "Monitored", "MonitorObject", "ResponseMessage", "SteeringParams",
    "SteeringValue", "StreamOptions", "TextPart", "TokenLogprob", "ToolCall", "ToolCallDelta",
    "TopLogprob", "Usage", "VariantResult", "parse_monitor", "parse_steering",
]
