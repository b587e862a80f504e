"""/dashboard in headless Chromium (driven by chromedriver): the login form takes the admin key (kept in
sessionStorage, sent as a header, never in a URL), the charts fill after traffic, a screenshot is saved to
test-artifacts/dashboard.png.  Plus the data endpoint's auth and content over plain HTTP."""
from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import IN_CI
from fakes.openai_upstream import Fault
from support.observability import FeatureStandIn, add_stage

MASTER = "hk-dashboard-master-key-0123456789"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"


def traffic(gw, fake_openai, rounds=3):
    c = openai.OpenAI(base_url=gw.url + "/v1", api_key=MASTER, max_retries=0)
    for r in range(rounds):
        for _ in range(4):
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello world"}],
                                      extra_headers={"x-test-cost": "0.002", "x-test-cache": "miss"})
        c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "cached"}],
                                  extra_headers={"x-test-cache": "hit"})
        list(c.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "a b c"}], stream=True))
        fake_openai.push(Fault(status=500))
        with pytest.raises(openai.APIStatusError):
            c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])
        if r + 1 < rounds:
            time.sleep(1.05)  # spread over several seconds of the rolling window


@pytest.fixture
def dash_gw(make_gateway, fake_openai):
    free = {m: {"input_per_mtok": 0, "output_per_mtok": 0} for m in ("gpt-4o-mini", "gpt-4o")}  # stand-in costs only
    gw = make_gateway({"providers": [fake_openai.provider(max_retries=0, model_prices=free), fake_openai.provider(max_retries=0, name="spare", priority=5,
                                                                                 models=["gpt-4o"])],
                       "auth": {"master_key": MASTER}})
    add_stage(gw, FeatureStandIn())
    return gw


def test_dashboard_data_endpoint(dash_gw, fake_openai):
    gw = dash_gw
    # a browser without a key gets the sign-in shell (no data in it); API callers need the admin key
    page = httpx.get(gw.url + "/dashboard", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert httpx.get(gw.url + "/dashboard").status_code == 401
    assert httpx.get(gw.url + "/dashboard", headers={"accept": "text/html", "authorization": "Bearer nope"}
                     ).status_code == 401
    assert httpx.get(gw.url + "/dashboard", headers={"authorization": f"Bearer {MASTER}"}).text == page.text
    assert "<canvas" in page.text and "http://" not in page.text and "https://" not in page.text  # no CDN
    assert httpx.get(gw.url + "/dashboard/data").status_code == 401
    assert httpx.get(gw.url + "/dashboard/data", headers={"authorization": "Bearer nope"}).status_code == 401
    traffic(gw, fake_openai, rounds=1)
    d = httpx.get(gw.url + "/dashboard/data", headers={"authorization": f"Bearer {MASTER}"}).json()
    lm = d["last_minute"]
    assert lm["requests"] == 7 and lm["errors"] == 1
    assert lm["cache_hits"] == 1 and lm["cache_misses"] == 4 and lm["cache_hit_ratio"] == 0.2
    assert lm["p50"] is not None and lm["p50"] <= lm["p95"] <= lm["p99"]
    assert sum(d["series"]["requests"]) == 7 and len(d["series"]["t"]) == 300
    provs = {p["name"]: p for p in d["providers"]}
    assert set(provs) == {"openai", "spare"}
    assert provs["openai"]["requests"] == 7 and provs["openai"]["errors"] == 1
    assert provs["openai"]["cost"] == pytest.approx(0.008)
    assert provs["openai"]["completion_tokens"] > 0 and provs["openai"]["availability"] == 1.0
    assert provs["spare"]["requests"] == 0


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        if IN_CI:
            pytest.fail("chromium / chromedriver missing in CI (scripts/test-setup.sh installs them)")
        pytest.skip("chromium / chromedriver not installed")
    return chromium, driver


@pytest.mark.slow
def test_dashboard_in_headless_chromium(dash_gw, fake_openai, tmp_path):
    chromium, driver_path = _browser_paths()
    pytest.importorskip("selenium") if not IN_CI else __import__("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw = dash_gw
    traffic(gw, fake_openai, rounds=3)
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1250"):
        opts.add_argument(a)
    drv = webdriver.Chrome(service=Service(executable_path=driver_path, log_output=str(tmp_path / "driver.log")),
                           options=opts)
    try:
        drv.set_page_load_timeout(30)
        drv.get(gw.url + "/dashboard")
        wait = WebDriverWait(drv, 20)
        # no key yet: the data endpoint refuses, the page shows its login form
        wait.until(lambda d: d.find_element(By.ID, "login").is_displayed())
        drv.find_element(By.ID, "key").send_keys("wrong-key")
        drv.find_element(By.ID, "login-submit").click()
        wait.until(lambda d: "refused" in d.find_element(By.ID, "login-error").text)
        drv.find_element(By.ID, "key").send_keys(MASTER)
        drv.find_element(By.ID, "login-submit").click()
        wait.until(lambda d: d.find_element(By.ID, "app").get_attribute("data-ready") == "true")
        points = {cid: int(drv.find_element(By.ID, cid).get_attribute("data-points"))
                  for cid in ("chart-rps", "chart-latency", "chart-errors", "chart-cache", "chart-tokens",
                              "chart-cost")}
        assert points["chart-rps"] >= 3, points  # three seconds with traffic
        assert points["chart-latency"] >= 1 and points["chart-errors"] >= 1 and points["chart-cache"] >= 1
        assert points["chart-tokens"] == 1 and points["chart-cost"] == 1, points  # openai only; spare idle
        assert int(drv.find_element(By.ID, "health").get_attribute("data-rows")) == 2
        assert "/" in drv.find_element(By.ID, "t-lat").text
        # the key lives in sessionStorage only, never in the URL
        assert MASTER not in drv.current_url
        assert drv.execute_script("return sessionStorage.getItem('helixagent.dashboard.key')") == MASTER
        # the page keeps updating by itself
        before = drv.find_element(By.ID, "app").get_attribute("data-updated")
        traffic(gw, fake_openai, rounds=1)
        wait.until(lambda d: d.find_element(By.ID, "app").get_attribute("data-updated") != before)
        time.sleep(2.2)  # one more poll so the chart includes the last traffic
        ARTIFACTS.mkdir(exist_ok=True)
        drv.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
        # signing out forgets the key
        drv.find_element(By.ID, "logout").click()
        assert drv.execute_script("return sessionStorage.getItem('helixagent.dashboard.key')") is None
        assert drv.find_element(By.ID, "login").is_displayed()
    finally:
        drv.quit()
