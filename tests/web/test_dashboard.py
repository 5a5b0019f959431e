"""The dashboard in headless Chromium against the real daemon on the simulated cell: sign in,
start protocols from their generated forms (and see the server's refusal next to the field), watch
a run finish, pause and resume a long one, a viewer's disabled controls and a technician's refused
edit, the interlock banner after an e-stop pressed in the simulator and its latch acknowledged,
and the page reconnecting by itself after the daemon restarts. Each test leaves a screenshot in
its tmp dir."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from hardware_sims.control import ControlClient

from .conftest import Labd, wait_until


def sign_in(page: Any, labd: Labd, who: str, hash_: str = "") -> None:
    page.goto(f"{labd.base}/{hash_}")
    page.get_by_label("API token").fill(labd.tokens[who])
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who-name")).to_have_text(who)
    expect(page.locator("#conn")).to_have_text(re.compile(r"^live"))


def idle(labd: Labd) -> None:
    wait_until(lambda: labd.api("admin", "GET", "/status")["engine"] == "idle", 30, "idle")


def test_sign_in_start_from_form_and_watch_it_finish(page: Any, labd: Labd) -> None:
    page.goto(labd.base + "/")
    page.get_by_label("API token").fill("not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#sign-in-error")).to_contain_text("refused the token")
    expect(page.locator("#app")).to_be_hidden()

    sign_in(page, labd, "tess")
    expect(page.locator("#who-role")).to_have_text("technician")
    expect(page.locator("[data-device=furnace]")).to_contain_text("connected")

    page.get_by_role("link", name="Start a protocol").click()
    page.get_by_label("Protocol", exact=True).select_option("check_balance")
    ref = page.get_by_label(re.compile(r"^Reference G"))
    expect(page.locator("[data-field=reference_g] label")).to_contain_text("(g)")
    expect(page.get_by_label(re.compile(r"^Tolerance Mg"))).to_have_value("0.5")  # the default
    ref.fill("-1")
    page.get_by_role("button", name="Run now").click()
    expect(page.locator("#e-reference_g")).to_have_text("Input should be greater than 0")
    expect(ref).to_have_attribute("aria-invalid", "true")
    ref.fill("")  # a required field left empty: the server names it
    page.get_by_role("button", name="Add to queue").click()
    expect(page.locator("#e-reference_g")).to_have_text("Field required")
    assert labd.api("admin", "GET", "/queue")["items"] == []  # nothing was queued

    page.get_by_label("Protocol", exact=True).select_option("home_gantry")
    expect(page.locator("#protocol-fields")).to_contain_text("takes no parameters")
    page.get_by_role("button", name="Run now").click()
    page.get_by_role("link", name="Queue & history").click()
    row = page.locator("#history-rows tr", has_text="home_gantry").first
    expect(row.locator(".badge")).to_have_text("success", timeout=30_000)
    expect(row).to_contain_text("tess (web@127.0.0.1)")  # the run records where it came from
    hist = labd.api("admin", "GET", "/history")
    assert hist[0]["protocol"] == "home_gantry" and hist[0]["source"].startswith("web@")


def test_pause_and_resume_a_long_run(page: Any, labd: Labd, tmp_path: Path) -> None:
    sign_in(page, labd, "tess", "#start")
    page.get_by_label("Protocol", exact=True).select_option("furnace_bakeout")
    page.get_by_label(re.compile(r"^Temperature C")).fill("300")
    page.get_by_label(re.compile(r"^Hold S")).fill("600")
    page.get_by_role("button", name="Run now").click()
    expect(page.locator("#run-protocol")).to_have_text("furnace_bakeout")
    expect(page.locator("#run-state")).to_have_text("running")

    page.get_by_role("button", name="Pause now").click()
    expect(page.locator("#run-state")).to_have_text("paused")
    banner = page.locator("#banners .banner")
    expect(banner).to_contain_text("Paused by tess (web@127.0.0.1)")
    expect(page.get_by_role("button", name="Pause now")).to_be_disabled()
    page.screenshot(path=str(tmp_path / "paused.png"), full_page=True)
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#run-state, #run-body .muted").first).not_to_have_text("paused")
    expect(banner).to_have_count(0)

    if labd.api("admin", "GET", "/status")["engine"] == "running":
        page.get_by_role("button", name="Stop").click()
    page.get_by_role("link", name="Queue & history").click()
    row = page.locator("#history-rows tr", has_text="furnace_bakeout").first
    expect(row.locator(".badge")).not_to_have_text("running", timeout=30_000)
    expect(page.locator("#run-body")).to_contain_text("Nothing is running")
    idle(labd)
    expect(row.locator(".badge")).to_have_text("stopped")


def test_viewer_sees_controls_disabled_and_a_refusal_is_shown(page: Any, labd: Labd,
                                                                browser: Any) -> None:
    queued = labd.api("admin", "POST", "/queue", json={"protocol": "home_gantry"})
    try:
        sign_in(page, labd, "vic", "#queue")
        expect(page.locator("#who-role")).to_have_text("viewer")
        row = page.locator(f"[data-item='{queued['item_uid']}']")
        expect(row).to_contain_text("home_gantry")
        for button in (page.get_by_role("button", name="Start queue"),
                       row.get_by_role("button", name=re.compile("^Remove")),
                       page.get_by_role("button", name="Abort")):
            expect(button).to_be_disabled()
            expect(button).to_have_attribute("title", "needs the technician role; you are a viewer")
        page.get_by_role("link", name="Start a protocol").click()
        expect(page.get_by_role("button", name="Add to queue")).to_be_disabled()

        # A technician may use the button, but not on the admin's item: the server's refusal shows.
        tech = browser.new_context().new_page()
        sign_in(tech, labd, "tess", "#queue")
        tech.locator(f"[data-item='{queued['item_uid']}']").get_by_role(
            "button", name=re.compile("^Remove")).click()
        expect(tech.locator("#notice")).to_contain_text(
            "Refused (you lack the role): editing admin's queue item needs the admin role; "
            "tess is a technician")
        tech.context.close()
        assert [i["item_uid"] for i in labd.api("admin", "GET", "/queue")["items"]] == [
            queued["item_uid"]]
    finally:
        labd.api("admin", "DELETE", "/queue")


def test_interlock_banner_after_estop_in_the_simulator(page: Any, labd: Labd,
                                                      tmp_path: Path) -> None:
    """The e-stop trips (banner, TRIPPED), then latches when released: nothing starts until a
    technician acknowledges it from the banner. The API refuses a viewer (403) and an
    acknowledgement while the e-stop is still pressed (409); labctl shows and acknowledges it."""
    sign_in(page, labd, "tess")
    estop = page.locator("[data-interlock=e-stop]")
    expect(estop).to_contain_text("ok")
    control = ControlClient(labd.control_address())
    control.call(op="action", device="safety", action="press_estop")
    try:
        banner = page.locator("#banners .banner.bad")
        expect(banner).to_contain_text("Safe state: interlock e-stop", timeout=15_000)
        expect(banner).to_contain_text("safety.estop")  # why: the condition and its value
        expect(estop).to_contain_text("TRIPPED")
        page.screenshot(path=str(tmp_path / "estop.png"), full_page=True)
        with labd.user("tess") as c:
            r = c.post("/interlocks/e-stop/acknowledge")
            assert r.status_code == 409 and "its condition still holds" in r.json()["detail"]
    finally:
        control.call(op="action", device="safety", action="release_estop")
    try:
        latched = page.locator("#banners .banner.bad")
        expect(latched).to_contain_text("Interlock e-stop is latched", timeout=15_000)
        expect(estop).to_contain_text("LATCHED")
        with labd.user("vic") as c:
            assert c.post("/interlocks/e-stop/acknowledge").status_code == 403
        status = labctl(labd, "tess", "status")
        assert "INTERLOCK e-stop latched" in status.stdout, status
        listed = labctl(labd, "tess", "interlocks")
        assert re.search(r"e-stop\s+abort\s+LATCHED", listed.stdout), listed.stdout
        page.screenshot(path=str(tmp_path / "latched.png"), full_page=True)
        page.get_by_role("button", name="Acknowledge interlock e-stop").click()
        expect(page.locator("#banners .banner")).to_have_count(0, timeout=15_000)
        expect(estop).to_contain_text("ok")
        again = labctl(labd, "tess", "interlocks", "ack", "e-stop")
        assert again.returncode == 1 and "is not latched" in again.stderr, again
    finally:  # the module's daemon goes on serving the next tests
        if any(i["latched"] for i in labd.api("admin", "GET", "/interlocks")):
            labd.api("admin", "POST", "/interlocks/e-stop/acknowledge")
    events = labd.api("admin", "GET", "/interlocks")
    assert not any(i["latched"] or i["active"] for i in events)


def labctl(labd: Labd, who: str, *args: str) -> subprocess.CompletedProcess[str]:
    return labd.labctl(*args, token=labd.tokens[who])


def test_page_reconnects_after_the_daemon_restarts(page: Any, labd: Labd) -> None:
    sign_in(page, labd, "tess", "#queue")
    labd.stop()
    expect(page.locator("#conn")).to_contain_text("reconnecting")
    expect(page.locator("#banners")).to_contain_text("Not connected to the daemon")
    labd.start()
    expect(page.locator("#conn")).to_have_text(re.compile(r"^live"), timeout=30_000)
    expect(page.locator("#banners .banner")).to_have_count(0)
    # the snapshot after the restart brought the state back: the history is still there
    expect(page.locator("#history-rows")).to_contain_text("furnace_bakeout")
