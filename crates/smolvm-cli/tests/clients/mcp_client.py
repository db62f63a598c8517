"""The official MCP Python SDK as the client of smolvm's MCP server: `smolvm mcp` over stdio,
and `/mcp` on `smolvm serve` over streamable HTTP (with the API key as a bearer token).

usage: python mcp_client.py stdio SMOLVM_BINARY
       python mcp_client.py http URL KEY
Prints `ok: <name>` per check; any failure raises (exit status 1).
"""

import json
import os
import sys

import anyio
import httpx2
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client


def ok(check, **facts):
    print("ok: " + check + (" " + json.dumps(facts) if facts else ""), flush=True)


async def exercise(session, mode):
    await session.initialize()
    tools = sorted(t.name for t in (await session.list_tools()).tools)
    want = ["create_sandbox", "delete_sandbox", "list_sandboxes", "read_file", "run_command", "write_file"]
    assert tools == want, tools
    ok(f"{mode}: list tools", tools=tools)

    r = await session.call_tool("create_sandbox", {"network": "none"})
    assert not r.is_error, r
    name = r.structured_content["name"]
    ok(f"{mode}: create_sandbox", name=name)

    r = await session.call_tool("run_command", {"sandbox": name, "command": "echo out; echo err >&2; hostname"})
    assert not r.is_error and r.structured_content["stdout"] == f"out\n{name}\n", r
    assert r.structured_content["stderr"] == "err\n" and r.structured_content["exit_code"] == 0, r
    r = await session.call_tool("run_command", {"sandbox": name, "command": "exit 4"})
    assert r.is_error and r.structured_content["exit_code"] == 4, r
    r = await session.call_tool("run_command", {"sandbox": name, "command": "sleep 30", "timeout_secs": 1})
    assert r.is_error and r.structured_content["timed_out"] is True, r
    ok(f"{mode}: run_command (exit code, stdout, stderr, timeout)")

    r = await session.call_tool("write_file", {"sandbox": name, "path": "/root/mcp/note.txt", "content": "from mcp\n"})
    assert not r.is_error, r
    r = await session.call_tool("read_file", {"sandbox": name, "path": "/root/mcp/note.txt"})
    assert not r.is_error and r.structured_content["content"] == "from mcp\n", r
    r = await session.call_tool("read_file", {"sandbox": name, "path": "/root/nope"})
    assert r.is_error, r
    ok(f"{mode}: write_file / read_file")

    r = await session.call_tool("list_sandboxes", {})
    assert name in [s["name"] for s in r.structured_content["sandboxes"]], r
    r = await session.call_tool("delete_sandbox", {"sandbox": name})
    assert not r.is_error, r
    r = await session.call_tool("run_command", {"sandbox": name, "command": "true"})
    assert r.is_error, r
    ok(f"{mode}: list_sandboxes / delete_sandbox")


async def stdio(binary):
    params = StdioServerParameters(command=binary, args=["mcp"], env=dict(os.environ))
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await exercise(session, "stdio")


async def http(url, key):
    async with httpx2.AsyncClient() as raw:
        r = await raw.post(url, json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
                           headers={"Accept": "application/json, text/event-stream"})
        assert r.status_code == 401, (r.status_code, r.text)
    ok("http: 401 without the key")
    async with create_mcp_http_client(headers={"Authorization": f"Bearer {key}"}) as client:
        async with streamable_http_client(url, http_client=client) as (read, write):
            async with ClientSession(read, write) as session:
                await exercise(session, "http")


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        anyio.run(stdio, sys.argv[2])
    else:
        anyio.run(http, sys.argv[2], sys.argv[3])
    print("all ok", flush=True)
