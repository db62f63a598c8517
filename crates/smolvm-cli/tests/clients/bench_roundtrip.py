"""smolvm-bench's E2B figure: the official Python SDK's `commands.run("true")` round trip
through `smolvm serve`. Creates one sandbox, prints `ready <id>`; then for each `run` line on
stdin runs one command and prints its milliseconds; `quit` kills the sandbox and exits.
"""

import sys
import time

from e2b import Sandbox

sbx = Sandbox.create(timeout=3600)
sbx.commands.run("true")  # warm: the agent connection, the first translation of `true`
print("ready " + sbx.sandbox_id, flush=True)
for line in sys.stdin:
    if line.strip() != "run":
        break
    t = time.perf_counter()
    r = sbx.commands.run("true")
    ms = (time.perf_counter() - t) * 1000
    assert r.exit_code == 0
    print(f"{ms:.3f}", flush=True)
sbx.kill()
