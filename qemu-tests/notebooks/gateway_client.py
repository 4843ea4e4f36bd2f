"""A user's notebook server against the gateway's front, for qemu-tests/tests/apiserver.rs: the
requests jupyter-server's gateway client makes (kernel list, kernel start), each with the
user's own hub token, and lab-env's registry. Prints what each step answered as one JSON
object; the Rust test asserts on it (and on what the API server then holds).

    gateway_client.py report FRONT_URL ALICE_TOKEN BOB_TOKEN
    gateway_client.py start FRONT_URL TOKEN KERNEL PROJECT
    gateway_client.py call FRONT_URL TOKEN METHOD PATH [JSON_BODY]
    gateway_client.py run FRONT_URL TOKEN KERNEL_ID CODE
"""
import asyncio
import json
import sys
import time
import uuid

import requests
from tornado import httpclient, websocket

command, url = sys.argv[1:3]


def call(method, path, token=None, body=None, timeout=30):
    headers = {"Authorization": "token " + token} if token is not None else {}
    r = requests.request(method, url + path, json=body, headers=headers, timeout=timeout)
    try:
        data = r.json()
    except ValueError:
        data = None
    return {"status": r.status_code, "body": data}


async def execute(token, kernel_id, code):
    """Runs `code` in the kernel over the kernel protocol (the websocket jupyter-server's gateway
    client opens): its stream output and the reply's status."""
    ws_url = url.replace("http", "ws", 1) + "/api/kernels/%s/channels" % kernel_id
    req = httpclient.HTTPRequest(ws_url, headers={"Authorization": "token " + token}, request_timeout=30)
    try:
        ws = await websocket.websocket_connect(req)
    except httpclient.HTTPClientError as e:
        return {"status": e.code}
    msg_id = uuid.uuid4().hex
    header = {"msg_id": msg_id, "username": "", "session": uuid.uuid4().hex, "msg_type": "execute_request", "version": "5.3"}
    content = {"code": code, "silent": False, "store_history": False, "user_expressions": {}, "allow_stdin": False}
    msg = {"header": header, "parent_header": {}, "metadata": {}, "content": content, "channel": "shell", "buffers": []}
    started = time.monotonic()
    await ws.write_message(json.dumps(msg))
    out, reply, idle = "", None, False
    while reply is None or not idle:
        m = await asyncio.wait_for(ws.read_message(), 60)
        if m is None:
            break
        m = json.loads(m)
        if m.get("parent_header", {}).get("msg_id") != msg_id:
            continue
        kind = m["header"]["msg_type"]
        if kind == "stream":
            out += m["content"]["text"]
        elif kind == "error":
            out += "\n".join(m["content"]["traceback"])
        elif kind == "execute_reply":
            reply = m["content"]["status"]
        elif kind == "status" and m["content"]["execution_state"] == "idle":
            idle = True
    ws.close()
    return {"status": 101, "reply": reply, "stdout": out, "seconds": time.monotonic() - started}


if command == "call":
    token, method, path = sys.argv[3:6]
    body = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
    print(json.dumps(call(method, path, token, body, timeout=600)))
    sys.exit(0)

if command == "run":
    token, kernel_id, code = sys.argv[3:6]
    print(json.dumps(asyncio.run(execute(token, kernel_id, code))))
    sys.exit(0)

if command == "start":
    token, kernel, project = sys.argv[3:6]
    # Everything a client could try to decide for itself, asked for: the front must take none
    # of it.
    env = {
        "KERNEL_PROJECT": project,
        "KERNEL_USERNAME": "bob",
        "KERNEL_UID": "0",
        "KERNEL_GID": "0",
        "KERNEL_NAMESPACE": "lab-p2",
        "KERNEL_CPUS_LIMIT": "8",
        "KERNEL_MEMORY_LIMIT": "64Gi",
        "KERNEL_IMAGE": "registry.invalid/evil:1",
        "KERNEL_LAUNCH_TIMEOUT": "3600",
    }
    print(json.dumps(call("POST", "/api/kernels", token, {"name": kernel, "env": env}, timeout=600)))
    sys.exit(0)

alice, bob = sys.argv[3:5]
report = {
    "no_token": call("GET", "/api/kernelspecs"),
    "bad_token": call("GET", "/api/kernelspecs", "not-a-token"),
    "bad_env_name": call("PUT", "/lab/environments/Stats..1", alice),
    "bob_env": call("PUT", "/lab/environments/bobs", bob),
    "alice_envs": call("GET", "/lab/environments", alice),
    "alice_specs": call("GET", "/api/kernelspecs", alice),
    "bob_specs": call("GET", "/api/kernelspecs", bob),
    "alice_bobs_spec": call("GET", "/api/kernelspecs/env-bobs", alice),
    "alice_p2": call("POST", "/api/kernels", alice, {"name": "python3", "env": {"KERNEL_PROJECT": "p2"}}),
    "alice_bobs_env": call("POST", "/api/kernels", alice, {"name": "env-bobs", "env": {"KERNEL_PROJECT": "p1"}}),
    "query_token": call("GET", "/api/kernelspecs?token=" + alice),
    "not_an_object": call("POST", "/api/kernels", alice, ["python3"]),
}
for spec in ("alice_specs", "bob_specs"):
    body = report[spec]["body"] or {}
    report[spec]["names"] = sorted((body.get("kernelspecs") or {}).keys())
    report[spec].pop("body")
print(json.dumps(report))
