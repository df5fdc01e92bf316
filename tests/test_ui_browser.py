"""The web UI in a real browser: Debian's chromium driven by Playwright, against a real `minicoder serve`
subprocess on a tiny random model. Typing, streaming, Stop, sampling fields, the playground's
fill-in-the-middle, errors in words, conversations kept over a reload; screenshots of each view in the
light and the dark theme (into a temp dir, or $MINICODER_UI_SCREENSHOTS: `make screenshots` sets docs/ui).

Skipped, with the reason, where chromium or playwright is missing (`make install` installs both where it
can). The tests run in file order and share one server and one browser profile; the last one stops the server.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import save_tiny_llama
from minicoder.engine.options import resolve_dtype

CHROMIUM = os.environ.get("MINICODER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONTEXT = 2048
MODEL = "tiny-coder"

if not Path(CHROMIUM).exists():
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (`apt-get install chromium`; `make install` "
                "does it when run as root with apt)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="browser tests need playwright (pip install -e '.[dev]')")
expect = sync_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]


# --- fixtures -----------------------------------------------------------------------------------------
def start_minicoder(log_dir: Path, *args: str):
    """`minicoder ARGS --port FREE` as a subprocess, once its / answers: (process, base URL)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_dir / f"{args[0]}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "minicoder", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log.seek(0)
            pytest.fail(f"minicoder {args[0]} did not start:\n{log.read()}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.terminate()
        proc.wait(20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`minicoder serve` on a tiny random Llama: one running request and one waiting at most, so a third is a 429."""
    model = save_tiny_llama(tmp_path_factory.mktemp("model") / MODEL, context=CONTEXT)
    proc, url = start_minicoder(tmp_path_factory.mktemp("logs"), "serve", str(model), "--max-num-seqs", "1",
                                "--max-waiting", "1", "--log-level", "warning")
    yield type("Server", (), {"url": url, "proc": proc, "model_dir": model})
    stop(proc)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_api.sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True,
            viewport={"width": 1280, "height": 820}, permissions=["clipboard-read", "clipboard-write"])
        context.set_default_timeout(40_000)  # generous: the machine may be busy
        yield context
        context.close()


@pytest.fixture
def page(browser, server):
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    expect(page.locator("#server-status")).to_contain_text(MODEL)
    yield page
    page.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    target = os.environ.get("MINICODER_UI_SCREENSHOTS")
    out = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    out.mkdir(parents=True, exist_ok=True)
    return out


# --- helpers --------------------------------------------------------------------------------------------
def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(minicoder_\w+)\{[^}]*\} (\S+)$", text, re.M)
            if "finish_reason" not in m.group(0)}


def aborted_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return float(re.search(r'^minicoder_requests_total\{[^}]*finish_reason="abort"\} (\S+)$', text, re.M).group(1))


def wait_for(condition, timeout: float = 15.0, what: str = "condition"):
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def set_sampling(page, **values):
    for name, value in values.items():
        page.fill(f'#sampling input[name="{name}"]', str(value))


def fresh_conversation(page):
    page.click("#new-conversation")
    expect(page.locator("#messages > li")).to_have_count(0)


def stored_conversation(page) -> dict:
    return page.evaluate("""() => {
        const id = localStorage.getItem('minicoder.currentConversation');
        return JSON.parse(localStorage.getItem('minicoder.conversations')).find(c => c.id === id);
    }""")


def screenshot(page, shots: Path, name: str):
    for scheme in ("light", "dark"):
        page.emulate_media(color_scheme=scheme)
        page.wait_for_timeout(100)
        page.screenshot(path=str(shots / f"{name}-{scheme}.png"))
    page.emulate_media(color_scheme="light")


# --- chat -----------------------------------------------------------------------------------------------
def test_reply_streams_token_by_token_with_counts(page, server):
    fresh_conversation(page)
    set_sampling(page, temperature=0, max_tokens=600, top_k=0, top_p=1, repetition_penalty=1, seed="")
    # Record the reply's text each time the page changes it.
    page.evaluate("""() => {
        window.seen = [];
        new MutationObserver(() => {
            const body = document.querySelector('#messages > li.assistant:last-child .body');
            if (body && !body.querySelector('.typing')) window.seen.push(body.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#prompt", "def fibonacci(n):")
    page.press("#prompt", "Enter")  # Enter sends
    meta = page.locator("#messages > li.assistant .meta")
    expect(meta).to_contain_text("tokens/s", timeout=60_000)
    seen = page.evaluate("window.seen")
    growing = [n for i, n in enumerate(seen) if i == 0 or n > seen[i - 1]]
    # At least two partial renders before the last (the page renders once per animation frame, so a busy
    # machine merges many tokens into one render; a reply shown only when complete gives one length).
    assert len(set(growing)) >= 3, f"the reply did not grow in steps: text lengths seen {seen}"

    # The stored reply is what the API gives for the same greedy request, and the counts are the server's.
    reply = stored_conversation(page)["messages"][-1]
    api = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "def fibonacci(n):"}], "temperature": 0, "max_tokens": 600}).json()
    assert reply["content"] == api["choices"][0]["message"]["content"]
    assert f"{api['usage']['prompt_tokens']} prompt tokens" in meta.inner_text()
    assert f"{api['usage']['completion_tokens']} tokens" in meta.inner_text()


def test_sampling_fields_reach_the_request(page, server):
    fresh_conversation(page)
    set_sampling(page, temperature=0.35, top_p=0.9, top_k=7, repetition_penalty=1.15, max_tokens=5, seed=1234)
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#prompt", "hello")
        page.click("#send")
    body = request.value.post_data_json
    assert body["temperature"] == 0.35 and body["top_p"] == 0.9 and body["top_k"] == 7
    assert body["repetition_penalty"] == 1.15 and body["max_tokens"] == 5 and body["seed"] == 1234
    assert body["stream"] is True and body["model"] == MODEL
    assert body["messages"] == [{"role": "user", "content": "hello"}]
    expect(page.locator("#messages > li.assistant .meta")).to_contain_text("5 tokens")
    # The settings are kept for the next visit.
    page.reload()
    expect(page.locator('#sampling input[name="temperature"]')).to_have_value("0.35")
    page.click("#sampling-reset")
    expect(page.locator('#sampling input[name="temperature"]')).to_have_value("1")


def test_stop_cancels_on_the_server(page, server):
    fresh_conversation(page)
    aborted = aborted_requests(server.url)
    set_sampling(page, temperature=0, max_tokens=1800, seed="")
    page.fill("#prompt", "Write a long story.")
    page.press("#prompt", "Enter")
    body = page.locator("#messages > li.assistant .body")
    expect(body).not_to_have_text(re.compile(r"^…?$"), timeout=30_000)
    wait_for(lambda: metrics(server.url)["minicoder_num_requests_running"] == 1, what="the request to run")
    expect(page.locator("#stop")).to_be_visible()
    page.keyboard.press("Escape")  # Esc stops
    wait_for(lambda: metrics(server.url)["minicoder_num_requests_running"] == 0, timeout=10, what="the slot to free")
    assert aborted_requests(server.url) == aborted + 1  # cancelled, not run to its 1800 tokens
    expect(page.locator("#messages > li.assistant .meta")).to_contain_text("stopped")
    expect(page.locator("#send")).to_be_visible()
    assert stored_conversation(page)["messages"][-1]["stopped"] is True


def test_edit_and_resend_a_turn(page, server):
    fresh_conversation(page)
    set_sampling(page, temperature=0, max_tokens=8)
    page.fill("#prompt", "first question")
    page.press("#prompt", "Enter")
    expect(page.locator("#messages > li.assistant .meta")).to_contain_text("tokens")
    page.fill("#prompt", "second question")
    page.press("#prompt", "Enter")
    expect(page.locator("#messages > li.assistant .meta")).to_have_count(2)
    expect(page.locator("#messages > li.assistant .meta").nth(1)).to_contain_text("tokens")
    page.locator("#messages > li.user").first.get_by_role("button", name="Edit and resend this message").click()
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#messages > li.user textarea", "an edited question")
        page.press("#messages > li.user textarea", "Enter")
    assert request.value.post_data_json["messages"] == [{"role": "user", "content": "an edited question"}]
    expect(page.locator("#messages > li")).to_have_count(2)
    expect(page.locator("#messages > li.assistant .meta")).to_contain_text("tokens")
    assert [m["content"] for m in stored_conversation(page)["messages"]][0] == "an edited question"


def test_system_prompt_is_sent_first(page, server):
    fresh_conversation(page)
    set_sampling(page, max_tokens=4)
    page.click(".system-prompt summary")
    page.fill("#system-prompt", "You are terse.")
    with page.expect_request("**/v1/chat/completions") as request:
        page.fill("#prompt", "hi")
        page.press("#prompt", "Enter")
    assert request.value.post_data_json["messages"][0] == {"role": "system", "content": "You are terse."}
    expect(page.locator("#messages > li.assistant .meta")).to_contain_text("tokens")


def test_markdown_code_blocks_are_highlighted_sanitized_and_copyable(page, server, shots):
    """A stored conversation renders as a person sees it: Markdown, highlighted code, a working copy button,
    and model text that spells HTML stays inert."""
    code = "def add(a, b):\n    return a + b"
    page.evaluate("""([code]) => {
        const c = {id: 'md-demo', title: 'Write add()', system: '', updated: Date.now(), messages: [
          {role: 'user', content: 'Write a Python function that adds two numbers.'},
          {role: 'assistant', content: 'Here it is:\\n\\n```python\\n' + code + '\\n```\\n\\n'
             + 'Call `add(1, 2)` to get **3**. <img src=x onerror="window.pwned=1"><script>window.pwned=2</script>',
           stats: {prompt_tokens: 21, cached_tokens: 0, completion_tokens: 34, exact: true, seconds: 0.4,
                   first_token_seconds: 0.02, decode_seconds: 0.38, finish_reason: 'stop'}}]};
        const list = JSON.parse(localStorage.getItem('minicoder.conversations') || '[]');
        localStorage.setItem('minicoder.conversations', JSON.stringify([c, ...list.filter(x => x.id !== c.id)]));
        localStorage.setItem('minicoder.currentConversation', c.id);
    }""", [code])
    page.reload()
    block = page.locator("#messages > li.assistant pre.code-block")
    expect(block.locator("span.hljs-keyword").first).to_have_text("def")
    assert page.evaluate("window.pwned") is None
    assert page.locator("#messages img, #messages script").count() == 0
    expect(page.locator("#messages > li.assistant strong")).to_have_text("3")
    block.get_by_role("button", name="Copy python code").click()
    assert page.evaluate("navigator.clipboard.readText()") == code
    # A live reply from the tiny model under the stored one, for the screenshot.
    set_sampling(page, temperature=0.8, max_tokens=40, seed=7)
    page.fill("#prompt", "Now a subtraction function, please.")
    page.press("#prompt", "Enter")
    expect(page.locator("#messages > li.assistant .meta").nth(1)).to_contain_text("tokens/s")
    screenshot(page, shots, "chat")


def test_conversations_are_kept_over_a_reload(page, server):
    before = page.evaluate("JSON.parse(localStorage.getItem('minicoder.conversations')).length")
    texts = page.locator("#messages > li .body").all_inner_texts()
    assert texts, "the current conversation should have messages from the earlier tests"
    page.reload()
    expect(page.locator("#messages > li .body")).to_have_count(len(texts))
    assert page.locator("#messages > li .body").all_inner_texts() == texts
    expect(page.locator("#conversation-list li")).to_have_count(before)
    page.locator("#conversation-list .conversation").nth(1).click()
    expect(page.locator('#conversation-list [aria-current="true"]')).to_have_count(1)


# --- playground -----------------------------------------------------------------------------------------
def test_playground_fills_in_the_middle(page, server, shots):
    page.click("#tab-playground")
    set_sampling(page, temperature=0, top_k=0, top_p=1, repetition_penalty=1, seed="")
    prefix, suffix = "def add(a, b):\n    return ", "\n\n\ndef sub(a, b):\n    return a - b\n"
    page.fill("#fim-prefix", prefix)
    page.fill("#fim-suffix", suffix)
    page.fill("#fim-max-tokens", "12")
    with page.expect_request("**/v1/completions") as request:
        page.click("#fim-run")
    body = request.value.post_data_json
    assert body["prompt"] == prefix and body["suffix"] == suffix and body["max_tokens"] == 12
    expect(page.locator("#fim-stats")).to_contain_text("fill-in-the-middle")
    api = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
        "prompt": prefix, "suffix": suffix, "max_tokens": 12, "temperature": 0}).json()
    middle = api["choices"][0]["text"]
    assert middle, "the tiny model should write something"
    assert page.inner_text("#fim-result .fim-middle") == middle
    assert page.inner_text("#fim-result") == prefix + middle + suffix  # the middle in place between them
    expect(page.locator("#fim-stats")).to_contain_text(f"{api['usage']['completion_tokens']} tokens")
    screenshot(page, shots, "playground")

    page.click("#fim-accept")  # the middle joins the prefix, as accepting an editor suggestion does
    expect(page.locator("#fim-prefix")).to_have_value(prefix + middle)

    page.fill("#fim-suffix", "")  # an empty suffix is a plain completion
    with page.expect_request("**/v1/completions") as request:
        page.click("#fim-run")
    assert "suffix" not in request.value.post_data_json
    expect(page.locator("#fim-stats")).to_contain_text("plain completion")


def test_playground_repository_context(page, server):
    """Files go with fill-in-the-middle requests where the server takes `input_extra` (its OpenAPI schema says),
    and reach the prompt; where it does not, the page says so and sends nothing the server would ignore."""
    page.click("#tab-playground")
    page.click("#repo-context summary")
    supported = bool(httpx.get(f"{server.url}/openapi.json").json()["components"]["schemas"]["CompletionRequest"]
                     ["properties"].get("input_extra"))
    expect(page.locator("#repo-support")).to_contain_text("input_extra")
    page.fill("#fim-prefix", "x = ")
    page.fill("#fim-suffix", "\n")
    page.fill("#fim-max-tokens", "2")

    def run() -> tuple[dict, int]:
        with page.expect_request("**/v1/completions") as request:
            page.click("#fim-run")
        expect(page.locator("#fim-stats")).to_contain_text("prompt tokens")
        stats = page.inner_text("#fim-stats")
        return request.value.post_data_json, int(re.search(r"(\d+) prompt tokens", stats).group(1))

    _, alone = run()
    page.fill("#repo-path", "utils/mathx.py")
    page.fill("#repo-text", "def double(x):\n    return 2 * x\n")
    page.click("#repo-add")
    expect(page.locator("#repo-files li")).to_have_count(1)
    body, with_file = run()
    if supported:
        assert body["input_extra"] == [{"filename": "utils/mathx.py", "text": "def double(x):\n    return 2 * x\n"}]
        assert with_file > alone, "the file did not reach the prompt"
    else:
        assert "input_extra" not in body and with_file == alone
        expect(page.locator("#repo-support")).to_contain_text("does not accept repository context")
        expect(page.locator("#repo-count")).to_contain_text("not sent")
    page.fill("#fim-suffix", "")  # a plain completion takes no repository context
    body, _ = run()
    assert "input_extra" not in body and "suffix" not in body
    page.get_by_role("button", name="Remove utils/mathx.py").click()
    expect(page.locator("#repo-files li")).to_have_count(0)


# --- model and server panel ---------------------------------------------------------------------------------
def test_model_panel_shows_the_model_and_live_metrics(page, server, shots):
    page.click("#tab-model")
    info = page.locator("#model-info")
    expect(info).to_contain_text(MODEL)
    expect(info).to_contain_text(f"{CONTEXT} tokens")
    served_dtype = str(resolve_dtype("auto")[0]).removeprefix("torch.")  # `serve` runs --dtype auto: bf16 or float32
    expect(info).to_contain_text(served_dtype)
    expect(info).to_contain_text("no minicoder.json")
    params = httpx.get(f"{server.url}/", headers={"Accept": "application/json"}).json()["model"]["parameters"]
    expect(info).to_contain_text(f"{params / 1e3:.1f} k")
    generated = metrics(server.url)["minicoder_generation_tokens_total"]
    expect(page.locator("#metrics")).to_contain_text(f"Tokens generated{int(generated)}")
    expect(page.locator("#metrics")).to_contain_text("Running requests0")
    expect(page.locator("#metrics")).to_contain_text("Prefix-cache hit rate")
    screenshot(page, shots, "model")


def test_phone_width_has_no_sideways_scroll(page, server, shots):
    page.set_viewport_size({"width": 390, "height": 844})
    for tab in ("#tab-chat", "#tab-playground", "#tab-model"):
        page.click(tab)
        overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{tab}: the page is {overflow}px wider than a phone screen"
    page.click("#tab-chat")
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(shots / "chat-phone-dark.png"))


# --- minicoder ui --endpoint ------------------------------------------------------------------------------------
def test_ui_command_fronts_a_running_server(browser, server, tmp_path):
    """The same page from `minicoder ui`, forwarding to the server: a streamed reply, and Stop cancels upstream."""
    proc, url = start_minicoder(tmp_path, "ui", "--endpoint", f"{server.url}/v1")
    try:
        page = browser.new_page()
        page.goto(url + "/")
        expect(page.locator("#server-status")).to_contain_text(MODEL)
        expect(page.locator("#api-origin")).to_have_text(url)
        fresh_conversation(page)
        aborted = aborted_requests(server.url)
        set_sampling(page, temperature=0, max_tokens=1800, seed="")
        page.fill("#prompt", "Write a long story.")
        page.press("#prompt", "Enter")
        expect(page.locator("#messages > li.assistant .body")).not_to_have_text(re.compile(r"^…?$"), timeout=30_000)
        wait_for(lambda: metrics(server.url)["minicoder_num_requests_running"] == 1, what="the request to run")
        page.click("#stop")
        wait_for(lambda: metrics(server.url)["minicoder_num_requests_running"] == 0, timeout=10, what="the slot to free")
        assert aborted_requests(server.url) == aborted + 1
        expect(page.locator("#messages > li.assistant .meta")).to_contain_text("stopped")
        page.close()
    finally:
        stop(proc)


# --- keyboard, screen readers, theme --------------------------------------------------------------------------
def test_controls_are_labelled_and_reachable_by_keyboard(page, server):
    unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, textarea, select, button')].filter(el => {
        const name = el.getAttribute('aria-label') || el.getAttribute('aria-labelledby') || el.labels?.length
                     || (el.tagName === 'BUTTON' && el.textContent.trim());
        return !name;
    }).map(el => el.outerHTML.slice(0, 80))""")
    assert unlabelled == [], f"controls without a label a screen reader can announce: {unlabelled}"
    page.focus("#tab-chat")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#tab-playground")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#view-playground")).to_be_visible()
    expect(page.locator("#tab-playground")).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#view-model")).to_be_visible()
    page.keyboard.press("ArrowRight")
    expect(page.locator("#view-chat")).to_be_visible()
    page.focus("#prompt")
    page.keyboard.type("line one")
    page.keyboard.press("Shift+Enter")  # a new line, not a send
    page.keyboard.type("line two")
    expect(page.locator("#prompt")).to_have_value("line one\nline two")
    page.fill("#prompt", "")


def test_theme_button_cycles_system_light_dark(page, server):
    page.emulate_media(color_scheme="light")
    root = page.locator("html")
    button = page.locator("#theme-toggle")
    expect(root).to_have_attribute("data-theme", "light")
    button.click()  # auto -> light
    expect(button).to_have_attribute("aria-label", re.compile("light"))
    button.click()  # light -> dark
    expect(root).to_have_attribute("data-theme", "dark")
    page.reload()  # the choice is kept
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.locator("#theme-toggle").click()  # dark -> auto: the system's light again
    expect(page.locator("html")).to_have_attribute("data-theme", "light")


def test_api_key_is_asked_for_and_sent(browser, server, tmp_path):
    proc, url = start_minicoder(tmp_path, "serve", str(server.model_dir), "--api-key", "sekrit",
                                "--log-level", "warning")
    try:
        page = browser.new_page()
        page.goto(url + "/")
        expect(page.locator("#banner")).to_contain_text("The server needs an API key (401)")
        page.click("#tab-model")
        page.fill("#api-key", "sekrit")
        page.press("#api-key", "Tab")  # the change event stores it and reconnects
        expect(page.locator("#server-status")).to_contain_text(MODEL)
        expect(page.locator("#banner")).to_be_hidden()
        page.click("#tab-chat")
        set_sampling(page, max_tokens=4)
        with page.expect_request("**/v1/chat/completions") as request:
            page.fill("#prompt", "hi")
            page.press("#prompt", "Enter")
        assert request.value.headers["authorization"] == "Bearer sekrit"
        expect(page.locator("#messages > li.assistant .meta")).to_contain_text("4 tokens")
        page.close()
    finally:
        stop(proc)


# --- errors in words ----------------------------------------------------------------------------------------
def test_context_overflow_is_explained(page, server):
    page.click("#tab-chat")
    fresh_conversation(page)
    set_sampling(page, max_tokens="")
    page.fill("#prompt", "x = 1\n" * 1500)
    page.click("#send")
    error = page.locator("#messages > li.error")
    expect(error).to_contain_text("Too long for the model's context")
    expect(error).to_contain_text(f"{CONTEXT} tokens")
    expect(page.locator("#send")).to_be_visible()


def test_bad_field_gets_the_servers_message(page, server):
    fresh_conversation(page)
    set_sampling(page, top_p=0, max_tokens=4)
    page.fill("#prompt", "hi")
    page.press("#prompt", "Enter")
    error = page.locator("#messages > li.error")
    expect(error).to_contain_text("The server refused the request (400, field top_p)")
    expect(error).to_contain_text("greater than 0")
    page.click("#sampling-reset")


def test_busy_server_429_is_explained(page, server):
    """Fill the server's one running slot and one waiting place with real requests: the page's is refused."""
    fresh_conversation(page)
    body = {"prompt": "x", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    stop = threading.Event()

    def hold():
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
            for _ in r.iter_lines():
                if stop.is_set():
                    return

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    try:
        holders[0].start()
        wait_for(lambda: metrics(server.url)["minicoder_num_requests_running"] == 1, what="the first to run")
        holders[1].start()
        wait_for(lambda: metrics(server.url)["minicoder_num_requests_waiting"] == 1, what="the second to wait")
        page.fill("#prompt", "are you busy?")
        page.press("#prompt", "Enter")
        expect(page.locator("#messages > li.error")).to_contain_text("The server is busy (429)")
    finally:
        stop.set()
        for t in holders:
            t.join(30)
    wait_for(lambda: metrics(server.url)["minicoder_num_requests_running"] == 0, what="the holders to end")


def test_stopped_server_is_explained(page, server):
    """Last: stops the server."""
    stop(server.proc)
    banner = page.locator("#banner")
    expect(banner).to_contain_text("Cannot reach the server", timeout=10_000)
    expect(page.locator("#server-status")).to_contain_text("unreachable")
    fresh_conversation(page)
    page.fill("#prompt", "anyone there?")
    page.press("#prompt", "Enter")
    expect(page.locator("#messages > li.error")).to_contain_text("Cannot reach the server")
    expect(page.locator("#send")).to_be_visible()  # no stuck spinner
    page.click("#tab-playground")
    page.click("#fim-run")
    expect(page.locator("#fim-error")).to_contain_text("Cannot reach the server")
