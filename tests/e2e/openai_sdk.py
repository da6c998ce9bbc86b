"""Drives ctxgate with the official `openai` Python SDK, as an app pointed at it would.

Usage: python3 openai_sdk.py BASE_URL
The mock upstream behind the gateway is scripted by tests/openai_sdk.rs in the order of the
calls below. Prints one JSON object with what the SDK saw; any SDK exception fails the run.
"""
import json
import sys

import openai
from openai import OpenAI

base_url = sys.argv[1]
client = OpenAI(base_url=base_url, api_key="sk-sdk-test", max_retries=0,
                default_headers={"X-Session-Id": "sdk-session"})
seen = {"sdk_version": openai.__version__}

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]},
    },
}]
MESSAGES = [{"role": "user", "content": "Weather in Paris and Tokyo?"}]

# 1. Non-streamed.
completion = client.chat.completions.create(
    model="mock-model", messages=[{"role": "user", "content": "Say hello"}])
seen["plain"] = {
    "content": completion.choices[0].message.content,
    "prompt_tokens": completion.usage.prompt_tokens,
    "cached_tokens": completion.usage.prompt_tokens_details.cached_tokens,
}

# 2. Streamed, with the usage chunk.
text, usage = "", None
for chunk in client.chat.completions.create(
        model="mock-model", messages=[{"role": "user", "content": "Count"}], stream=True,
        stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage.completion_tokens
seen["stream"] = {"text": text, "completion_tokens": usage}

# 3. Streamed parallel tool calls, reassembled by index.
calls = {}
finish = None
for chunk in client.chat.completions.create(
        model="mock-model", messages=MESSAGES, tools=TOOLS, stream=True):
    for choice in chunk.choices:
        for tc in choice.delta.tool_calls or []:
            entry = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            if tc.id:
                entry["id"] = tc.id
            if tc.function and tc.function.name:
                entry["name"] = tc.function.name
            if tc.function and tc.function.arguments:
                entry["arguments"] += tc.function.arguments
        finish = choice.finish_reason or finish
seen["stream_tools"] = {"calls": [calls[i] for i in sorted(calls)], "finish_reason": finish}

# 4. Non-streamed tool calls.
completion = client.chat.completions.create(model="mock-model", messages=MESSAGES, tools=TOOLS)
message = completion.choices[0].message
seen["tools"] = {
    "calls": [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments}
              for c in message.tool_calls],
    "finish_reason": completion.choices[0].finish_reason,
}

# 5. The model list.
seen["models"] = [m.id for m in client.models.list()]

# 6. An error made by the gateway, surfaced as the SDK's typed exception.
try:
    client.chat.completions.create(model="mock-model", messages=[])
    seen["error"] = None
except openai.BadRequestError as e:
    seen["error"] = {"status": e.status_code, "code": e.code, "param": e.param, "type": e.type}

print(json.dumps(seen))
