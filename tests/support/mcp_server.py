#!/usr/bin/env python3
"""Real MCP server used by ctxgate's integration tests.

Requires `pip install "mcp==1.30.0"` (2.x dropped FastMCP and the 2025-11-25
experimental Tasks API this relies on).

    python3 tests/support/mcp_server.py --port PORT [--task-support optional|required]

Serves streamable HTTP (stateful sessions) at http://127.0.0.1:PORT/mcp.
"""

import argparse
import asyncio
import json
import logging
import warnings
from collections import Counter

import mcp.types as types
from mcp.server.fastmcp import FastMCP
from mcp.shared.exceptions import McpError
from mcp.shared.experimental.tasks.helpers import is_terminal
from mcp.shared.experimental.tasks.in_memory_task_store import InMemoryTaskStore

# The tasks API is marked deprecated in 1.x; the warning is just noise here.
warnings.filterwarnings("ignore", category=DeprecationWarning)
# 1.30.0 logs a harmless ClosedResourceError traceback whenever a client DELETEs
# its session; tests close sessions on purpose, so drop just that record.
logging.getLogger("mcp.server.streamable_http").addFilter(lambda r: "standalone SSE writer" not in r.getMessage())

parser = argparse.ArgumentParser()
parser.add_argument("--port", type=int, required=True)
parser.add_argument("--task-support", choices=["optional", "required"], default="optional")
args = parser.parse_args()

mcp = FastMCP(
    "ctxgate-test-mcp",
    host="127.0.0.1",
    port=args.port,
    stateless_http=False,
    log_level="WARNING",
)
low = mcp._mcp_server  # FastMCP has no task hooks, so tasks are wired on the low-level server.

# Tests assert how often the gateway really invoked each tool (e.g. no duplicate
# calls on retry/resume). Counted when the tool actually runs (a task creation
# counts once); calls rejected by the task-mode checks below are not counted.
CALLS: Counter[str] = Counter()


@mcp.tool()
def add(a: int, b: int) -> int:
    return a + b


@mcp.tool()
async def sleep_echo(text: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return text


@mcp.tool()
def fail(message: str) -> str:
    # FastMCP turns this into isError: true, text "Error executing tool fail: <message>".
    raise RuntimeError(message)


@mcp.tool()
def calls() -> str:
    return json.dumps(dict(CALLS))


async def _report(topic: str, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return f"report on {topic}"


@mcp.tool()
async def slow_report(topic: str, seconds: float) -> str:
    # Only reached for non-task calls (taskSupport "optional").
    return await _report(topic, seconds)


# --- Tasks (spec 2025-11-25) -------------------------------------------------
# The SDK's own `ctx.experimental.run_task()` is unsuitable for the gateway's
# restart test, for two reasons:
#   * it embeds a per-session scope in the task id and the default
#     tasks/get|result handlers reject ids from another session ("Task not found");
#   * it spawns the work in a task group owned by the creating session's
#     Server.run(), so the work dies/gets torn down with that session.
# Instead: one process-wide InMemoryTaskStore, plain (unscoped) uuid task ids --
# which the default handlers accept from ANY session, possession of the id is the
# credential -- and work spawned as a bare asyncio task that no session owns.
# Caveat: tasks/list never shows unscoped tasks (SDK rule), so it returns [].
STORE = InMemoryTaskStore()
low.experimental.enable_tasks(store=STORE)  # registers tasks/get|result|list|cancel + capability
_background: set[asyncio.Task] = set()  # strong refs so running tasks aren't GC'd


async def _run_report_task(task_id: str, topic: str, seconds: float) -> None:
    text = await _report(topic, seconds)
    task = await STORE.get_task(task_id)
    if task is None or is_terminal(task.status):
        return  # cancelled via tasks/cancel (or expired) meanwhile: terminal states are final
    # structuredContent mirrors FastMCP's outputSchema {"result": str} for this tool.
    content = [types.TextContent(type="text", text=text)]
    await STORE.store_result(task_id, types.CallToolResult(content=content, structuredContent={"result": text}))
    await STORE.update_task(task_id, status="completed")  # also wakes a blocked tasks/result


_fastmcp_list_tools = low.request_handlers[types.ListToolsRequest]
_fastmcp_call_tool = low.request_handlers[types.CallToolRequest]


async def list_tools(req: types.ListToolsRequest) -> types.ServerResult:
    result = await _fastmcp_list_tools(req)
    for tool in result.root.tools:
        if tool.name == "slow_report":
            tool.execution = types.ToolExecution(taskSupport=args.task_support)
    return result


async def call_tool(req: types.CallToolRequest) -> types.ServerResult:
    name, params = req.params.name, req.params
    if name == "slow_report":
        if params.task is None and args.task_support == "required":
            raise McpError(types.ErrorData(code=types.METHOD_NOT_FOUND, message="slow_report requires a task"))
        if params.task is not None:
            a = params.arguments or {}
            try:
                topic, seconds = str(a["topic"]), float(a["seconds"])
            except (KeyError, TypeError, ValueError) as e:
                raise McpError(types.ErrorData(code=types.INVALID_PARAMS, message=f"bad arguments: {e!r}"))
            CALLS[name] += 1
            task = await STORE.create_task(params.task)  # task_id=None -> plain uuid4
            t = asyncio.create_task(_run_report_task(task.taskId, topic, seconds))
            _background.add(t)
            t.add_done_callback(_background.discard)
            return types.ServerResult(types.CreateTaskResult(task=task))
    elif params.task is not None:
        # Spec: task-augmenting a tool without task support is -32601.
        raise McpError(types.ErrorData(code=types.METHOD_NOT_FOUND, message=f"Tool {name} does not support tasks"))
    CALLS[name] += 1
    return await _fastmcp_call_tool(req)


low.request_handlers[types.ListToolsRequest] = list_tools
low.request_handlers[types.CallToolRequest] = call_tool

if __name__ == "__main__":
    mcp.run(transport="streamable-http")
