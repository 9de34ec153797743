"""Protobuf <-> types round trips and error mapping."""

from __future__ import annotations

import grpc
import pytest

from mesh import errors, wire
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    Memory,
    Message,
    ModelInfo,
    ModelLoad,
    NodeState,
    ReasoningDelta,
    SamplingParams,
    Started,
    TextDelta,
    TextPrompt,
    TokenPrompt,
    Tool,
    ToolCall,
    ToolCallEvent,
    Usage,
)
from proto import node_pb2 as pb

TOOL = Tool(
    "get_weather", "weather", {"type": "object", "properties": {"city": {"type": "string"}}}
)


@pytest.mark.parametrize(
    "request_",
    [
        GenerateRequest(
            model="m",
            prompt=ChatPrompt(
                (
                    Message("system", "s"),
                    Message("user", "u"),
                    Message(
                        "assistant",
                        "",
                        reasoning="think",
                        tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),),
                    ),
                    Message(
                        "tool", "18C", tool_call_id="call_1", name="get_weather", is_error=True
                    ),
                ),
                tools=(TOOL,),
                enable_thinking=False,
                add_generation_prompt=True,
            ),
            sampling=SamplingParams(
                temperature=0.0, top_p=0.5, top_k=3, min_p=0.1, max_tokens=9, stop=("x",), seed=7
            ),
            request_id="r1",
        ),
        GenerateRequest(model="m", prompt=TextPrompt("hello")),
        GenerateRequest(model="m", prompt=TokenPrompt((1, 2, 3)), tools=(TOOL,), draft_model="d"),
        GenerateRequest(model="m", prompt=ChatPrompt((Message("user", "u"),))),
    ],
)
def test_request_round_trip(request_: GenerateRequest) -> None:
    assert wire.request_from_pb(wire.request_to_pb(request_)) == request_


def test_unset_sampling_stays_unset() -> None:
    back = wire.request_from_pb(pb.GenerateRequest(model="m", text="x"))
    assert back.sampling == SamplingParams()
    zero = wire.request_from_pb(
        pb.GenerateRequest(model="m", text="x", sampling=pb.SamplingParams(temperature=0.0))
    )
    assert zero.sampling.temperature == 0.0, "an explicit 0 (greedy) is not 'unset'"


def test_missing_input_and_bad_tool_schema() -> None:
    with pytest.raises(errors.InvalidRequest, match="input"):
        wire.request_from_pb(pb.GenerateRequest(model="m"))
    bad = pb.GenerateRequest(model="m", text="x", tools=[pb.Tool(name="t", parameters_json="{")])
    with pytest.raises(errors.InvalidRequest, match=r"tools\[t\]\.parameters"):
        wire.request_from_pb(bad)


@pytest.mark.parametrize(
    "event",
    [
        Started("r", "m", 12, 2),
        TextDelta("hi"),
        ReasoningDelta("hmm"),
        ToolCallEvent(ToolCall("call_x", "f", "{}")),
        ErrorEvent("INTERNAL", "boom"),
        *[Finish(reason, Usage(1, 2, 3, 0.5, 1.5, 0.1, 4, 2), "s") for reason in FinishReason],
    ],
)
def test_event_round_trip(event: GenerateEvent) -> None:
    assert wire.event_from_pb(wire.event_to_pb(event)) == event


def test_state_round_trip() -> None:
    state = NodeState(
        node_id="n",
        version="1",
        sequence=3,
        timestamp=1.5,
        models=(ModelInfo("m", "mlx", "models-dir", "/p", True, 10, 8192, "q4", True, False, 5),),
        memory=Memory(100, 60, 40, 7),
        load=(ModelLoad("m", 1, 2, 300, 10.5, 7.5, 40, 31, 19.25),),
        running=1,
        waiting=2,
        draining=True,
        cache=(CachedPrefix("m", 256, (1, 2**64 - 1)),),
    )
    assert wire.state_from_pb(wire.state_to_pb(state)) == state
    assert wire.state_to_pb(state).load[0].aggregate_decode_tokens_per_second == 19.25


@pytest.mark.parametrize(
    ("err", "code"),
    [
        (errors.InvalidRequest("x", field="f"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.PromptTooLong(10, 5), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.ModelNotFound("m", ["a"]), grpc.StatusCode.NOT_FOUND),
        (errors.Overloaded("busy"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.ModelLoadError("bad"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.BackendError("bug"), grpc.StatusCode.INTERNAL),
    ],
)
def test_errors_map_to_status_and_back(err: errors.MeshError, code: grpc.StatusCode) -> None:
    assert wire.status_code(err) == code
    back = wire.error_from_status(code, err.message)
    assert back.code == err.code and back.message == err.message
