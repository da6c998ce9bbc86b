"""Runs an agent of the OpenAI Agents SDK (`openai-agents`) through ctxgate, in its default
Responses API mode, with two function tools, once as a plain run and once streamed.

Usage: python3 responses_agents.py BASE_URL
The Chat-Completions-only mock behind the gateway is scripted by tests/responses.rs: each run's
first model call asks for both tools, its second answers. Prints what the agent did as JSON.
"""
import asyncio
import json
import sys

from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled
from openai import AsyncOpenAI

set_tracing_disabled(True)
client = AsyncOpenAI(base_url=sys.argv[1], api_key="sk-agents-test", max_retries=0)
calls = []


@function_tool
def get_weather(city: str) -> str:
    """The weather in a city."""
    calls.append(["get_weather", city])
    return f"sunny in {city}"


@function_tool
def get_time(city: str) -> str:
    """The local time in a city."""
    calls.append(["get_time", city])
    return f"noon in {city}"


agent = Agent(
    name="assistant",
    instructions="Answer with the tools.",
    tools=[get_weather, get_time],
    model=OpenAIResponsesModel(model="mock-model", openai_client=client),
)


async def main():
    result = await Runner.run(agent, "Weather and time in Paris?")
    streamed = Runner.run_streamed(agent, "And in Tokyo?")
    kinds = set()
    async for event in streamed.stream_events():
        if event.type == "raw_response_event":
            kinds.add(event.data.type)
    print(json.dumps({
        "final": result.final_output,
        "streamed_final": streamed.final_output,
        "calls": calls,
        "raw_event_kinds": sorted(kinds),
    }))


asyncio.run(main())
