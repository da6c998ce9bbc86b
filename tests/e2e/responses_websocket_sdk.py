"""Drives ctxgate's Responses API WebSocket mode with the official `openai` Python SDK's
`client.responses.connect()`, as an agent loop would: two turns on one socket, the second with
only its new input and the first response's id, `store=False` both times.

Usage: python3 responses_websocket_sdk.py BASE_URL
The Chat-Completions-only mock behind the gateway is scripted by tests/responses_websocket.rs.
Prints one JSON object with what the SDK saw; any SDK exception fails the run.
"""
import json
import sys

import pydantic
from openai import OpenAI
from openai.types.responses import ResponseStreamEvent

# Every event is checked strictly against the SDK's own types.
STRICT_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)

client = OpenAI(base_url=sys.argv[1], api_key="sk-sdk-test", max_retries=0)
seen = {"types": []}


def run_turn(conn, **fields):
    """Sends one response.create and reads its events up to the one that ends it."""
    conn.response.create(model="mock-model", store=False, **fields)
    for event in conn:
        if event.type == "error":
            raise SystemExit(f"error event: {event}")
        STRICT_EVENT.validate_python(event.model_dump(mode="json", exclude_unset=True))
        seen["types"].append(event.type)
        if event.type == "response.completed":
            return event.response
    raise SystemExit("the socket closed mid-turn")


with client.responses.connect() as conn:
    first = run_turn(conn, input="My name is Ada.")
    seen["first"] = first.output_text
    second = run_turn(
        conn,
        previous_response_id=first.id,
        input=[{"role": "user", "content": "What is my name?"}],
    )
    seen["second"] = second.output_text

print(json.dumps(seen))
