"""A real headless Chromium for the browser tests: Debian's packages, driven by selenium.

This module owns how the suite starts and talks to a browser:

- the executables are Debian's ``chromium`` and ``chromium-driver``
  (``scripts/install`` installs them); when either is missing the test *fails*
  with a message saying so, it does not skip. Nothing is ever downloaded: the
  driver path is given to selenium (so Selenium Manager is not run at all), and
  ``SE_OFFLINE`` is set in case anything else would reach for it;
- the browser runs headless, sandbox and GPU off, no network services of its own
  (QUIC, sync, component updates, background networking), a fresh profile, and a
  fake microphone playing a WAV file the test wrote (:func:`write_tone_wav`);
- :class:`Page` drives the voice page through its DOM and waits on
  ``window.relayDemo.when(...)``, which resolves when the page's own state says
  so: event-driven, with a timeout, never a sleep.

Selenium is synchronous: tests call it through ``trio.to_thread.run_sync`` so
the relay and simulator keep running in the test's Trio loop meanwhile.
"""

from __future__ import annotations

import array
import math
import os
import shutil
import wave
from pathlib import Path
from typing import Any, Final

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By

CHROMIUM_PATH: Final = "/usr/bin/chromium"
CHROMEDRIVER_PATH: Final = "/usr/bin/chromedriver"
#: How long one wait for the page may take before the test fails (seconds).
PAGE_WAIT_TIMEOUT_S: Final = 30.0
#: Browser window size for the screenshots: width and height in pixels.
WINDOW_SIZE_PX: Final = (900, 1000)
#: The fake microphone's WAV: 16-bit mono at this rate, this long (Chromium loops it).
#: 44.1 kHz is the rate Chromium's fake capture device runs at, so Chromium itself
#: does not resample the file (it does, imprecisely, for other rates: a 440 Hz tone
#: in a 48 kHz WAV reaches a 48 kHz AudioContext at 450 Hz).
WAV_RATE_HZ: Final = 44_100
WAV_SECONDS: Final = 7


def require_chromium() -> None:
    """Fail (not skip) with a clear message when the browser or its driver is missing."""
    missing = [path for path in (CHROMIUM_PATH, CHROMEDRIVER_PATH) if not os.access(path, os.X_OK)]
    if missing:
        pytest.fail(
            f"browser tests need Debian's chromium and chromium-driver ({', '.join(missing)} "
            "not found): run scripts/install, or apt-get install chromium chromium-driver",
            pytrace=False,
        )


def write_tone_wav(
    path: Path, frequency_hz: float, amplitude: float, *, on_s: float = 0.0, off_s: float = 0.0
) -> None:
    """A sine tone of ``amplitude`` (fraction of full scale) as 16-bit mono PCM WAV.

    With ``on_s`` and ``off_s``, bursts: ``on_s`` of tone, then ``off_s`` of silence,
    for the whole file (a speaker who pauses, for turn detection).
    """
    count = WAV_RATE_HZ * WAV_SECONDS
    period = round((on_s + off_s) * WAV_RATE_HZ)
    audible = round(on_s * WAV_RATE_HZ)

    def sample(i: int) -> int:
        if period and i % period >= audible:
            return 0
        return round(amplitude * 32767 * math.sin(2 * math.pi * frequency_hz * i / WAV_RATE_HZ))

    samples = array.array("h", (sample(i) for i in range(count)))
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(WAV_RATE_HZ)
        out.writeframes(samples.tobytes())


def chromium_flags(wav: Path, profile: Path) -> list[str]:
    return [
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",  # a container's small /dev/shm must not crash it
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        f"--window-size={WINDOW_SIZE_PX[0]},{WINDOW_SIZE_PX[1]}",
    ]


def launch_chromium(wav: Path, profile: Path) -> webdriver.Chrome:
    """Start headless Chromium through chromedriver, both from Debian's packages."""
    require_chromium()
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager, were it ever run, stays offline
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM_PATH
    for flag in chromium_flags(wav, profile):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER_PATH)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_script_timeout(PAGE_WAIT_TIMEOUT_S + 5)
    return driver


def browser_log(driver: webdriver.Chrome) -> list[dict[str, Any]]:
    """The console entries since the last call (chromedriver's log; selenium leaves it untyped)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return entries


class PageError(AssertionError):
    """The page did not reach the state a test waited for."""


class Page:
    """The voice page in one tab."""

    def __init__(self, driver: webdriver.Chrome) -> None:
        self.driver = driver

    def open(self, url: str) -> None:
        self.driver.get(url)
        browser_log(self.driver)  # start from an empty console log

    def click(self, element_id: str) -> None:
        self.driver.find_element(By.ID, element_id).click()

    def hold(self, element_id: str) -> None:
        ActionChains(self.driver).click_and_hold(
            self.driver.find_element(By.ID, element_id)
        ).perform()

    def release(self, element_id: str) -> None:
        ActionChains(self.driver).release(self.driver.find_element(By.ID, element_id)).perform()

    def wait(self, condition: str, timeout_s: float = PAGE_WAIT_TIMEOUT_S) -> dict[str, Any]:
        """Wait until the JavaScript expression ``condition`` (over ``s``, the page's
        state) holds; returns a snapshot of the state at that moment."""
        result = self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            # An error the page shows ends the wait at once.
            f"window.relayDemo.when((s) => ({condition}) || s.errors.length > 0, "
            f"{timeout_s * 1000:.0f})"
            ".then(done, (error) => done({__error: String(error.message || error)}));"
        )
        if not isinstance(result, dict):
            raise PageError(f"the page answered {result!r} waiting for {condition}")
        if "__error" in result:
            raise PageError(f"waiting for {condition}: {result['__error']}")
        if result["errors"]:
            raise PageError(f"waiting for {condition}, the page showed: {result['errors']}")
        return result

    def state(self) -> dict[str, Any]:
        result = self.driver.execute_script("return window.relayDemo.snapshot()")
        assert isinstance(result, dict)
        return result

    def text(self, element_id: str) -> str:
        return str(self.driver.find_element(By.ID, element_id).text)

    def console_errors(self) -> list[str]:
        """Console entries of level SEVERE since the page was opened (JS exceptions...)."""
        return [
            str(entry.get("message"))
            for entry in browser_log(self.driver)
            if entry.get("level") == "SEVERE"
        ]

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise PageError(f"could not save a screenshot to {path}")


def copy_screenshot(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)


__all__ = [
    "CHROMEDRIVER_PATH",
    "CHROMIUM_PATH",
    "Page",
    "PageError",
    "copy_screenshot",
    "launch_chromium",
    "require_chromium",
    "write_tone_wav",
]
