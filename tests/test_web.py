"""The web console in a real browser: Playwright driving Debian's chromium, headless, against a real `corral up`.

One `corral up --http 127.0.0.1:0` and one browser serve the whole module. The tests sign in
through the form, act through the pages, and check the outcome through the JSON API (another face
of the same client) or the worktree on disk. Screenshots of the main pages are written to
docs/screenshots/ so they show the console as it is. Attacks: a tap token pressing control
buttons (403 shown, nothing done), a form post without the CSRF token (refused, nothing done),
a session used after sign-out, a bad token and a forged sign-in post.
"""

import json
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Cli, agent_command, cli_environment, make_repo
from tests.test_control import start_up, stop_up, wait_until

playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the dev extra)")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: apt-get install -y chromium")
SHOTS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 30_000


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("web")
    env = cli_environment(CORRAL_HOME=str(root / "home"), **{FORGE_TOKEN_ENV: "forge-token-5e1f"})
    env.pop("CORRAL_NATS_URL", None)
    cli = Cli(root / "home", env)
    repo = make_repo(root / "repo")
    subprocess.run(["git", "init", "-q", "--bare", str(root / "remote.git")], check=True)
    subprocess.run(["git", "-C", str(repo), "remote", "add", "origin", str(root / "remote.git")], check=True)
    subprocess.run(["git", "-C", str(repo), "push", "-q", "origin", "main"], check=True)
    forge = FakeForge()
    cli.home.mkdir(parents=True, exist_ok=True)
    (cli.home / "corral.toml").write_text(
        f'[forge]\nbase_url = "{forge.url}"\nrepo = "acme/widgets"\ntoken_env = "{FORGE_TOKEN_ENV}"\n'
    )
    up = start_up(cli, "--http", "127.0.0.1:0")
    try:
        url = wait_until(
            lambda: json.loads((cli.home / "runtime.json").read_text()).get("http_url"), 30, "the HTTP address"
        )
        operator = cli("token", "create", "alice", "--role", "operator", check=True).stdout.strip()
        tap = cli("token", "create", "watcher", "--role", "tap", check=True).stdout.strip()
        with playwright_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
            try:
                yield {
                    "cli": cli,
                    "url": str(url),
                    "repo": repo,
                    "operator": operator,
                    "tap": tap,
                    "browser": browser,
                    "forge": forge,
                }
            finally:
                browser.close()
    finally:
        stop_up(cli, up)
        forge.close()


FORGE_TOKEN_ENV = "CORRAL_TEST_WEB_FORGE_TOKEN"


class FakeForge:
    """A GitHub-shaped forge on 127.0.0.1 (as in tests/test_pr.py): records the pull requests it is asked for."""

    def __init__(self) -> None:
        self.pulls: list[dict[str, Any]] = []
        forge = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "GET" and self.path == "/api/repos/acme/widgets":
                    status, payload = 200, {"full_name": "acme/widgets", "default_branch": "main"}
                elif self.command == "POST" and self.path == "/api/repos/acme/widgets/pulls":
                    forge.pulls.append(json.loads(body))
                    status, payload = 201, {"number": 7, "html_url": "http://127.0.0.1/acme/widgets/pull/7"}
                else:
                    status, payload = 404, {"message": "Not Found"}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def api(console: dict[str, Any], token: str = "operator") -> httpx.Client:
    return httpx.Client(base_url=console["url"], headers={"Authorization": f"Bearer {console[token]}"}, timeout=60)


def submit(console: dict[str, Any], command: list[str], **extra: Any) -> str:
    with api(console) as http:
        response = http.post("/api/executions", json={"repo": str(console["repo"]), "command": command, **extra})
    assert response.status_code == 201, response.text
    return str(response.json()["execution_id"])


def status(console: dict[str, Any], execution_id: str) -> dict[str, Any]:
    with api(console, "tap") as http:
        return dict(http.get(f"/api/executions/{execution_id}").json())


def wait_state(console: dict[str, Any], execution_id: str, *states: str) -> dict[str, Any]:
    return wait_until(  # type: ignore[return-value]
        lambda: (s := status(console, execution_id))["state"] in states and s, 60, f"{execution_id} {states}"
    )


def output(console: dict[str, Any], execution_id: str) -> str:
    with api(console, "tap") as http:
        return "".join(c["text"] for c in http.get(f"/api/executions/{execution_id}/logs").json())


def sign_in(console: dict[str, Any], token: str = "operator", *, init: str | None = None, **context: Any) -> Any:
    """A new browser context (its own cookies) signed in through the form; its page."""
    ctx = console["browser"].new_context(**context)
    ctx.set_default_timeout(TIMEOUT_MS)
    if init:
        ctx.add_init_script(init)
    page = ctx.new_page()
    page.on("dialog", lambda dialog: dialog.accept())
    page.goto(console["url"] + "/")
    assert "/login" in page.url  # not signed in: sent to the form
    page.fill("input[name=token]", console[token])
    page.click("button[type=submit]")
    page.wait_for_selector("#fleet", state="attached")
    return page


# Records the notifications a page shows (headless chromium has no notification centre to look at).
RECORD_NOTIFICATIONS = """
window.__notes = [];
window.Notification = class {
  constructor(title, options) { window.__notes.push(`${title}: ${(options || {}).body || ''}`); }
  static get permission() { return 'granted'; }
  static requestPermission() { return Promise.resolve('granted'); }
};
"""


def counts(page: Any) -> dict[str, int]:
    """The fleet view's counts per state (and `all`), as shown."""
    return {
        str(el.get_attribute("data-count")): int(el.text_content() or 0)
        for el in page.query_selector_all("[data-count]")
    }


def live(page: Any) -> None:
    """Until the page's event stream is open (and the server's consumer behind it has started)."""
    page.wait_for_selector("body[data-live='1']", state="attached")
    page.wait_for_timeout(500)


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=False)


def flash(page: Any, expected: str) -> str:
    """The page's message, once it says `expected`."""
    page.locator("#flash:not([hidden])", has_text=expected).wait_for()
    return str(page.text_content("#flash"))


def test_sign_in_then_a_new_run_appears_live_and_its_output_streams(console: dict[str, Any]) -> None:
    page = sign_in(console, viewport={"width": 1280, "height": 800})
    try:
        live(page)  # the page's event stream is connected before the run is submitted
        before = counts(page)
        script = (
            "for i in 1 2 3 4 5 6; do printf '\\033[32mgreen %s\\033[0m plain\\n' $i; sleep 0.3; done; "
            "echo '<img src=x id=pwned-out>'"
        )
        execution_id = submit(console, ["sh", "-c", script], labels={"team": "web", "note": "<b id=pwned-label>x</b>"})
        row = page.wait_for_selector(f"#x-{execution_id}")  # appeared without a reload
        assert row is not None and "team=web" in (row.text_content() or "")
        page.wait_for_selector(f"#x-{execution_id}[data-state=exited]")
        # the counts moved with it, live: one more in all and exited, the others as they were
        after = counts(page)
        assert after["all"] == before["all"] + 1 and after["exited"] == before["exited"] + 1, (before, after)
        assert {k: v for k, v in after.items() if k not in ("all", "exited")} == {
            k: v for k, v in before.items() if k not in ("all", "exited")
        }
        page.click(f"#x-{execution_id} a.xid")
        page.wait_for_url(f"**/x/{execution_id}")
        page.locator("#output", has_text="green 6").wait_for()
        assert page.locator("#output span.fg32").count() >= 6  # ANSI green rendered as a colour, not as escapes
        assert "\x1b" not in (page.text_content("#output") or "")
        page.wait_for_selector("#x-state.s-exited")
        page.wait_for_selector("#timeline li[data-type='execution.exited']")
        page.fill("#timeline-filter", "exited")
        assert page.locator("#timeline li:not([hidden])").count() == 1
        page.locator("#output", has_text="<img src=x id=pwned-out>").wait_for()  # markup shown as text
        assert page.locator("#pwned-out").count() == 0
        shot(page, "execution")
        page.goto(console["url"] + "/?label=team%3Dweb")
        page.wait_for_selector(f"#x-{execution_id}[data-state=exited]")
        assert page.locator("#fleet-rows tr").count() == 1  # the label filter, kept in the URL
        assert "<b id=pwned-label>x</b>" in (page.text_content(f"#x-{execution_id}") or "")
        assert "<img src=x id=pwned-out>" in (page.text_content(f"#x-{execution_id} .c-last") or "")
        assert page.locator("#pwned-label, #pwned-out").count() == 0  # escaped by the server, not parsed
        page.goto(console["url"] + "/")
        shot(page, "fleet")
    finally:
        page.context.close()


def test_approval_in_the_phone_inbox_approved_lets_the_agent_finish(console: dict[str, Any]) -> None:
    phone = sign_in(console, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    desk = sign_in(console, init=RECORD_NOTIFICATIONS)
    try:
        live(desk)  # its event stream is connected before the agent asks
        asks = agent_command("deploy", "--ask-approval", "deploy", "--steps", "2", "--sleep", "0", "--heartbeat")
        execution_id = submit(console, asks[1:])
        # attention on the open console tab: a notification and the title badge
        desk.locator("#nav-approvals", has_text="1").wait_for()
        assert desk.title().startswith("(1) ")
        notes = desk.evaluate("window.__notes")
        assert any(n.startswith("Approval needed: ") and "may I deploy?" in n for n in notes), notes
        phone.goto(console["url"] + "/approvals")
        card = phone.wait_for_selector("article.approval.pending")  # arrives live, or is there already
        assert "may I deploy?" in (card.text_content() or "")
        assert phone.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the phone
        assert phone.title().startswith("(1)")  # the title badge counts the pending approval
        desk.goto(console["url"] + "/approvals")
        desk.wait_for_selector("article.approval.pending")
        shot(desk, "approvals")
        shot(phone, "approvals-phone")
        phone.click("article.approval.pending button.approve[value=yes]")
        assert "approved (yes)" in flash(phone, "approved")
        assert wait_state(console, execution_id, "exited")["exit_code"] == 0
        assert "approved choice=yes" in output(console, execution_id)
        for path in ("/", f"/x/{execution_id}"):  # the fleet and the run's tail fit the phone too
            phone.goto(console["url"] + path)
            phone.wait_for_selector("#fleet-rows tr, #output", state="attached")
            assert phone.evaluate("document.documentElement.scrollWidth") <= 390, path
        phone.goto(console["url"] + "/")
        phone.wait_for_selector(f"#x-{execution_id}")
        assert phone.text_content(f"#x-{execution_id} .c-progress") == "100%"  # its last heartbeat's progress
        shot(phone, "fleet-phone")
        # the desktop inbox, open meanwhile, re-renders live: the card moved to the decided ones, with who decided
        decided = desk.wait_for_selector("article.approval.decided")
        assert "granted by alice (yes)" in (decided.text_content() or "")
        # a decision posted from a page that still showed the card: refused, saying who was first
        approval_id = str(decided.get_attribute("id"))[3:]
        late = desk.request.post(
            f"{console['url']}/approvals/{approval_id}/decide",
            form={"csrf": desk.get_attribute("body", "data-csrf"), "decision": "reject"},
            headers={"Accept": "application/json"},
        )
        assert late.status == 409 and "already decided: granted by alice" in late.json()["error"]
        with api(console) as http:
            granted = http.post(
                "/api/sql",
                json={
                    "sql": f"SELECT data->>'decided_by' FROM events WHERE execution_id = '{execution_id}' "
                    "AND type = 'approval.granted'"
                },
            ).json()["rows"]
        assert granted == [["alice"]]
    finally:
        phone.context.close()
        desk.context.close()


def test_line_comment_reaches_the_agent_and_a_file_is_rolled_back(console: dict[str, Any]) -> None:
    script = "printf 'changed\\n' >> README.md; echo new > other.txt; echo ready; exec cat"
    execution_id = submit(console, ["sh", "-c", script])
    wait_until(lambda: "ready" in output(console, execution_id), 60, "the run to edit its files")
    worktree = Path(status(console, execution_id)["worktree"])
    page = sign_in(console, viewport={"width": 1280, "height": 900})
    try:
        page.goto(f"{console['url']}/x/{execution_id}/changes")
        readme = "section.file[data-path='README.md']"
        page.wait_for_selector(readme)
        page.click(f"{readme} tr.add[data-line='2']")  # the added line
        page.fill("tr.comment-box textarea", "say why this line changed")
        page.click("tr.comment-box button.add-comment")
        page.click("section.file[data-path='other.txt'] tr.add")
        page.fill("tr.comment-box textarea", "drop this file")
        page.click("tr.comment-box button.add-comment")
        shot(page, "changes")
        page.click("#send-comments")
        assert "2 comments sent to the running agent" in flash(page, "comments sent")
        wait_until(
            lambda: (
                "- README.md:2: say why this line changed\n- other.txt:1: drop this file"
                in output(console, execution_id)
            ),
            30,
            "the comments on the agent's stdin (cat echoes them)",
        )
        assert (worktree / "README.md").read_text() == "# demo\nchanged\n"
        page.click(f"{readme} form button.danger")  # roll README.md back to the base (confirm accepted)
        assert "rolled back README.md to checkpoint 0" in flash(page, "rolled back")
        page.wait_for_url(re.compile(r"msg=rolled"))  # the page shows the new diff (with the message)
        assert page.locator("section.file[data-path='README.md']").count() == 0
        assert (worktree / "README.md").read_text() == "# demo\n"
        assert (worktree / "other.txt").read_text() == "new\n"  # only that file
        # a checkpoint now (or the one the rollback made); the diff from the base to it, side by side: other.txt only
        with api(console) as http:
            assert http.post(f"/api/executions/{execution_id}/checkpoint").status_code == 200
            n = http.get(f"/api/executions/{execution_id}/checkpoints").json()[-1]["n"]
        page.goto(f"{console['url']}/x/{execution_id}/changes?from=0&to={n}&view=split")
        page.wait_for_selector("section.file[data-path='other.txt'] table.split td.code.add")
        assert page.locator("section.file[data-path='README.md']").count() == 0
        # commit the worktree from the page: on the run's branch, with that message
        page.fill("input[name=message]", "from the console")
        page.click("button[value=commit]")
        assert "committed" in flash(page, "committed")
        page.wait_for_url(re.compile(r"msg=committed"))
        subject = subprocess.run(
            ["git", "-C", str(worktree), "log", "-1", "--format=%s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        assert subject == "from the console"
        # push the branch and open a pull request from the page
        page.fill("input[name=title]", "Console change")
        page.click("button[value=pr]")
        assert "http://127.0.0.1/acme/widgets/pull/7" in flash(page, "pull request")
        assert [(p["title"], p["head"]) for p in console["forge"].pulls] == [
            ("Console change", f"corral/{execution_id}")
        ]
        page.wait_for_url(re.compile(r"msg=pull"))
        # once it ended, comments cannot reach a plain command: said, nothing started
        with api(console) as http:
            http.post(f"/api/executions/{execution_id}/cancel", json={"grace_s": 0})
        late = page.request.post(
            f"{console['url']}/x/{execution_id}/review",
            form={
                "csrf": page.get_attribute("body", "data-csrf"),
                "comments": json.dumps([{"path": "README.md", "line": 2, "text": "too late"}]),
            },
            headers={"Accept": "application/json"},
        )
        assert late.status == 409 and "no agent CLI that can be resumed" in late.json()["error"]
    finally:
        page.context.close()
        with api(console) as http:
            http.post(f"/api/executions/{execution_id}/cancel", json={"grace_s": 0})


def test_tap_cannot_press_controls_csrf_is_required_and_sign_out_ends_the_session(console: dict[str, Any]) -> None:
    execution_id = submit(console, ["sh", "-c", "echo up; sleep 60"], timeout="10m")
    wait_state(console, execution_id, "running")
    tap = sign_in(console, "tap")
    operator = sign_in(console)
    try:
        tap.goto(f"{console['url']}/x/{execution_id}")
        tap.locator("#x-left", has_text="9m").wait_for()  # the hard timeout's time left, counting down
        tap.click("button[value=pause]")
        message = flash(tap, "403")
        assert message.startswith("403: ") and "read-only" in message
        tap.click("button[value=cancel]")
        assert "may not cancel" in flash(tap, "cancel")
        shot(tap, "tap-refused")
        # a state-changing post with the session cookie but without the CSRF token: refused
        target = f"{console['url']}/x/{execution_id}/pause"
        refused = operator.request.post(target, form={"reason": "csrf"}, headers={"Accept": "application/json"})
        assert refused.status == 403 and "CSRF" in refused.json()["error"]
        wrong = operator.request.post(target, form={"csrf": "guess"})  # as a browser without the script posts
        assert wrong.status == 403 and "CSRF token is missing or wrong" in wrong.text() and "<html" in wrong.text()
        assert status(console, execution_id)["state"] == "running"  # nothing was paused or cancelled
        # the operator's own button works; a fleet view filtered on `paused`, open meanwhile, gets the row live
        watch = operator.context.new_page()
        watch.goto(f"{console['url']}/?state=paused")
        live(watch)
        assert watch.locator(f"#x-{execution_id}").count() == 0
        operator.goto(f"{console['url']}/x/{execution_id}")
        operator.click("button[value=pause]")
        assert flash(operator, "paused") == "paused"
        assert status(console, execution_id)["state"] == "paused"
        watch.wait_for_selector(f"#x-{execution_id}[data-state=paused]")
        watch.close()
        operator.click("button[value=resume]")
        assert flash(operator, "resumed") == "resumed"
        operator.locator("#x-state", has_text="running").wait_for()  # the page's status follows, live
        operator.fill("input[name=text]", "hello")
        operator.click("button[value=input]")
        assert flash(operator, "sent") == "sent 6 bytes to the agent"
        operator.click("button[value=extend]")
        assert flash(operator, "extended") == "hard timeout extended by 600s"
        with api(console, "tap") as http:
            kinds = http.post(
                "/api/sql",
                json={"sql": f"SELECT type FROM events WHERE execution_id = '{execution_id}' ORDER BY seq"},
            ).json()["rows"]
        assert {"execution.resumed", "input.delivered", "timeout.extended"} <= {k[0] for k in kinds}
        operator.click("button[value=cancel]")  # asks to confirm (accepted)
        assert flash(operator, "cancelled").startswith("cancelled: execution.")
        operator.locator("#x-state", has_text="exited").wait_for()
        # sign out: the cookie no longer opens anything, even replayed by hand
        cookie = next(c for c in operator.context.cookies() if c["name"] == "corral_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
        other = operator.context.new_page()  # another tab of the same session, its stream open
        other.goto(console["url"] + "/")
        live(other)
        operator.click("#sign-out")
        operator.wait_for_url("**/login**")
        other.wait_for_url("**/login**")  # its stream ended with the session: sent to the sign-in form
        replay = console["browser"].new_context()
        replay.add_cookies([cookie])
        again = replay.new_page()
        again.goto(console["url"] + "/")
        assert "/login" in again.url
        assert replay.request.get(f"{console['url']}/ui/events").status == 401
        replay.close()
    finally:
        tap.context.close()
        operator.context.close()
        with api(console) as http:
            http.post(f"/api/executions/{execution_id}/cancel", json={"grace_s": 0})


def test_sign_in_refuses_bad_tokens_and_forged_posts(console: dict[str, Any]) -> None:
    ctx = console["browser"].new_context()
    try:
        page = ctx.new_page()
        page.goto(console["url"] + "/login")
        page.fill("input[name=token]", "corral_not-a-token")
        page.click("button[type=submit]")
        assert "unknown or revoked token" in flash(page, "unknown")
        shot(page, "login")
        # a sign-in posted from elsewhere carries no sign-in cookie: refused, no session
        forged = httpx.post(f"{console['url']}/login", data={"token": console["operator"], "csrf": "x"})
        assert forged.status_code == 403 and "corral_session" not in forged.headers.get("set-cookie", "")
        # a browser whose sign-in cookie expired gets a fresh form that works
        ctx.clear_cookies()
        page.fill("input[name=token]", console["operator"])
        page.click("button[type=submit]")
        assert "expired" in flash(page, "expired")
        page.fill("input[name=token]", console["operator"])
        page.click("button[type=submit]")
        page.wait_for_selector("#fleet", state="attached")
        ctx.clear_cookies()
        # a crafted link cannot make a page say something: only messages this server signed are shown
        page.goto(console["url"] + "/login?msg=Your+token+expired%2C+paste+it+at+evil.example&sig=0")
        assert page.locator("#flash").is_hidden()
        # an open redirect through `next` is not followed
        page.goto(console["url"] + "/login?next=//evil.example/")
        page.fill("input[name=token]", console["operator"])
        page.click("button[type=submit]")
        page.wait_for_selector("#fleet", state="attached")
        assert page.url.rstrip("/") == console["url"]
        # filters are values, not SQL: quotes in them find nothing and change nothing
        with api(console, "tap") as http:
            events_before = http.post("/api/sql", json={"sql": "SELECT count(*) FROM events"}).json()["rows"][0][0]
        page.goto(console["url"] + "/?q=%27%3B+DROP+TABLE+events%3B+--&label=x%27%29+OR+1%3D1+--%3Dy&repo=%27")
        page.wait_for_selector("#fleet", state="attached")
        assert page.locator("#fleet-rows tr").count() == 0
        with api(console, "tap") as http:
            events_after = http.post("/api/sql", json={"sql": "SELECT count(*) FROM events"}).json()["rows"][0][0]
        assert events_after >= events_before  # the table is there, nothing was removed
        missing = page.request.get(console["url"] + "/x/zzzzzzzz")
        assert missing.status == 404 and "no execution matches" in missing.text() and "<html" in missing.text()
        headers = page.request.get(console["url"] + "/").headers
        assert "script-src 'self'" in headers["content-security-policy"] and headers["x-frame-options"] == "DENY"
    finally:
        ctx.close()


def test_start_a_run_from_the_form_then_search_compare_and_health(console: dict[str, Any]) -> None:
    page = sign_in(console, viewport={"width": 1280, "height": 900})
    try:
        first = submit(console, ["sh", "-c", "echo needle-one"])
        page.goto(console["url"] + "/new")
        page.fill("input[name=repo]", str(console["repo"]))
        page.fill("input[name=command]", "sh -c 'echo needle-two'")
        page.fill("input[name=labels]", "from=form")
        page.click("button[value=start]")
        page.wait_for_url("**/x/*")  # the new run's page
        second = page.url.rsplit("/", 1)[-1]
        page.locator("#output", has_text="needle-two").wait_for()
        wait_state(console, first, "exited")
        with api(console, "tap") as http:
            assert http.get("/api/executions", params={"label": "from=form"}).json()[0]["execution_id"] == second
        page.goto(console["url"] + "/search?q=needle")
        page.wait_for_selector(f"td a.xid[href='/x/{second}']")
        assert page.locator(f"td a.xid[href='/x/{first}']").count() >= 1
        page.goto(f"{console['url']}/compare?a={first}&b={second}")
        page.wait_for_selector("table.compare")
        # lineage: a replay of the first run is listed on both pages
        with api(console) as http:
            replayed = http.post(f"/api/executions/{first}/replay")
            assert replayed.status_code == 201, replayed.text
            replay = replayed.json()["execution_id"]
        page.goto(f"{console['url']}/x/{first}")
        assert f"replay: {replay}" in (page.text_content("ul.lineage") or "")
        page.goto(f"{console['url']}/x/{replay}")
        assert f"replay of: {first}" in (page.text_content("ul.lineage") or "")
        page.goto(console["url"] + "/health")
        assert "projector" in (page.text_content("main") or "")
        bad = page.request.post(
            console["url"] + "/new",
            form={"csrf": page.get_attribute("body", "data-csrf"), "repo": "/nonexistent/repo", "command": "true"},
            headers={"Accept": "application/json"},
        )
        assert bad.status == 400 and "no such directory" in bad.json()["error"]
    finally:
        page.context.close()


def test_revoking_the_token_ends_its_open_pages(console: dict[str, Any]) -> None:
    console["temp"] = console["cli"]("token", "create", "temp", "--role", "operator", check=True).stdout.strip()
    page = sign_in(console, "temp")
    try:
        live(page)
        console["cli"]("token", "revoke", "temp", check=True)
        page.wait_for_url("**/login**")  # the open stream ended (checked every few seconds), then 401
        assert page.request.get(console["url"] + "/approvals").url.split("?")[0].endswith("/login")
    finally:
        page.context.close()
