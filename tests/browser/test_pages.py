"""The viewer room and the host console in a real browser (Debian's Chromium via Playwright)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from starlette.requests import Request

from server.api.responses import on_unexpected
from tests.inventory.support import end_sale, launch, new_shop, settle_tracked
from tests.rooms.support import open_viewer
from tests.support import REPO, Actor, ServerProcess, api_client, create_product, create_room, register

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts" / "screenshots"
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
TIMEOUT_MS = 15_000

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: CI must `apt-get install -y chromium`")
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

from playwright.async_api import Browser, Page, Route, async_playwright, expect  # noqa: E402

expect.set_options(timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        yield b
        await b.close()


async def new_page(browser: Browser, width: int = 1440, height: int = 900) -> Page:
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.errors = errors  # type: ignore[attr-defined]
    return page


async def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    await page.evaluate("window.scrollTo(0, 0)")
    await page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


async def join_as_guest(page: Page, name: str) -> None:
    await page.click("#signin-open")
    await page.fill("#guest-name", name)
    await page.click("#guest-form button[type=submit]")
    await expect(page.locator("#whoami")).to_have_text(f"Hi, {name}")


async def send_chat(page: Page, text: str) -> None:
    """Type a message and send it with Enter, as a viewer does."""
    await page.fill("#chat-input", text)
    await page.press("#chat-input", "Enter")


async def test_a_whole_flash_sale_in_the_browser(browser: Browser, server: ServerProcess) -> None:
    base = server.url
    password = "correct horse battery"
    async with api_client(base) as client:
        host = await register(client, "host", password=password)

    # The host logs in on the console, creates a room and a product, goes live.
    console = await new_page(browser)
    await console.goto(f"{base}/console")
    await console.fill("#login-user", host.username)
    await console.fill("#login-pass", password)
    await console.click("#login-form button[type=submit]")
    await console.fill("#room-title", "Spring tea live")
    await console.click("#room-form button[type=submit]")
    await expect(console.locator("#rv-title")).to_have_text("Spring tea live")
    await console.click("#prod-title")  # focus out of the form
    await console.locator("details:has(#product-form) summary").click()
    await console.fill("#pf-name", "Jasmine tea")
    await console.fill("#pf-price", "2500")
    await console.fill("#pf-rate", "2000")
    await console.fill("#pf-image", "/static/demo/tea.svg")
    await console.click("#product-form button[type=submit]")
    await expect(console.locator("#products tr")).to_have_count(1)
    await console.click("#go-live")
    await expect(console.locator("#rv-status")).to_have_text("live")
    room_id = console.url.split("#")[1]

    # Two viewers, in two browser contexts, join before anything is pinned.
    ann = await new_page(browser)
    bob = await new_page(browser, 390, 844)
    for page, name in ((ann, "Ann"), (bob, "Bob")):
        await page.goto(f"{base}/rooms/{room_id}")
        await expect(page.locator("#status-badge")).to_have_text("Live")
        await join_as_guest(page, name)
    await expect(ann.locator("#card")).to_be_hidden()

    # Pin, then launch a sale: both appear for both viewers.
    await console.click("#products button:has-text('Pin')")
    for page in (ann, bob):
        await expect(page.locator("#p-name")).to_have_text("Jasmine tea")
    await console.fill("#sf-price", "1900")
    await console.fill("#sf-stock", "10")
    await console.fill("#sf-limit", "2")
    await console.fill("#sf-start", "0")
    await console.fill("#sf-duration", "300")
    await console.fill("#sf-timeout", "300")
    await console.click("#sale-form button[type=submit]")
    for page in (ann, bob):
        await expect(page.locator("#sale-state")).to_have_text(re.compile("Flash sale"))
        await expect(page.locator("#left")).to_have_text("10 left of 10")
        await expect(page.locator("#p-price")).to_have_text("$19.00")

    # Danmaku both ways, and likes.
    await send_chat(ann, "hello from Ann")
    await expect(bob.locator("#chat-list li", has_text="hello from Ann")).to_have_count(1)
    await expect(bob.locator("#danmaku .bullet", has_text="hello from Ann")).to_have_count(1)
    await bob.fill("#chat-input", "hi Ann!")
    await bob.click("#chat-form button[type=submit]")
    await expect(ann.locator("#chat-list li", has_text="hi Ann!")).to_have_count(1)
    for _ in range(3):
        await ann.click("#like")
    await expect(bob.locator("#like-count")).to_have_text("3")

    # XSS sent as chat shows up as text and never runs.
    payloads = ["<img src=x onerror=\"window.__xss=1\">", "<script>window.__xss=1</script>"]
    for payload in payloads:
        await send_chat(ann, payload)
        await expect(bob.locator("#chat-list li", has_text=payload)).to_have_count(1)
    for page in (ann, bob):
        assert await page.evaluate("window.__xss") is None
        assert await page.locator("#chat-list img").count() == 0

    # Ann buys and pays; a double click still buys once; both see the stock fall.
    await ann.dblclick("#buy")
    await expect(ann.locator("#res-text")).to_contain_text("Reserved for you: 1 ×")
    for page in (ann, bob):
        await expect(page.locator("#left")).to_have_text("9 left of 10")
    await ann.click("#pay")
    await expect(ann.locator("#res-text")).to_contain_text("Paid")

    # The console's dashboard shows the order and the commission: 19.00 * 20% = 3.80.
    kpis = console.locator("#kpis")
    await expect(kpis.locator(".kpi", has_text="paid orders")).to_contain_text("1")
    await expect(kpis.locator(".kpi", has_text="GMV")).to_contain_text("$19.00")
    await expect(kpis.locator(".kpi", has_text="your commission")).to_contain_text("$3.80")
    await expect(console.locator("#modlog li", has_text="hello from Ann")).to_have_count(1)
    await expect(console.locator("#sl-figures")).to_contain_text("1 sold of 10")
    await expect(console.locator("#earn-totals")).to_contain_text("$3.80", timeout=20_000)

    async with api_client(base) as client:
        orders = (await client.get("/api/sales/" + (await client.get(f"/api/rooms/{room_id}/sales")).json()[0]["id"]))
        assert orders.json()["paid"] == 1 and orders.json()["remaining"] == 9

    await shoot(ann, "room-desktop")
    await shoot(bob, "room-mobile")
    await shoot(console, "console-desktop")
    mobile_console = await new_page(browser, 390, 844)
    await mobile_console.context.add_cookies(await console.context.cookies())
    await mobile_console.goto(f"{base}/console#{room_id}")
    await expect(mobile_console.locator("#rv-title")).to_have_text("Spring tea live")
    await shoot(mobile_console, "console-mobile")
    for page in (console, ann, bob, mobile_console):
        assert page.errors == [], page.errors  # type: ignore[attr-defined]
        await page.context.close()


PurchaseRoute = Callable[[Route], Awaitable[None]]


async def buying_page(browser: Browser, server: ServerProcess, guest: str, per_user_limit: int,
                      on_purchase: PurchaseRoute) -> tuple[Page, dict[str, Any]]:
    """A live sale of 5 units and a guest's room page on it, whose purchase requests go through
    `on_purchase` on their way to the server."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        sale = await launch(c, shop, stock=5, per_user_limit=per_user_limit)
    page = await new_page(browser)
    await page.route("**/api/sales/*/purchase", on_purchase)
    await page.goto(f"{server.url}/rooms/{shop.room_id}")
    await join_as_guest(page, guest)
    await expect(page.locator("#left")).to_have_text("5 left of 5")
    return page, sale


async def answer_503(route: Route, retry_after: str, code: str, message: str) -> None:
    await route.fulfill(status=503, headers={"Retry-After": retry_after, "Content-Type": "application/json"},
                        body=json.dumps({"error": code, "message": message}))


async def pay_and_close(page: Page, server: ServerProcess) -> None:
    """Pay the page's reservation (leave nothing reserved behind), check the page raised no error."""
    await page.click("#pay")
    await expect(page.locator("#res-text")).to_contain_text("Paid")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()
    await settle_tracked(server.url)


async def test_the_buy_button_retries_a_lost_answer_with_the_same_key_and_buys_once(
        browser: Browser, server: ServerProcess) -> None:
    """The server reserves, but its answer is lost: here replaced by a 503 `unavailable`, as when Redis
    times out after the script ran. The page retries with the same Idempotency-Key, gets the same order
    back (200), and one unit is taken."""
    keys: list[str] = []
    statuses: list[int] = []

    async def lose_the_first_answer(route: Route) -> None:
        keys.append(route.request.headers["idempotency-key"])
        response = await route.fetch()  # the real server answers
        statuses.append(response.status)
        if len(keys) == 1:
            await answer_503(route, "1", "unavailable", "lost on the way")
        else:
            await route.fulfill(response=response)

    page, sale = await buying_page(browser, server, "Cleo", 2, lose_the_first_answer)
    await page.click("#buy")
    await expect(page.locator("#res-text")).to_contain_text("Reserved for you: 1 ×")
    assert statuses == [201, 200] and keys[0] == keys[1], (statuses, keys)
    async with api_client(server.url) as c:
        state = (await c.get(f"/api/sales/{sale['id']}")).json()
    assert (state["remaining"], state["reserved"]) == (4, 1), state
    await pay_and_close(page, server)


async def test_after_503s_to_the_end_the_next_click_sends_the_same_attempt_again(
        browser: Browser, server: ServerProcess) -> None:
    """Every try of a click answered 503 (the server shedding load): the page gives up, keeps the
    attempt (it may have gone through), and holds its quantity; the next click sends the same key and
    quantity, and buys."""
    sent: list[tuple[str, str | None]] = []
    shed = True

    async def busy_while_shedding(route: Route) -> None:
        sent.append((route.request.headers["idempotency-key"], route.request.post_data))
        if shed:
            await answer_503(route, "0.01", "busy", "too busy right now; retry in a moment")
        else:
            await route.continue_()

    page, _ = await buying_page(browser, server, "Dee", 3, busy_while_shedding)
    await page.select_option("#qty", "2")
    await page.click("#buy")
    await expect(page.locator("#buy-error")).to_have_text("So many buyers right now! Try again.")
    assert len(sent) == 6  # the click and its five retries
    await expect(page.locator("#qty")).to_be_disabled()

    shed = False
    await page.click("#buy")
    await expect(page.locator("#res-text")).to_contain_text("Reserved for you: 2 ×")
    assert len({key for key, _ in sent}) == 1 and len({body for _, body in sent}) == 1, sent
    await expect(page.locator("#qty")).to_be_hidden()  # reserved: nothing more to choose
    await pay_and_close(page, server)


async def test_a_viewer_logged_out_elsewhere_goes_on_watching_anonymously(
        browser: Browser, server: ServerProcess) -> None:
    """The session is logged out from another device: the page asks to sign in to chat or buy, and
    goes on watching as an anonymous viewer, with one reconnect, never a loop (the dead cookie made
    every reconnect a 4401, so a viewer with an expired cookie could not even watch)."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
    page = await new_page(browser)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(f"{server.url}/rooms/{shop.room_id}")
    await join_as_guest(page, "Ines")
    await expect(page.locator("#conn-state")).to_have_text("")
    token = next(c["value"] for c in await page.context.cookies() if c["name"] == "livesale_session")
    async with api_client(server.url) as c:  # the same session logs out from another device
        r = await c.post("/api/auth/logout", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    await expect(page.locator("#chat-error")).to_have_text("Your session ended. Sign in to chat or buy.")
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#whoami")).to_have_text("")
    await expect(page.locator("#conn-state")).to_have_text("")  # watching again, anonymously
    assert not [c for c in await page.context.cookies() if c["name"] == "livesale_session"]  # dropped
    opened = len(sockets)
    await page.wait_for_timeout(1500)  # a loop would have reconnected within 0.75 s, again and again
    assert len(sockets) == opened, sockets
    async with api_client(server.url) as c:  # and the room's events still arrive
        r = await c.post(f"/api/rooms/{shop.room_id}/pin", json={"product_id": shop.product_id}, headers=shop.host.auth)
        assert r.status_code == 200, r.text
    await expect(page.locator("#p-name")).to_have_text("Flash tea")
    await page.fill("#guest-name", "Ines again")
    await page.click("#guest-form button[type=submit]")
    await expect(page.locator("#whoami")).to_have_text("Hi, Ines again")
    await expect(page.locator("#chat-error")).to_have_text("")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def console_on(browser: Browser, server: ServerProcess, host: Actor, room_id: str) -> Page:
    page = await new_page(browser)
    await page.goto(f"{server.url}/console#{room_id}")
    await page.fill("#login-user", host.username)
    await page.fill("#login-pass", "correct horse battery")
    await page.click("#login-form button[type=submit]")
    await expect(page.locator("#rv-status")).to_be_visible()
    return page


async def test_the_console_keeps_the_product_chosen_for_a_sale_when_its_list_is_redrawn(
        browser: Browser, server: ServerProcess) -> None:
    """Pick a product for the sale, set its price, pin something: the form still holds that product
    (it went back to the first one, keeping the price: a launch of the wrong product at that price)."""
    async with api_client(server.url) as c:
        host = await register(c, "host", password="correct horse battery")
        room = await create_room(c, host)
        cheap = await create_product(c, host, name="Cheap", price_cents=800)
        await create_product(c, host, name="Pricey", price_cents=50_000)  # newest: listed first
    console = await console_on(browser, server, host, room["id"])
    await expect(console.locator("#sf-product option")).to_have_count(2)
    await console.select_option("#sf-product", cheap["id"])
    await console.fill("#sf-price", "700")
    await console.click("#products tr:has-text('Pricey') button:has-text('Pin')")
    await expect(console.locator("#products tr:has-text('Pricey') button:has-text('Unpin')")).to_be_visible()
    assert await console.input_value("#sf-product") == cheap["id"]
    assert await console.input_value("#sf-price") == "700"
    assert console.errors == [], console.errors  # type: ignore[attr-defined]
    await console.context.close()


async def test_an_expired_reservation_lets_the_viewer_buy_again(browser: Browser, server: ServerProcess) -> None:
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        await launch(c, shop, stock=5, per_user_limit=2, payment_timeout_s=2)
    page = await new_page(browser)
    await page.goto(f"{server.url}/rooms/{shop.room_id}")
    await join_as_guest(page, "Lou")
    await page.click("#buy")
    await expect(page.locator("#res-text")).to_contain_text("Reserved for you")
    await expect(page.locator("#buy")).to_be_disabled()
    await expect(page.locator("#res-text")).to_have_text("Your reservation expired.")
    await expect(page.locator("#buy")).to_be_enabled()  # it stayed disabled until a reload
    await expect(page.locator("#qty")).to_be_visible()
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()
    await settle_tracked(server.url)


async def test_an_ended_sale_gives_way_to_the_next_pinned_product(browser: Browser, server: ServerProcess) -> None:
    """The host ends a sale and pins another product: viewers see that product (they kept seeing the
    ended sale, even after a reload, until it was archived)."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        sale = await launch(c, shop, stock=5, per_user_limit=2)
        page = await new_page(browser)
        await page.goto(f"{server.url}/rooms/{shop.room_id}")
        await expect(page.locator("#p-name")).to_have_text("Flash tea")
        await end_sale(c, shop, sale["id"])
        await expect(page.locator("#sale-state")).to_have_text("Sale ended")
        other = (await create_product(c, shop.host, name="Oolong"))["id"]
        r = await c.post(f"/api/rooms/{shop.room_id}/pin", json={"product_id": other}, headers=shop.host.auth)
        assert r.status_code == 200, r.text
        await expect(page.locator("#p-name")).to_have_text("Oolong")
        await expect(page.locator("#sale")).to_be_hidden()
        await page.reload()
        await expect(page.locator("#p-name")).to_have_text("Oolong")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_an_end_is_final_whatever_its_version(browser: Browser, server: ServerProcess) -> None:
    """sale.js in the page: a `sale_ended` that arrives after another process's update with a
    higher `v` still ends the sale (it was dropped as stale, leaving Buy enabled)."""
    page = await new_page(browser)
    await page.goto(f"{server.url}/")
    status = await page.evaluate("""async () => {
        const { applySaleEvent, saleStatus } = await import("/static/js/sale.js");
        let sale = { id: "s", v: 5, status: "active", remaining: 3, starts_at_ms: 0, ends_at_ms: Date.now() + 60000 };
        sale = applySaleEvent(sale, { type: "sale_update", id: "s", v: 9, remaining: 2, sold: 1 }, Date.now());
        sale = applySaleEvent(sale, { type: "sale_ended", id: "s", v: 7, reason: "host" }, Date.now());
        return [saleStatus(sale, Date.now()), sale.remaining];
    }""")
    assert status == ["ended", 2], status
    await page.context.close()


async def test_reconnects_back_off_while_the_server_says_unavailable(browser: Browser, server: ServerProcess) -> None:
    """A server without Redis or its database accepts the socket, says `unavailable` and closes with
    1013: the page waits longer each time (it started over at every open: ~2 tries a second)."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
    page = await new_page(browser)
    opened: list[float] = []

    async def unavailable(ws: Any) -> None:  # stands in for the server's answer during an outage
        opened.append(await page.evaluate("performance.now()"))
        ws.send(json.dumps([{"type": "error", "code": "unavailable", "message": "try again shortly"}]))
        await ws.close(code=1013, reason="try again later")

    await page.route_web_socket(re.compile(r".*/ws/rooms/.*"), unavailable)
    await page.goto(f"{server.url}/rooms/{shop.room_id}")
    await page.wait_for_timeout(5000)
    # Backoff 0.5, 1, 2, 4 s, each x 0.5-1.5: five tries at most in 5 s (fewer on a slow machine).
    assert 2 <= len(opened) <= 5, opened
    await page.context.close()


async def test_a_reconnect_keeps_the_viewers_paid_order_on_screen(browser: Browser, server: ServerProcess) -> None:
    """The socket drops after the viewer paid: after the new welcome the page still says paid
    (it dropped the order, and brought back only reserved ones)."""
    drop: list[Any] = []

    async def relay(ws: Any) -> None:  # the real server behind, so that the test can cut the link
        ws.connect_to_server()
        drop.append(ws)

    async with api_client(server.url) as c:
        shop = await new_shop(c)
        await launch(c, shop, stock=5, per_user_limit=2)
    page = await new_page(browser)
    await page.route_web_socket(re.compile(r".*/ws/rooms/.*"), relay)
    await page.goto(f"{server.url}/rooms/{shop.room_id}")
    await join_as_guest(page, "Max")
    await page.click("#buy")
    await page.click("#pay")
    await expect(page.locator("#res-text")).to_contain_text("Paid")
    links = len(drop)
    await drop[-1].close(code=1012, reason="restarting")
    for _ in range(100):  # reconnected (the first backoff is 0.25 to 0.75 s)
        if len(drop) > links:
            break
        await page.wait_for_timeout(100)
    assert len(drop) > links, "the page did not reconnect"
    await expect(page.locator("#conn-state")).to_have_text("")
    await page.wait_for_timeout(500)  # the welcome and the order's re-read
    await expect(page.locator("#reservation")).to_be_visible()
    await expect(page.locator("#res-text")).to_contain_text("Paid")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_the_console_follows_only_the_last_room_chosen(browser: Browser, server: ServerProcess) -> None:
    """Two rooms clicked in a row: one socket stays open, the second room's (the first room's socket
    was left open too, feeding its chat and sales into the other room's view)."""
    async with api_client(server.url) as c:
        host = await register(c, "host", password="correct horse battery")
        first = await create_room(c, host, title="First")
        second = await create_room(c, host, title="Second")
    console = await console_on(browser, server, host, first["id"])
    sockets: list[Any] = []
    console.on("websocket", lambda ws: sockets.append(ws))
    # Both clicks in one go, as a quick host does: the first room's answers come after the second click.
    await console.evaluate("""() => {
        const [a, b] = [...document.querySelectorAll("#room-list button")]
            .sort((x, y) => (x.textContent.startsWith("First") ? -1 : 1));
        a.click();
        b.click();
    }""")
    await expect(console.locator("#rv-title")).to_have_text("Second")
    await console.wait_for_timeout(1000)
    still_open = [ws.url for ws in sockets if not ws.is_closed()]
    assert len(still_open) == 1 and still_open[0].endswith(second["id"]), still_open
    await console.context.close()


async def lineup_console(browser: Browser, server: ServerProcess) -> tuple[Page, str, set[str]]:
    """A console on a new room of a new host with products Tea 0, Tea 1, Tea 2, none in its lineup."""
    async with api_client(server.url) as c:
        host = await register(c, "host", password="correct horse battery")
        room = await create_room(c, host)
        products = [await create_product(c, host, name=f"Tea {i}") for i in range(3)]
    console = await console_on(browser, server, host, room["id"])
    await expect(console.locator("#products tr")).to_have_count(3)
    return console, room["id"], {p["id"] for p in products}


async def saved_lineup(server: ServerProcess, room_id: str, want: set[str], done: Callable[[], bool] = lambda: True
                       ) -> set[str]:
    """The room's lineup on the server, polled until it is `want` and `done()` (at most ~15 s: the
    machine may be busy)."""
    async with api_client(server.url) as c:
        for _ in range(150):
            saved = {p["id"] for p in (await c.get(f"/api/rooms/{room_id}/lineup")).json()}
            if saved == want and done():
                break
            await asyncio.sleep(0.1)
    return saved


async def test_two_quick_lineup_ticks_are_both_saved(browser: Browser, server: ServerProcess) -> None:
    console, room_id, products = await lineup_console(browser, server)
    # Both ticks in one go, as a quick host does: the second comes before the first one's save answers.
    await console.evaluate("""() => {
        const box = (name) => [...document.querySelectorAll("#products tr")]
            .find((row) => row.textContent.includes(name)).querySelector("input[type=checkbox]");
        box("Tea 0").click();
        box("Tea 2").click();
    }""")
    ids = {name: await console.locator(f"#products tr:has-text('{name}')").get_attribute("data-id")
           for name in ("Tea 0", "Tea 2")}
    want = set(ids.values())
    assert await saved_lineup(server, room_id, want) == want
    await console.wait_for_timeout(300)
    await expect(console.locator("#products tr:has-text('Tea 0') input[type=checkbox]")).to_be_checked()
    await expect(console.locator("#products tr:has-text('Tea 2') input[type=checkbox]")).to_be_checked()
    await console.context.close()


async def test_a_viewer_can_cancel_a_reservation_and_buy_again(browser: Browser, server: ServerProcess) -> None:
    page, sale = await buying_page(browser, server, "Nia", 2, lambda route: route.continue_())
    await page.click("#buy")
    await expect(page.locator("#res-text")).to_contain_text("Reserved for you")
    await page.click("#cancel")
    await expect(page.locator("#res-text")).to_have_text("Your reservation was cancelled.")
    await expect(page.locator("#buy")).to_be_enabled()
    async with api_client(server.url) as c:
        state = (await c.get(f"/api/sales/{sale['id']}")).json()
    assert (state["remaining"], state["reserved"]) == (5, 0), state
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_buy_waits_out_a_429(browser: Browser, server: ServerProcess) -> None:
    """Too many clicks: Buy stays off for the Retry-After the server gave (it came back at once)."""
    async def too_fast(route: Route) -> None:
        await route.fulfill(status=429, headers={"Retry-After": "2", "Content-Type": "application/json"},
                            body=json.dumps({"error": "rate_limited", "message": "slow down"}))

    page, _ = await buying_page(browser, server, "Oz", 2, too_fast)
    await page.click("#buy")
    await expect(page.locator("#buy-error")).to_have_text("Too fast: try again in a moment.")
    await expect(page.locator("#buy")).to_be_disabled()
    await expect(page.locator("#buy")).to_be_enabled()
    await page.context.close()
    await settle_tracked(server.url)


async def test_a_refused_chat_message_goes_back_into_the_box(browser: Browser, server: ServerProcess) -> None:
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        r = await c.put(f"/api/rooms/{shop.room_id}/banned-words", json={"words": ["spoiler"]},
                        headers=shop.host.auth)
        assert r.status_code == 200, r.text
    page = await new_page(browser)
    await page.goto(f"{server.url}/rooms/{shop.room_id}")
    await join_as_guest(page, "Pia")
    await send_chat(page, "big spoiler ahead")
    await expect(page.locator("#chat-error")).to_have_text("Your message contains a word this room doesn't allow.")
    await expect(page.locator("#chat-input")).to_have_value("big spoiler ahead")
    await send_chat(page, "hello")
    await expect(page.locator("#chat-list li", has_text="hello")).to_have_count(1)
    await expect(page.locator("#chat-input")).to_have_value("")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_a_deleted_message_stops_flying(browser: Browser, server: ServerProcess) -> None:
    """The host deletes a message: it leaves the chat list and the video at once (it flew on for
    its whole crossing, about 12 s)."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        page = await new_page(browser)
        await page.goto(f"{server.url}/rooms/{shop.room_id}")
        await join_as_guest(page, "Quinn")
        await send_chat(page, "this one goes")
        bullet = page.locator("#danmaku .bullet", has_text="this one goes")
        await expect(bullet).to_have_count(1)
        message_id = await page.locator("#chat-list li", has_text="this one goes").get_attribute("data-id")
        r = await c.delete(f"/api/rooms/{shop.room_id}/chat/{message_id}", headers=shop.host.auth)
        assert r.status_code == 200, r.text
        await expect(page.locator("#chat-list li", has_text="this one goes")).to_have_count(0)
        await expect(bullet).to_have_count(0, timeout=3000)
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_only_the_hosts_messages_carry_the_host_badge(browser: Browser, server: ServerProcess) -> None:
    """A guest may take the host's display name; the Host badge goes by the author's id, so the
    namesake's message shows none (nothing told them apart before)."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        page = await new_page(browser)
        await page.goto(f"{server.url}/rooms/{shop.room_id}")
        await join_as_guest(page, shop.host.name)
        async with open_viewer(server.url, shop.room_id, shop.host.token) as host:
            await host.chat("flash sale in five minutes")
            await send_chat(page, "pay me directly instead")
            from_host = page.locator("#chat-list li", has_text="flash sale in five minutes")
            await expect(from_host.locator(".badge-host")).to_have_text("Host")
            from_namesake = page.locator("#chat-list li", has_text="pay me directly instead")
            await expect(from_namesake.locator(".who")).to_have_text(shop.host.name)
            await expect(from_namesake.locator(".badge-host")).to_have_count(0)
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_a_401_on_buy_asks_to_sign_in_again(browser: Browser, server: ServerProcess) -> None:
    async def session_gone(route: Route) -> None:
        await route.fulfill(status=401, headers={"Content-Type": "application/json"},
                            body=json.dumps({"error": "session_revoked", "message": "log in again"}))

    page, _ = await buying_page(browser, server, "Rae", 2, session_gone)
    await page.click("#buy")
    await expect(page.locator("#signin")).to_be_visible()
    await expect(page.locator("#whoami")).to_have_text("")
    await page.context.close()
    await settle_tracked(server.url)


async def test_the_console_names_the_field_the_server_refused(browser: Browser, server: ServerProcess) -> None:
    """A launch the server refuses for one field: that field is marked and named (the message was
    shown raw, ending in "- at `$.stock`", with nothing marked)."""
    async with api_client(server.url) as c:
        host = await register(c, "host", password="correct horse battery")
        room = await create_room(c, host)
        await create_product(c, host, name="Tea")
    console = await console_on(browser, server, host, room["id"])
    await expect(console.locator("#sf-product option")).to_have_count(1)
    await console.fill("#sf-price", "500")
    # Past the form's own limit, as an older page or a script would send it.
    await console.evaluate("""() => { const s = document.querySelector("#sf-stock"); s.removeAttribute("max"); s.value = "2000000"; }""")
    await console.click("#sale-form button[type=submit]")
    await expect(console.locator("#sale-error")).to_have_text(re.compile(r"^Stock: Expected `int` <= 1000000$"))
    await expect(console.locator("#sf-stock")).to_have_attribute("aria-invalid", "true")
    await console.fill("#sf-stock", "10")
    await expect(console.locator("#sf-stock")).not_to_have_attribute("aria-invalid", "true")
    await console.context.close()


async def test_the_console_follows_its_room_started_and_ended_elsewhere(browser: Browser,
                                                                         server: ServerProcess) -> None:
    """The room goes live and ends from another device (or the API): the console's view and its room
    list say so (the list kept "scheduled", and an end left the view live)."""
    async with api_client(server.url) as c:
        host = await register(c, "host", password="correct horse battery")
        room = await create_room(c, host, title="Elsewhere")
        console = await console_on(browser, server, host, room["id"])
        badge = console.locator("#room-list button:has-text('Elsewhere') .badge")
        await expect(badge).to_have_text("scheduled")
        await console.wait_for_timeout(500)  # the room's socket is open
        r = await c.post(f"/api/rooms/{room['id']}/start", headers=host.auth)
        assert r.status_code == 200, r.text
        await expect(console.locator("#rv-status")).to_have_text("live")
        await expect(badge).to_have_text("live")
        r = await c.post(f"/api/rooms/{room['id']}/end", headers=host.auth)
        assert r.status_code == 200, r.text
        await expect(console.locator("#rv-status")).to_have_text("ended")
        await expect(badge).to_have_text("ended")
    assert console.errors == [], console.errors  # type: ignore[attr-defined]
    await console.context.close()


async def test_a_lineup_echo_does_not_undo_a_tick_made_since(browser: Browser, server: ServerProcess) -> None:
    """Ticks while a save is on its way: the room's echo of an earlier save does not untick the
    later ones (it replaced the console's lineup, and the next save sent without them)."""
    console, room_id, products = await lineup_console(browser, server)
    puts = 0

    async def second_save_slow(route: Route) -> None:
        nonlocal puts
        if route.request.method == "PUT":
            puts += 1
            if puts == 2:
                await console.wait_for_timeout(1500)
        await route.continue_()

    await console.route("**/api/rooms/*/lineup", second_save_slow)
    tick = """(name) => [...document.querySelectorAll("#products tr")]
        .find((row) => row.textContent.includes(name)).querySelector("input[type=checkbox]").click()"""
    await console.evaluate(tick, "Tea 0")
    await console.evaluate(tick, "Tea 1")
    await console.wait_for_timeout(700)  # the first save answered and its echo came; the second waits
    await console.evaluate(tick, "Tea 2")
    assert await saved_lineup(server, room_id, products, lambda: puts == 3) == products
    await console.context.close()


async def test_paying_after_the_sale_gave_way_to_a_pin_shows_the_result(browser: Browser,
                                                                       server: ServerProcess) -> None:
    """Reserved, then the host ends the sale and pins another product: paying still shows "Paid"
    (the order's box was inside the sale's section, hidden with it)."""
    async with api_client(server.url) as c:
        shop = await new_shop(c)
        sale = await launch(c, shop, stock=5, per_user_limit=2)
        page = await new_page(browser)
        await page.goto(f"{server.url}/rooms/{shop.room_id}")
        await join_as_guest(page, "Sol")
        await page.click("#buy")
        await expect(page.locator("#res-text")).to_contain_text("Reserved for you")
        await end_sale(c, shop, sale["id"])
        other = (await create_product(c, shop.host, name="Oolong"))["id"]
        r = await c.post(f"/api/rooms/{shop.room_id}/pin", json={"product_id": other}, headers=shop.host.auth)
        assert r.status_code == 200, r.text
        await expect(page.locator("#pay")).to_be_visible()  # a reservation to pay keeps the sale in view
        await page.click("#pay")
        await expect(page.locator("#p-name")).to_have_text("Oolong")  # then the pin takes the card
        await expect(page.locator("#reservation")).to_be_visible()
        await expect(page.locator("#res-text")).to_contain_text("Paid")
    assert page.errors == [], page.errors  # type: ignore[attr-defined]
    await page.context.close()


async def test_a_late_snapshot_never_revives_an_ended_sale(browser: Browser, server: ServerProcess) -> None:
    """sale.js in the page: after `sale_ended`, an older `sale` snapshot from another process (its
    launch event, late) leaves the sale ended (it brought it back, active)."""
    page = await new_page(browser)
    await page.goto(f"{server.url}/")
    status = await page.evaluate("""async () => {
        const { applySaleEvent, saleStatus } = await import("/static/js/sale.js");
        const later = Date.now() + 60000;
        let sale = { id: "s", v: 5, status: "active", remaining: 3, starts_at_ms: 0, ends_at_ms: later };
        sale = applySaleEvent(sale, { type: "sale_ended", id: "s", v: 8, reason: "host" }, Date.now());
        const late = { id: "s", v: 6, status: "active", remaining: 3, starts_at_ms: 0, ends_at_ms: later };
        sale = applySaleEvent(sale, { type: "sale", sale: late }, Date.now());
        return [saleStatus(sale, Date.now()), sale.v];
    }""")
    assert status == ["ended", 8], status
    await page.context.close()


async def test_moderation_from_the_console(browser: Browser, server: ServerProcess) -> None:
    base = server.url
    password = "correct horse battery"
    async with api_client(base) as client:
        host = await register(client, "host", password=password)
        room = await create_room(client, host, title="Moderated")
    console = await new_page(browser)
    await console.goto(f"{base}/console")
    await console.fill("#login-user", host.username)
    await console.fill("#login-pass", password)
    await console.click("#login-form button[type=submit]")
    await console.click("#room-list button:has-text('Moderated')")
    await expect(console.locator("#rv-title")).to_have_text("Moderated")

    viewer = await new_page(browser, 390, 844)
    await viewer.goto(f"{base}/rooms/{room['id']}")
    await join_as_guest(viewer, "Troll")
    await send_chat(viewer, "buy elsewhere")
    line = console.locator("#modlog li", has_text="buy elsewhere")
    await expect(line).to_have_count(1)
    await line.locator("button:has-text('Delete')").click()
    await expect(viewer.locator("#chat-list li", has_text="buy elsewhere")).to_have_count(0)
    await expect(console.locator("#modlog li.deleted", has_text="buy elsewhere")).to_have_count(1)

    await send_chat(viewer, "again")
    await console.locator("#modlog li", has_text="again").locator("button:has-text('Mute')").click()
    await expect(console.locator("#mutes li")).to_contain_text("Troll until")  # by name, not by id
    await send_chat(viewer, "am I muted?")
    await expect(viewer.locator("#chat-error")).to_have_text("The host has muted you in this room.")
    await expect(console.locator("#modlog li.rejected", has_text="am I muted?")).to_have_count(1)
    # The host's session is logged out from another device: the console asks to log in again.
    token = next(c["value"] for c in await console.context.cookies() if c["name"] == "livesale_session")
    async with api_client(base) as client:
        r = await client.post("/api/auth/logout", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200, r.text
    await expect(console.locator("#auth-error")).to_have_text("Your session ended; log in again.")
    await expect(console.locator("#login-form")).to_be_visible()
    for page in (console, viewer):
        assert page.errors == [], page.errors  # type: ignore[attr-defined]
        await page.context.close()


async def test_pages_send_a_content_security_policy(server: ServerProcess) -> None:
    async with api_client(server.url) as client:
        for path in ("/", "/console", "/rooms/room_x"):
            r = await client.get(path)
            assert r.status_code == 200
            csp = r.headers["content-security-policy"]
            assert "script-src 'self'" in csp and "object-src 'none'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("range_header", ["bytes=abc", "bytes=5-1", "bytes=999999999-"])
async def test_pages_and_static_files_are_sent_whole_whatever_the_range(server: ServerProcess,
                                                                        range_header: str) -> None:
    async with api_client(server.url) as client:
        for path in ("/", "/console", "/static/js/live.js"):
            whole = await client.get(path)
            r = await client.get(path, headers={"Range": range_header})
            assert (r.status_code, r.content) == (200, whole.content), (path, r.status_code, r.text[:100])
        r = await client.post("/console")
        assert r.status_code == 405 and r.json()["error"] == "method_not_allowed", r.text


async def test_an_unexpected_error_still_carries_the_security_headers() -> None:
    """The 500 is answered outside the SecurityHeaders middleware, so its handler adds them."""
    request = Request({"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b""})
    response = await on_unexpected(request, RuntimeError("a bug"))
    assert response.status_code == 500 and json.loads(bytes(response.body)) == {
        "error": "internal", "message": "internal server error"}
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"


def test_screenshots_are_kept_in_docs() -> None:
    """docs/ holds current screenshots for the README; the browser test refreshes artifacts/."""
    for name in ("room-desktop", "room-mobile", "console-desktop", "console-mobile"):
        assert (REPO / "docs" / "screenshots" / f"{name}.png").exists(), name
    if ARTIFACTS.exists() and os.environ.get("LIVESALE_UPDATE_SCREENSHOTS"):
        for png in ARTIFACTS.glob("*.png"):
            shutil.copy(png, REPO / "docs" / "screenshots" / png.name)
