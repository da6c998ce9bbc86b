"""Drives ctxgate's background responses with the official `openai` Python SDK, as an app would.

Usage: python3 responses_background_sdk.py BASE_URL
The Chat-Completions-only mock behind the gateway is scripted by tests/responses.rs in the
order of the calls below. Prints one JSON object with what the SDK saw; any SDK exception
fails the run.
"""
import json
import sys
import time

import openai
import pydantic
from openai import OpenAI
from openai.types.responses import Response, ResponseStreamEvent

STRICT_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-sdk-test", max_retries=0)
seen = {"sdk_version": openai.__version__}


def poll(response_id):
    deadline = time.monotonic() + 20
    statuses = []
    while True:
        got = client.responses.retrieve(response_id)
        if not statuses or statuses[-1] != got.status:
            statuses.append(got.status)
        if got.status not in ("queued", "in_progress"):
            return statuses, got
        if time.monotonic() > deadline:
            raise SystemExit(f"still {got.status}")
        time.sleep(0.02)


# 1. Background, not streamed: queued at once, then polled to completion.
queued = client.responses.create(model="mock-model", input="Work in the background.", background=True)
statuses, done = poll(queued.id)
Response.model_validate(client.responses.with_raw_response.retrieve(queued.id).http_response.json())
seen["polled"] = {"created_status": queued.status, "background": queued.background,
                  "statuses": statuses, "text": done.output_text}

# 2. Background and streamed: the client leaves after its first delta, then resumes after the
# last sequence number it saw and reads to the end.
first_part, last_seen, response_id = [], None, None
stream = client.responses.create(model="mock-model", input="Stream it.", background=True, stream=True)
for event in stream:
    STRICT_EVENT.validate_python(event.to_dict())
    first_part.append(event.type)
    last_seen = event.sequence_number
    if event.type == "response.created":
        response_id = event.response.id
    if event.type == "response.output_text.delta":
        break
stream.close()
rest, numbers, text = [], [], None
for event in client.responses.retrieve(response_id, stream=True, starting_after=last_seen):
    STRICT_EVENT.validate_python(event.to_dict())
    rest.append(event.type)
    numbers.append(event.sequence_number)
    if event.type == "response.completed":
        text = event.response.output_text
seen["resumed"] = {"first_part": first_part, "last_seen": last_seen, "rest": rest,
                   "numbers": numbers, "text": text}

# 3. A response created without background cannot be cancelled.
plain = client.responses.create(model="mock-model", input="Now.")
try:
    client.responses.cancel(plain.id)
    seen["foreground_cancel"] = "accepted"
except openai.BadRequestError as e:
    error = e.body if isinstance(e.body, dict) else {}
    seen["foreground_cancel"] = {"status": e.status_code, "message": error.get("message"),
                                 "type": error.get("type")}

# 4. Cancel while it runs; a second cancel returns it as it is.
running = client.responses.create(model="mock-model", input="Take long.", background=True)
cancelled = client.responses.cancel(running.id)
Response.model_validate(client.responses.with_raw_response.cancel(running.id).http_response.json())
seen["cancelled"] = {"status": cancelled.status, "retrieved": client.responses.retrieve(running.id).status,
                     "output": len(cancelled.output)}

print(json.dumps(seen))
