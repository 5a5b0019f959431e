"""The Campaigns and Sample views in headless Chromium against the real ``labd`` process on the
simulated cell replaying a small pool (``--ground-truth pool.csv --goal minimize``, virtual time
at 2000x, short anneal and station measurement): a technician pastes a campaign file and starts
it (after the daemon refuses a broken one, with the fields named), watches the best-value plot and
the sample table fill from the WebSocket's ``campaign`` events, pauses it, resumes it with the
rack refilled, stops it; a sample's whole story (compositions, doses, furnace profile, result);
a viewer cannot start a campaign. Each test leaves a screenshot in its tmp dir."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from playwright.sync_api import expect

from tests.support.procs import Mosquitto
from tests.support.protocols import campaign_cell

from .conftest import Labd, wait_until, with_users

ELEMENTS = ["Ni", "Fe", "Co"]
RUN = {"params": {"anneal_c": 400, "anneal_s": 60, "ramp_c_min": 600, "unload_below_c": 380}}


def pool_value(ni: float, fe: float, co: float) -> float:
    """The pool's 'measured' overpotential: a bowl with its minimum near Ni 0.5, Fe 0.3."""
    return round(0.30 + 0.4 * (ni - 0.5) ** 2 + 0.3 * (fe - 0.3) ** 2 + 0.05 * co, 6)


def pool_rows() -> dict[tuple[float, ...], float]:
    """The pool: the ternary grid at 0.1 steps, every element present."""
    rows: dict[tuple[float, ...], float] = {}
    for i in range(1, 9):
        for j in range(1, 10 - i):
            comp = (i / 10, j / 10, round(1 - i / 10 - j / 10, 1))
            rows[comp] = pool_value(*comp)
    return rows


def write_pool(path: Path) -> None:
    rows = pool_rows()
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([*ELEMENTS, "overpotential_V"])
        w.writerows([*k, v] for k, v in rows.items())


def spec(name: str, pool: Path, samples: int) -> dict[str, Any]:
    return {"name": name, "elements": {el: {} for el in ELEMENTS}, "pool": str(pool),
            "objective": {"goal": "minimize", "property": "overpotential_V"}, "batch_size": 2,
            "budget": {"samples": samples}, "optimizer": {"kind": "random", "seed": 3},
            "run": RUN}


@pytest.fixture(scope="module")
def cell(tmp_path_factory: pytest.TempPathFactory,
         mosquitto: Mosquitto) -> Iterator[tuple[Labd, Path]]:
    tmp = tmp_path_factory.mktemp("labd-campaign-web")
    pool = tmp / "pool.csv"
    write_pool(pool)
    (tmp / "sim.yaml").write_text(yaml.safe_dump(campaign_cell(12, per_row=6)))
    (tmp / "labd.yaml").write_text(yaml.safe_dump({"simulator": {"config": str(tmp / "sim.yaml")}}))
    daemon = Labd(tmp / "data", mosquitto, tmp / "labd.log", time_scale=2000, args=[
        "--config", str(tmp / "labd.yaml"), "--ground-truth", str(pool), "--goal", "minimize"])
    try:
        yield with_users(daemon), pool
    finally:
        daemon.cleanup()


def sign_in(page: Any, labd: Labd, who: str, hash_: str) -> None:
    page.goto(f"{labd.base}/{hash_}")
    page.get_by_label("API token").fill(labd.tokens[who])
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#who-name")).to_have_text(who)
    expect(page.locator("#conn")).to_have_text(re.compile(r"^live"))


def budget(page: Any, key: str) -> str:
    return str(page.locator(f"#campaign-budget dd[data-key='{key}']").inner_text())


def test_viewer_cannot_start_a_campaign(page: Any, cell: tuple[Labd, Path]) -> None:
    labd, pool = cell
    sign_in(page, labd, "vic", "#campaigns")
    page.locator("#campaign-new summary").click()
    note = page.locator("#campaign-role-note")
    expect(note).to_have_text("Starting a campaign needs the technician role; you are signed in "
                              "as a viewer.")
    start = page.get_by_role("button", name="Start campaign")
    expect(start).to_be_disabled()
    # A page whose role changed after it loaded (or a forced click) still meets the server's 403
    page.get_by_label(re.compile(r"^Campaign spec")).fill(yaml.safe_dump(spec("by-vic", pool, 2)))
    start.evaluate("b => { b.disabled = false; }")
    start.click()
    expect(page.locator("#campaign-error")).to_contain_text(
        "Refused: starting a campaign needs the technician role")
    assert all(c["id"] != "by-vic" for c in labd.api("admin", "GET", "/campaigns"))


def test_start_watch_pause_resume_stop(page: Any, cell: tuple[Labd, Path]) -> None:
    labd, pool = cell
    sign_in(page, labd, "tess", "#campaigns")
    page.locator("#campaign-new summary").click()
    text_area = page.get_by_label(re.compile(r"^Campaign spec"))
    start = page.get_by_role("button", name="Start campaign")
    error = page.locator("#campaign-error")

    # the daemon's refusals, said next to the form: broken YAML, a missing field, a relative pool
    text_area.fill("name: web-demo\nelements: {Ni: {}, Fe: {}\n")
    start.click()
    expect(error).to_contain_text("The daemon refused the spec: invalid spec_yaml: not valid "
                                  "YAML or JSON: line 3, column 1")
    broken = spec("web-demo", pool, 6)
    del broken["budget"]
    text_area.fill(yaml.safe_dump(broken))
    start.click()
    expect(error).to_contain_text("• budget: Field required")
    text_area.fill(yaml.safe_dump({**spec("web-demo", pool, 6), "pool": "pool.csv"}))
    start.click()
    expect(error).to_contain_text("• spec.pool: 'pool.csv' is relative")
    assert all(c["id"] != "web-demo" for c in labd.api("admin", "GET", "/campaigns"))

    text_area.fill(yaml.safe_dump(spec("web-demo", pool, 6), sort_keys=False))
    start.click()
    expect(page).to_have_url(re.compile(r"#campaigns/web-demo$"))
    card = page.locator("[data-campaign=web-demo]")
    expect(card.locator("#campaign-state")).to_have_text("running")
    expect(page.locator("[data-campaign-row=web-demo]")).to_contain_text("running")

    # the first furnace load's results arrive as campaign events: plot and table fill
    best = page.locator("#campaign-best")
    expect(best).to_have_attribute("data-samples", "2", timeout=60_000)
    expect(page.locator("#campaign-samples tr")).to_have_count(2)
    expect(page.locator("#campaign-space")).to_have_attribute("data-samples", "2")
    first = page.locator("#campaign-samples tr").first
    expect(first).to_contain_text("made")
    expect(page.locator("#campaign-budget dd[data-key=best]")).to_contain_text("overpotential_V")
    expect(page.locator("#campaign-budget dd[data-key='samples made']")).to_have_text(
        re.compile(r"^[2-6] of 6$"))
    # the canvas really has a plot drawn on it (not blank)
    inked = best.evaluate("c => { const d = c.getContext('2d').getImageData(0, 0, c.width, "
                          "c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) "
                          "if (d[i]) n++; return n; }")
    assert inked > 1000

    # pause once the first load is settled (its crucibles counted back on a refill)
    expect(page.locator("#campaign-budget dd[data-key='furnace loads']")).to_contain_text(
        re.compile(r"^[1-3] done"), timeout=60_000)
    page.get_by_role("button", name="Pause campaign").click()
    expect(card.locator("#campaign-state")).to_have_text("paused")
    expect(page.locator("#campaign-reason")).to_have_text("paused by user")
    expect(page.get_by_role("button", name="Pause campaign")).to_be_disabled()
    free_before = int(budget(page, "empty crucibles"))
    refilled = page.get_by_label("Rack refilled (used crucibles replaced by empty ones)")
    refilled.check()
    # The card is drawn again on every campaign event (and on coming back to it): the tick must
    # survive that, or a resume right after an event goes without it.
    page.goto(f"{labd.base}/#queue")
    page.goto(f"{labd.base}/#campaigns/web-demo")
    expect(card.locator("#campaign-state")).to_have_text("paused")
    expect(refilled).to_be_checked()
    with page.expect_response(re.compile(r"/campaigns/web-demo/resume$")) as resumed:
        page.get_by_role("button", name="Resume campaign").click()
    assert resumed.value.request.post_data_json == {"refilled": True}
    # the first load's crucibles count as empty again (the page re-reads this; a batch planned
    # right after the resume may take two of them at once, so the reply is what is checked)
    assert resumed.value.json()["rack_slots_free"] >= free_before + 2
    expect(card.locator("#campaign-state")).to_have_text("running")

    page.get_by_role("button", name="Stop campaign").click()
    expect(card.locator("#campaign-state")).to_have_text(re.compile(r"stopping|finished"))
    expect(card.locator("#campaign-state")).to_have_text("finished", timeout=60_000)
    expect(page.locator("#campaign-reason")).to_have_text("stopped by user")
    st = labd.api("tess", "GET", "/campaigns/web-demo")
    assert st["status"] == "finished" and st["reason"] == "stopped by user"
    made = st["samples_made"]
    assert made in (4, 6), st
    expect(best).to_have_attribute("data-samples", str(made))
    expect(page.locator("#campaign-samples tr")).to_have_count(made + st["interrupted"])
    for button in ("Pause campaign", "Resume campaign", "Stop campaign"):
        expect(page.get_by_role("button", name=button)).to_be_disabled()

    # the same name again: the daemon's 409, said plainly
    page.locator("#campaign-new summary").click()
    text_area.fill(yaml.safe_dump(spec("web-demo", pool, 6)))
    start.click()
    expect(error).to_contain_text("Refused: a campaign named 'web-demo' exists already")


def made_sample(labd: Labd, pool: Path) -> str:
    """A sample of a campaign (made by the test above, or here if it ran alone)."""
    rows = labd.api("tess", "GET", "/samples")
    if not rows:
        labd.api("tess", "POST", "/campaigns", json={"spec_yaml": yaml.safe_dump(
            spec("web-story", pool, 2))})
        rows = wait_until(lambda: labd.api("tess", "GET", "/samples"), 90, "a sample")
    return str(rows[-1]["sample_id"])


def test_sample_story(page: Any, cell: tuple[Labd, Path]) -> None:
    labd, pool = cell
    sid = made_sample(labd, pool)
    row = labd.api("vic", "GET", f"/samples/{sid}")
    # an unknown sample: the daemon's 404 said on the page
    sign_in(page, labd, "vic", "#samples/no-such-sample")
    expect(page.locator("#sample-detail")).to_contain_text(
        "Sample no-such-sample: no sample 'no-such-sample' in the journal")
    page.get_by_role("link", name="Campaigns").click()
    page.locator(f"[data-campaign-row={row['campaign']}] a").click()
    page.locator(f"#campaign-samples a:text-is('{sid}')").click()
    expect(page).to_have_url(re.compile(rf"#samples/{sid}$"))
    story = page.locator("#sample-story")
    expect(story.locator("h3")).to_have_text(f"Sample {sid}")
    # compositions and doses, per element, as the journal has them
    for el, target in row["target_composition"].items():
        cells = story.locator(f"tr[data-element={el}] td")
        expect(cells.nth(1)).to_have_text(re.compile(rf"^{target:.3g}"))
        expect(cells.nth(2)).not_to_have_text("—")  # measured by the station's XRF
        expect(cells.nth(3)).to_have_text(re.compile(r"^\d+(\.\d+)?$"))  # dosed mg
        assert row["dosed_mg"][el] > 0 and el in row["measured_composition"]
    # the result: the pool's value of the composition made (nearest pool member)
    value = row["property_value"]
    assert row["property_name"] == "overpotential" and row["property_unit"] == "V"
    expect(story.locator("dd[data-key=overpotential]")).to_have_text(
        re.compile(rf"^{value:.4g} V$"))
    assert any(value == pytest.approx(v, abs=1e-9)
               for v in pool_rows().values())
    expect(story.locator("dd[data-key=anneal]")).to_contain_text("400 °C")
    # the furnace profile: the run's furnace temperatures, plotted
    furnace = row["furnace"]
    # every reading of the run's furnace stream (at 2000x the monitor sees few of them)
    run = labd.api("vic", "GET", f"/runs/{row['run_uid']}", params={"documents": "true"})
    descs = {d["doc"]["uid"] for d in run["documents"]
             if d["name"] == "descriptor" and d["doc"]["name"] == "furnace"}
    readings = [d["doc"]["data"][furnace["data_key"]] for d in run["documents"]
                if d["name"] == "event" and d["doc"]["descriptor"] in descs]
    assert furnace["units"] == "degC" and furnace["points_total"] == len(readings) >= 2
    assert furnace["value"] == readings and len(furnace["time"]) == len(readings)
    assert max(readings) > readings[0] + 50  # the furnace heated
    canvas = story.locator("#sample-furnace")
    expect(canvas).to_have_attribute("data-points", str(len(furnace["value"])))
    expect(story.locator("#sample-furnace-summary")).to_contain_text(
        f"{furnace['points_total']} readings of {furnace['data_key']}, peak")
