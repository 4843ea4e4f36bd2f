"""A student's browser against the hub, for qemu-tests/tests/apiserver.rs: logs in through the
proxy's login form, gets an API token, and asks for servers. Prints what each step answered as
one JSON object; the Rust test asserts on it (and on what the API server then holds).

    hub_client.py report PUBLIC_URL ALICE_PASSWORD BOB_PASSWORD
    hub_client.py spawn PUBLIC_URL USER PASSWORD PROJECT
    hub_client.py whoami PUBLIC_URL TOKEN
    hub_client.py login PUBLIC_URL USER PASSWORD
    hub_client.py token PUBLIC_URL USER PASSWORD [SCOPE,...]
    hub_client.py api PUBLIC_URL TOKEN METHOD PATH [JSON_BODY]
"""
import json
import sys
import time

import requests

command, url = sys.argv[1:3]


def xsrf(s):
    """The newest _xsrf cookie (the hub binds it to the session: the one from before login no
    longer counts after it)."""
    values = [c.value for c in s.cookies if c.name == "_xsrf"]
    return values[-1] if values else ""


def login(name, password):
    s = requests.Session()
    page = s.get(url + "/hub/login", timeout=30)
    if page.status_code != 200:
        # What the hub (or the proxy) said, for the test's failure message.
        sys.exit("GET /hub/login answered %d: %s" % (page.status_code, page.text[:2000]))
    r = s.post(
        url + "/hub/login",
        data={"username": name, "password": password, "_xsrf": xsrf(s)},
        allow_redirects=False,
        timeout=30,
    )
    return s, r


def whoami(s):
    r = s.get(url + "/hub/api/user", timeout=30)
    return r.status_code, (r.json() if r.status_code == 200 else None)


def token(s, name, scopes=None):
    # A page after login gives the session's own _xsrf cookie, which a cookie-authenticated
    # POST needs.
    s.get(url + "/hub/token", timeout=30)
    body = {"note": "test", "expires_in": 600}
    if scopes:
        body["scopes"] = scopes
    r = s.post(
        url + "/hub/api/users/%s/tokens" % name,
        json=body,
        headers={"X-XSRFToken": xsrf(s)},
        timeout=30,
    )
    return r.status_code, (r.json()["token"] if r.status_code == 201 else "")


if command == "spawn":
    name, password, project = sys.argv[3:6]
    s, r = login(name, password)
    _, tok = token(s, name)
    deadline = time.monotonic() + 90
    while True:
        r = requests.post(
            url + "/hub/api/users/%s/server" % name,
            json={"profile": project},
            headers={"Authorization": "token " + tok},
            timeout=60,
        )
        # A failed spawn takes the hub a moment to clean up: 400 ("pending") until then.
        if r.status_code != 400 or time.monotonic() > deadline:
            break
        time.sleep(2)
    print(json.dumps({"status": r.status_code, "text": r.text[:300]}))
    sys.exit(0)

if command == "token":
    s, r = login(sys.argv[3], sys.argv[4])
    status, tok = token(s, sys.argv[3], sys.argv[5].split(",") if len(sys.argv) > 5 else None)
    print(json.dumps({"status": status, "token": tok}))
    sys.exit(0)

if command == "api":
    token, method, path = sys.argv[3:6]
    body = json.loads(sys.argv[6]) if len(sys.argv) > 6 else None
    r = requests.request(method, url + path, json=body, headers={"Authorization": "token " + token}, timeout=120)
    try:
        data = r.json()
    except ValueError:
        data = r.text[:2000]
    print(json.dumps({"status": r.status_code, "body": data}))
    sys.exit(0)

if command == "whoami":
    r = requests.get(url + "/hub/api/user", headers={"Authorization": "token " + sys.argv[3]}, timeout=30)
    print(json.dumps({"status": r.status_code}))
    sys.exit(0)

if command == "login":
    s, r = login(sys.argv[3], sys.argv[4])
    status, me = whoami(s)
    print(json.dumps({"status": status, "name": me and me["name"], "admin": me and me["admin"]}))
    sys.exit(0)

alice_pw, bob_pw = sys.argv[3:5]
report = {}
for case, (name, pw) in {
    "wrong_password": ("alice", "not-" + alice_pw),
    "not_on_roster": ("mallory", alice_pw),
    "empty_password": ("alice", ""),
}.items():
    s, r = login(name, pw)
    report[case] = {"status": r.status_code, "whoami": whoami(s)[0]}

s, r = login("alice", alice_pw)
report["alice_login"] = {"status": r.status_code, "location": r.headers.get("Location", "")}
status, me = whoami(s)
report["alice"] = {"status": status, "name": me and me["name"], "admin": me and me["admin"]}
status, tok = token(s, "alice")
report["token"] = {"status": status, "token": tok}
api = {"Authorization": "token " + tok}
r = requests.post(url + "/hub/api/users/alice/server", json={"profile": "p2"}, headers=api, timeout=60)
report["spawn_p2"] = {"status": r.status_code, "message": r.json().get("message", "") if r.content else ""}
r = requests.post(url + "/hub/api/users/bob/server", json={}, headers=api, timeout=60)
report["spawn_for_bob"] = {"status": r.status_code}

s, r = login("bob", bob_pw)
status, me = whoami(s)
report["bob"] = {"status": status, "name": me and me["name"], "admin": me and me["admin"]}
print(json.dumps(report))
