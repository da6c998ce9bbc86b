"""Drives ctxgate's Responses API with the official `openai` Python SDK, as an app would.

Usage: python3 responses_sdk.py BASE_URL
The Chat-Completions-only mock behind the gateway is scripted by tests/responses.rs in the
order of the calls below. Prints one JSON object with what the SDK saw; any SDK exception
(including its own stream-state checks) fails the run.
"""
import json
import sys

import openai
import pydantic
from openai import OpenAI
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent

# The SDK builds its objects without validating them; these check every field strictly against
# its types, so a missing or mistyped field fails the run too.
STRICT_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
STRICT_ITEM = pydantic.TypeAdapter(ResponseItem)

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-sdk-test", max_retries=0)
seen = {"sdk_version": openai.__version__}

TOOLS = [{
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}]

# 1. Non-streamed, with instructions and metadata.
first = client.responses.create(model="mock-model", instructions="Be terse.",
                                input="Say hello", metadata={"run": "sdk"}, max_output_tokens=64)
Response.model_validate(client.responses.with_raw_response.retrieve(first.id).http_response.json())
seen["plain"] = {
    "id": first.id,
    "object": first.object,
    "status": first.status,
    "text": first.output_text,
    "input_tokens": first.usage.input_tokens,
    "cached_tokens": first.usage.input_tokens_details.cached_tokens,
    "output_tokens": first.usage.output_tokens,
    "metadata": first.metadata,
    "max_output_tokens": first.max_output_tokens,
}

# 2. Streamed, continuing the chain, through the SDK's stream helper (it checks the events'
# order and identities itself).
kinds = []
with client.responses.stream(model="mock-model", input="Count", previous_response_id=first.id) as stream:
    for event in stream:
        # (the helper's own event types carry a parsed snapshot pydantic warns about dumping)
        STRICT_EVENT.validate_python(event.to_dict(warnings=False))
        kinds.append((event.type, event.sequence_number))
    final = stream.get_final_response()
seen["stream"] = {
    "id": final.id,
    "text": final.output_text,
    "status": final.status,
    "previous_response_id": final.previous_response_id,
    "types": [k for k, _ in kinds],
    "sequence_numbers": [n for _, n in kinds],
    "output_tokens": final.usage.output_tokens,
}

# 3. A function tool round trip: the model calls, the app answers with function_call_output.
call_response = client.responses.create(model="mock-model", input="Weather in Paris?", tools=TOOLS)
Response.model_validate(call_response.to_dict())
calls = [item for item in call_response.output if item.type == "function_call"]
seen["tool_call"] = {"name": calls[0].name, "arguments": json.loads(calls[0].arguments),
                     "call_id": calls[0].call_id}
answer = client.responses.create(
    model="mock-model", previous_response_id=call_response.id, tools=TOOLS,
    input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny, 21C"}])
Response.model_validate(answer.to_dict())
seen["tool_answer"] = answer.output_text

# 4. Streamed parallel function calls, as typed events (argument deltas kept per item).
arguments, done_items, completed_calls = {}, [], None
validated = 0
for event in client.responses.create(model="mock-model", input="Weather twice?", tools=TOOLS, stream=True):
    STRICT_EVENT.validate_python(event.to_dict())
    validated += 1
    if event.type == "response.function_call_arguments.delta":
        arguments[event.output_index] = arguments.get(event.output_index, "") + event.delta
    if event.type == "response.output_item.done" and event.item.type == "function_call":
        done_items.append(event.item)
    if event.type == "response.completed":
        completed_calls = [i.arguments for i in event.response.output if i.type == "function_call"]
seen["strictly_validated_events"] = validated
seen["stream_tool"] = {"arguments_by_item": [arguments[k] for k in sorted(arguments)],
                       "done_arguments": [i.arguments for i in done_items],
                       "completed_calls": completed_calls}

# 5. Stored responses: retrieve, input items, delete.
got = client.responses.retrieve(first.id)
items = client.responses.input_items.list(first.id)
for item in items.data:
    STRICT_ITEM.validate_python(item.to_dict())
seen["retrieve"] = {"id": got.id, "text": got.output_text, "status": got.status}
seen["input_items"] = [{"type": i.type, "role": i.role, "text": i.content[0].text} for i in items.data]
deleted = client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    seen["after_delete"] = "found"
except openai.NotFoundError as e:
    seen["after_delete"] = {"status": e.status_code, "code": e.code}
try:
    client.responses.create(model="mock-model", input="x", previous_response_id="resp_unknown")
    seen["unknown_previous"] = "accepted"
except openai.NotFoundError as e:
    seen["unknown_previous"] = {"status": e.status_code, "code": e.code}

# 6. A stream the upstream cuts short: typed `error` and `response.failed` events, not an exception.
cut_kinds = []
for event in client.responses.create(model="mock-model", input="Cut", stream=True):
    STRICT_EVENT.validate_python(event.to_dict())
    cut_kinds.append(event.type)
    if event.type == "error":
        cut_error_code = event.code
seen["cut"] = {"last": cut_kinds[-2:], "status": event.response.status,
               "error_code": event.response.error.code, "error_event_code": cut_error_code}

# 7. A reasoning model (llama-server's `reasoning_content`), streamed then not.
reasoning_deltas, final_items = "", []
for event in client.responses.create(model="mock-model", input="2+2?", stream=True):
    STRICT_EVENT.validate_python(event.to_dict())
    if event.type == "response.reasoning_text.delta":
        reasoning_deltas += event.delta
    if event.type == "response.completed":
        final_items = [item.type for item in event.response.output]
reasoned = client.responses.create(model="mock-model", input="2+2?")
Response.model_validate(reasoned.to_dict())
seen["reasoning"] = {"deltas": reasoning_deltas, "stream_items": final_items,
                     "items": [item.type for item in reasoned.output],
                     "text": reasoned.output[0].content[0].text, "answer": reasoned.output_text}

print(json.dumps(seen))
