"""The official E2B Python SDK against `smolvm serve`, configured only by its documented
environment variables (E2B_API_KEY, E2B_API_URL, E2B_SANDBOX_URL). Run by tests/serve.rs;
each check prints `ok: <name>` and any failure raises (exit status 1). Every wait is bounded.
"""

import hashlib
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.request

from e2b import Sandbox
from e2b.exceptions import (
    AuthenticationException,
    NotFoundException,
    SandboxException,
    TimeoutException,
)
from e2b.sandbox.commands.command_handle import CommandExitException


def ok(name, **facts):
    print("ok: " + name + (" " + json.dumps(facts) if facts else ""), flush=True)


def raw(method, path, body=None, key=None):
    """A plain HTTP request to the server (for what the SDK cannot send: malformed bodies)."""
    url = os.environ["E2B_API_URL"] + path
    req = urllib.request.Request(url, method=method, data=body)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("X-API-Key", key)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def basics():
    sbx = Sandbox.create(timeout=300, metadata={"suite": "e2b-py"}, envs={"GREETING": "hello"})
    r = sbx.commands.run("echo hi")
    assert (r.stdout, r.exit_code) == ("hi\n", 0), r
    r = sbx.commands.run("echo $GREETING from $0")
    assert r.stdout.startswith("hello from"), r
    ok("commands.run", stdout=r.stdout)

    try:
        sbx.commands.run("echo out; echo err >&2; exit 3")
        raise AssertionError("a failing command did not raise")
    except CommandExitException as e:
        assert (e.exit_code, e.stdout, e.stderr) == (3, "out\n", "err\n"), e
    ok("failing command raises CommandExitException")

    chunks = []
    r = sbx.commands.run("for i in 1 2 3; do echo line$i; sleep 0.3; done", on_stdout=chunks.append)
    assert "".join(chunks) == "line1\nline2\nline3\n" and len(chunks) >= 2, chunks
    ok("on_stdout streams", chunks=len(chunks))

    h = sbx.commands.run("sleep 600", background=True)
    listed = [p.pid for p in sbx.commands.list()]
    assert h.pid in listed, (h.pid, listed)
    assert h.kill() is True
    try:
        h.wait()
        raise AssertionError("a killed command exited cleanly")
    except CommandExitException as e:
        assert e.exit_code != 0
    assert h.pid not in [p.pid for p in sbx.commands.list()]
    ok("background + kill", pid=h.pid)

    h = sbx.commands.run("for i in 1 2 3 4 5 6; do echo tick$i; sleep 0.4; done", background=True)
    time.sleep(0.6)
    again = sbx.commands.connect(h.pid)
    r = again.wait()
    assert r.exit_code == 0 and "tick6" in r.stdout and "tick1" not in r.stdout, r.stdout
    ok("commands.connect to a running command", stdout=r.stdout.split())

    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "fed through stdin\n")
    sbx.commands.close_stdin(h.pid)
    r = h.wait()
    assert r.stdout == "fed through stdin\n", r
    ok("stdin")

    sbx.files.write("/home/user/notes/a.txt", "text file\n")
    assert sbx.files.read("/home/user/notes/a.txt") == "text file\n"
    blob = os.urandom(5 * 1024 * 1024)
    sbx.files.write("/root/blob.bin", blob)
    back = sbx.files.read("/root/blob.bin", format="bytes")
    assert hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest()
    r = sbx.commands.run("sha256sum /root/blob.bin")
    assert r.stdout.split()[0] == hashlib.sha256(blob).hexdigest()
    names = sorted(e.name for e in sbx.files.list("/home/user/notes"))
    assert names == ["a.txt"], names
    assert sbx.files.exists("/root/blob.bin") and not sbx.files.exists("/root/nope")
    info = sbx.files.get_info("/root/blob.bin")
    assert info.size == len(blob), info
    sbx.files.make_dir("/root/d/e")
    sbx.files.rename("/root/blob.bin", "/root/d/e/moved.bin")
    sbx.files.remove("/root/d")
    assert not sbx.files.exists("/root/d")
    ok("files: write/read text and 5 MB binary, list, stat, mkdir, rename, remove", sha256=hashlib.sha256(blob).hexdigest()[:16])

    sbx.files.make_dir("/root/w")
    w = sbx.files.watch_dir("/root/w", recursive=True)
    sbx.files.write("/root/w/new.txt", "x")
    sbx.commands.run("mkdir /root/w/sub && echo y > /root/w/sub/deep.txt && rm /root/w/new.txt")
    seen = set()
    deadline = time.time() + 20
    while time.time() < deadline and not {("new.txt", "REMOVE"), ("sub/deep.txt", "CREATE")} <= seen:
        seen |= {(e.name, str(e.type).rsplit(".", 1)[-1].upper()) for e in w.get_new_events()}
        time.sleep(0.3)
    w.stop()
    assert ("new.txt", "REMOVE") in seen and ("sub/deep.txt", "CREATE") in seen, seen
    ok("files.watch_dir (recursive) sees create and remove", events=len(seen))

    ids = []
    pager = Sandbox.list()
    while True:
        ids += [s.sandbox_id for s in pager.next_items()]
        if not pager.has_next:
            break
    assert sbx.sandbox_id in ids, ids
    info = sbx.get_info()
    assert info.metadata == {"suite": "e2b-py"}, info
    ok("Sandbox.list and get_info", count=len(ids))
    return sbx


def hostile(sbx):
    # Root in the guest tries the server's own port at the host's gateway address: the default
    # network reaches the internet only, never the host.
    port = os.environ["E2B_API_URL"].rsplit(":", 1)[1]
    r = sbx.commands.run(
        f"timeout 5 bash -c 'exec 3<>/dev/tcp/10.0.2.2/{port}' && echo reached || echo refused"
    )
    assert r.stdout.strip() == "refused", r
    # A second sandbox's token does not open this one.
    other = Sandbox.create(timeout=120)
    status, body = None, None
    req = urllib.request.Request(
        os.environ["E2B_SANDBOX_URL"] + "/process.Process/List", method="POST", data=b"{}"
    )
    req.add_header("Content-Type", "application/json")
    req.add_header("E2b-Sandbox-Id", sbx.sandbox_id)
    req.add_header("X-Access-Token", other._envd_access_token)
    try:
        urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as e:
        status = e.code
    assert status == 401, status
    other.kill()
    # Files that never end or never start: refused at once, not streamed or waited on.
    sbx.commands.run("mkfifo /tmp/fifo")
    for path in ["/dev/zero", "/tmp/fifo"]:
        try:
            sbx.files.read(path, request_timeout=60)
            raise AssertionError(f"{path} was read")
        except SandboxException as e:
            assert "not a regular file" in str(e), e
    ok("hostile: the guest cannot reach the server; one sandbox's token opens no other; /dev/zero and a FIFO are refused")


def concurrency():
    boxes = [Sandbox.create(timeout=300) for _ in range(5)]
    results, errors = {}, []

    def run(i):
        sbx = boxes[i % 5]
        try:
            r = sbx.commands.run(f"echo $(( {i} * {i} )); hostname")
            results[i] = (r.stdout.split()[0], r.stdout.split()[1])
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    for i in range(20):
        assert results[i] == (str(i * i), boxes[i % 5].sandbox_id), (i, results.get(i))
    for b in boxes:
        b.kill()
    ok("5 sandboxes, 20 concurrent commands", results=len(results))


def bad_input():
    try:
        Sandbox.create(api_key="smolvm_not_the_key")
        raise AssertionError("a wrong key was accepted")
    except AuthenticationException:
        pass
    status, body = raw("GET", "/v2/sandboxes", key="smolvm_not_the_key")
    assert status == 401 and body["code"] == 401, (status, body)
    try:
        Sandbox.create(template="no-such-template")
        raise AssertionError("an unknown template was accepted")
    except (NotFoundException, SandboxException) as e:
        assert "no-such-template" in str(e), e
    status, body = raw("POST", "/v2/sandboxes", b"{not json", key=os.environ["E2B_API_KEY"])
    assert status == 400 and body["code"] == 400, (status, body)
    status, body = raw("POST", "/v2/sandboxes", b'{"templateID": 5}', key=os.environ["E2B_API_KEY"])
    assert status == 400, (status, body)
    sbx = Sandbox.create(timeout=120)
    sid = sbx.sandbox_id
    assert sbx.kill() is True
    assert Sandbox.kill(sid) is False
    try:
        sbx.commands.run("echo too late")
        raise AssertionError("a command ran in a killed sandbox")
    except SandboxException as e:
        assert "not found" in str(e).lower() or "not running" in str(e).lower(), e
    # ... and the server keeps serving.
    again = Sandbox.create(timeout=120)
    assert again.commands.run("echo still").stdout == "still\n"
    again.kill()
    ok("bad input: wrong key, unknown template, malformed body, command after kill")


def timeout_and_pause(sbx):
    sbx.commands.run("echo kept > /root/mark; nohup sh -c 'i=0; while true; do i=$((i+1)); echo $i > /root/count; sleep 0.2; done' >/dev/null 2>&1 &")
    time.sleep(1)
    assert sbx.pause() is True
    listed = {s.sandbox_id: s.state for s in Sandbox.list().next_items()}
    assert str(listed[sbx.sandbox_id]).lower().endswith("paused"), listed
    assert Sandbox.pause(sbx.sandbox_id) is False  # already paused
    resumed = Sandbox.connect(sbx.sandbox_id)
    a = int(resumed.commands.run("cat /root/count").stdout)
    time.sleep(1)
    b = int(resumed.commands.run("cat /root/count").stdout)
    assert b > a and resumed.files.read("/root/mark") == "kept\n", (a, b)
    ok("pause, then connect resumes it (files kept, the counter goes on)", before=a, after=b)

    resumed.set_timeout(3)
    deadline = time.time() + 60
    while time.time() < deadline:
        if sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list().next_items()]:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("the sandbox outlived its timeout")
    ok("set_timeout expires the sandbox", waited=round(60 - (deadline - time.time()), 1))


if __name__ == "__main__":
    which = sys.argv[1:] or ["basics", "hostile", "concurrency", "bad_input", "timeout_and_pause"]
    sbx = None
    for w in which:
        if w == "basics":
            sbx = basics()
        elif w == "hostile":
            hostile(sbx or Sandbox.create(timeout=120))
        elif w == "concurrency":
            concurrency()
        elif w == "bad_input":
            bad_input()
        elif w == "timeout_and_pause":
            timeout_and_pause(sbx or Sandbox.create(timeout=300))
    print("all ok", flush=True)
