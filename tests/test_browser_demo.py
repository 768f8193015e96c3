"""The browser demo's HTTP side, without a browser: the page's files, the token endpoint,
the setting that keeps both off, and ``relay demo --browser`` / ``relay serve --browser-demo``.

The page itself, in a real browser, is tests/test_browser_page.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import orjson
import trio

from relay import config as cfg
from relay.config import ServeConfig
from relay.control.browser_demo import (
    CONTENT_SECURITY_POLICY,
    DEMO_APP_NAME,
    DEMO_INSTRUCTIONS,
    DEMO_SESSION_MAX_S,
    DEMO_TOKEN_TTL_S,
    DEMO_VOICE,
    PAGE_FILES,
)
from relay.credentials.tokens import TokenClaims, verify
from relay.launch import BrowserDemo, browser_demo_origins, open_browser_demo
from tests.conftest import RunningRelay, open_ws, raw_handshake

#: ``relay demo --browser`` must print its URL within this long (seconds).
CLI_START_TIMEOUT_S = 30


def origin_of(demo: BrowserDemo) -> str:
    return f"http://127.0.0.1:{demo.running.port}"


async def mint(demo: BrowserDemo, origin: str | None) -> httpx.Response:
    headers = {"Origin": origin} if origin is not None else {}
    async with httpx.AsyncClient() as http:
        return await http.post(f"{demo.url}token", headers=headers)


def claims_of(demo: BrowserDemo, token: str) -> TokenClaims:
    claims = verify(token, demo.running.server.keyring.current(), time.time())
    assert isinstance(claims, TokenClaims), claims
    return claims


async def test_off_by_default_every_demo_path_answers_like_an_unknown_path(
    relay: RunningRelay,
) -> None:
    base = f"http://127.0.0.1:{relay.port}"
    async with httpx.AsyncClient() as http:
        unknown = await http.get(f"{base}/no/such/path")
        answers = [
            await http.get(f"{base}/demo/"),
            await http.get(f"{base}/demo"),
            await http.get(f"{base}/demo/main.js"),
            await http.post(f"{base}/demo/token", headers={"Origin": base}),
            await http.delete(f"{base}/demo/"),
        ]
    assert unknown.status_code == 404
    for answer in answers:
        assert (answer.status_code, answer.content) == (404, unknown.content)
    assert unknown.json()["error"]["code"] == "not_found"


async def test_page_files_are_served_same_origin_only_with_a_strict_policy() -> None:
    async with open_browser_demo(0) as demo, httpx.AsyncClient() as http:
        index = await http.get(demo.url)
        assert index.status_code == 200
        assert index.headers["content-type"] == "text/html; charset=utf-8"
        assert index.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert index.headers["x-content-type-options"] == "nosniff"
        assert (await http.get(demo.url.rstrip("/"))).content == index.content
        for name, content_type in PAGE_FILES.items():
            answer = await http.get(f"{demo.url}{name}")
            assert answer.status_code == 200, name
            assert answer.headers["content-type"] == content_type
            # No CDN, no third party: nothing the page loads names another host.
            assert not re.search(rb"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}/", answer.content), name
        missing = await http.get(f"{demo.url}nope.js")
        assert missing.status_code == 404
        assert missing.json()["error"]["code"] == "not_found"
        wrong_method = await http.post(demo.url)
        assert wrong_method.status_code == 405
        assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_token_needs_an_allowed_origin_and_binds_it() -> None:
    async with open_browser_demo(0) as demo:
        missing = await mint(demo, None)
        assert missing.status_code == 403
        assert missing.json()["error"]["code"] == "origin_required"
        foreign = await mint(demo, "https://evil.example")
        assert foreign.status_code == 403
        assert foreign.json()["error"] == {
            "message": "This Origin is not allowed.",
            "type": "invalid_request_error",
            "param": None,
            "code": "origin_not_allowed",
        }
        origin = origin_of(demo)
        answer = await mint(demo, origin)
        assert answer.status_code == 200
        assert answer.headers["cache-control"] == "no-store"
        body = answer.json()
        assert body["session"]["model"] == "gpt-realtime"
        claims = claims_of(demo, body["value"])
        assert claims.app == DEMO_APP_NAME
        assert claims.single_use
        assert claims.origins == (origin,)
        assert claims.expires_at - claims.issued_at == DEMO_TOKEN_TTL_S
        assert claims.max_session_s == DEMO_SESSION_MAX_S
        locked = orjson.loads(claims.session)
        assert locked["instructions"] == DEMO_INSTRUCTIONS
        assert locked["audio"]["output"]["voice"] == DEMO_VOICE
        # localhost is the page's origin too; each token is bound to its own.
        other = await mint(demo, f"http://localhost:{demo.running.port}")
        assert claims_of(demo, other.json()["value"]).origins == (
            f"http://localhost:{demo.running.port}",
        )
        # Nothing of the relay's keys reaches the page.
        upstream_key = demo.running.server.config.upstream_api_key.reveal()
        assert upstream_key
        assert upstream_key.encode() not in answer.content


async def test_a_demo_token_opens_one_session_from_its_own_origin() -> None:
    async with open_browser_demo(0) as demo:
        origin = origin_of(demo)
        token = (await mint(demo, origin)).json()["value"]
        protocols = ["realtime", f"openai-insecure-api-key.{token}"]
        target = "/v1/realtime?model=gpt-realtime"
        # Another site's page: refused before the credential is even looked at.
        refused = await raw_handshake(
            demo.running.port, target, [("Origin", "https://evil.example")], protocols
        )
        assert refused.status == 403
        assert refused.json()["error"]["code"] == "origin_not_allowed"
        # The other origin of the page is allowed by the relay, but not by this token.
        refused = await raw_handshake(
            demo.running.port,
            target,
            [("Origin", f"http://localhost:{demo.running.port}")],
            protocols,
        )
        assert refused.status == 403
        assert refused.json()["error"]["code"] == "origin_not_allowed"
        url = f"ws://127.0.0.1:{demo.running.port}{target}"
        async with open_ws(url, extra_headers=[("Origin", origin)], subprotocols=protocols) as ws:
            created = orjson.loads(await ws.get_message())
            assert created["type"] == "session.created"
            assert created["session"]["instructions"] == DEMO_INSTRUCTIONS
        spent = await raw_handshake(demo.running.port, target, [("Origin", origin)], protocols)
        assert spent.status == 401
        assert spent.json()["error"]["code"] == "token_used"


def test_the_page_needs_an_origin_allowlist() -> None:
    problems = cfg.serve_config_problems(
        ServeConfig(upstream_url=cfg.SIMULATOR_UPSTREAM, browser_demo_enabled=True)
    )
    assert problems == [
        "serve.browser_demo_enabled: set allowed_origins to the page's origin too (e.g. "
        '"http://127.0.0.1:8080"): the demo mints tokens for listed Origins only'
    ]
    assert not cfg.serve_config_problems(
        ServeConfig(
            upstream_url=cfg.SIMULATOR_UPSTREAM,
            browser_demo_enabled=True,
            allowed_origins=browser_demo_origins(8080),
        )
    )


def _cli_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}


def test_serve_browser_demo_without_allowed_origin_refuses_to_start() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve", "--simulator", "--browser-demo"],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("relay: configuration error: serve.browser_demo_enabled:")


def test_demo_browser_runs_its_own_relay_only() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "demo", "--browser", "--url", "ws://127.0.0.1:1/v1"],
        env=_cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "relay: configuration error: demo.browser: --browser runs its own relay and "
        "simulator; drop --url/--direct"
    )


async def test_relay_demo_browser_prints_the_url_and_serves_the_page() -> None:
    # The README's command, on a free port: it prints the URL, serves the page and the
    # token endpoint for that URL's origin, and stops on Ctrl-C.
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "relay", "demo", "--browser", "--port", "0"],
        env=_cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        output = b""
        with trio.fail_after(CLI_START_TIMEOUT_S):
            while (match := re.search(rb"open (http://\S+/demo/)", output)) is None:
                chunk = await process.stdout.receive_some(4096)
                assert chunk, f"relay demo --browser ended early: {output!r}"
                output += chunk
        url = match.group(1).decode()
        origin = url.removesuffix("/demo/")
        async with httpx.AsyncClient() as http:
            page = await http.get(url)
            token = await http.post(f"{url}token", headers={"Origin": origin})
        assert page.status_code == 200
        assert b'<script type="module" src="/demo/main.js">' in page.content
        assert token.status_code == 200
        assert token.json()["value"].startswith("ek_r1.")
        process.send_signal(signal.SIGINT)
        with trio.fail_after(CLI_START_TIMEOUT_S):
            code = await process.wait()
        assert code == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                await stream.aclose()
