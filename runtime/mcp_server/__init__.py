"""`corral mcp`: Corral's sandboxes, sessions and deep tasks as MCP tools (docs/mcp.md).

`tools` builds the MCP server whose tools call a daemon through runtime/client.py;
`live_sessions` holds the session streams those tools steer; `private_daemon` is the daemon
`corral mcp` starts when none is named. Imported only by the `corral mcp` verb: it needs
the `mcp` SDK (`pip install 'corral[mcp]'`).
"""
