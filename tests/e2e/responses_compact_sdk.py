"""Compacts a conversation through ctxgate with the official `openai` Python SDK, then continues
from the compacted items, as an app would.

Usage: python3 responses_compact_sdk.py BASE_URL < items.json
The conversation's input items come on stdin; the Chat-Completions-only mock behind the
gateway is scripted by tests/responses_compact.rs for the one turn after the compaction.
Prints one JSON object with what the SDK saw; any SDK exception fails the run.
"""
import json
import sys

import pydantic
from openai import OpenAI
from openai.types.responses import CompactedResponse, ResponseItem

# The SDK builds its objects without validating them. Each item is checked strictly as an item
# OpenAI lists (a compaction's user messages are not assistant output messages, so the output
# union would reject them), and the envelope strictly without its items.
STRICT_ITEM = pydantic.TypeAdapter(ResponseItem)

base_url = sys.argv[1]
items = json.load(sys.stdin)
client = OpenAI(base_url=base_url, api_key="sk-sdk-test", max_retries=0)

compacted = client.responses.compact(model="mock-model", instructions="You are an agent.", input=items)
assert isinstance(compacted, CompactedResponse), type(compacted)

raw = client.responses.with_raw_response.compact(
    model="mock-model", instructions="You are an agent.", input=items
).http_response.json()
CompactedResponse.model_validate({**raw, "output": []})
for item in raw["output"]:
    STRICT_ITEM.validate_python(item)
assert raw["output"] == [item.model_dump(mode="json", exclude_unset=True) for item in compacted.output]

outputs = [item for item in compacted.output if item.type == "function_call_output"]

# The compacted items are the next request's input, as OpenAI's compaction output is.
following = client.responses.create(
    model="mock-model",
    instructions="You are an agent.",
    input=[*compacted.output, {"role": "user", "content": "Summarise the audit."}],
    store=False,
)

print(json.dumps({
    "class": type(compacted).__name__,
    "object": compacted.object,
    "id": compacted.id,
    "input_tokens": compacted.usage.input_tokens,
    "types": [item.type for item in compacted.output],
    "masked": outputs[0].output,
    "next_text": following.output_text,
}))
