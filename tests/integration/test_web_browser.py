"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium.

One instance runs in the lab's LAN namespace with two rules, an SSH tunnel (to a stock sshd in
the same namespace) and a router mapping (miniupnpd on the lab's gateway, NAT-PMP); the browser
reaches its loopback [web] through a socat bridge. Another runs as the lab's router ([gateway]
in the gw namespace) for the page's gateway section. Screenshots go to tests/artifacts/.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import need, need_binary
from tests.integration.miniupnpd import router
from tests.integration.peers import free_port
from tests.integration.processes import REPO, Proc
from tests.integration.sshd import SSHD, Sshd
from tests.integration.topology import GW_LAN, Lab, lab
from tests.integration.webpeer import TOKEN

pytestmark = [pytest.mark.integration, pytest.mark.root, pytest.mark.netns]

TUNNEL_ROW = 'tr[data-tunnel="edge"]'
ARTIFACTS = REPO / "tests" / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: A client in the LAN namespace: sends CHUNK every PACE seconds and reads the echo, until the
#: file named by argv[2] exists (or 60 s); "hold" sends once and waits for the end, printing EOF.
CLIENT = """
import os, socket, sys, time
port, stop, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
client = socket.create_connection(("127.0.0.1", port), timeout=30)
print("connected", client.getsockname()[1], flush=True)
if mode == "hold":
    client.sendall(b"x"); client.recv(1)
    print("EOF" if client.recv(10) == b"" else "data", flush=True)
    sys.exit(0)
chunk = b"z" * 16384
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    client.sendall(chunk)
    got = 0
    while got < len(chunk):
        got += len(client.recv(65536))
    time.sleep(0.05)
client.close()
print("done", flush=True)
"""


@dataclass
class Dashboard:
    net: Lab
    url: str
    rules: dict[str, int]
    tmp: Path
    driver: Any

    def client(self, rule: str, mode: str) -> tuple[Proc, Path, int]:
        stop = self.tmp / f"stop-{time.monotonic_ns()}"
        script = self.tmp / "client.py"
        script.write_text(CLIENT)
        proc = Proc(
            [
                "ip",
                "netns",
                "exec",
                self.net.lan,
                sys.executable,
                str(script),
                str(self.rules[rule]),
                str(stop),
                mode,
            ]
        )
        line = proc.wait_for("connected", timeout=15)
        return proc, stop, int(line.split()[1])


def _driver(width: int = 1280, height: int = 1000) -> Any:
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions",
                     "--disable-background-networking", "--disable-sync", "--metrics-recording-only"):  # fmt: skip
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    return webdriver.Chrome(service=service, options=options)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    need(os.path.exists(CHROMIUM), "needs Debian's chromium (apt-get install chromium)")
    need(os.path.exists(CHROMEDRIVER), "needs chromedriver (apt-get install chromium-driver)")
    need(os.path.exists(SSHD), "needs OpenSSH's sshd (apt-get install openssh-server)")
    socat = need_binary("socat", "socat")
    tmp = tmp_path_factory.mktemp("dashboard")
    ARTIFACTS.mkdir(exist_ok=True)
    (tmp / "router").mkdir()
    (tmp / "ssh").mkdir()
    with lab() as net, router(net, tmp / "router"), contextlib.ExitStack() as stack:
        echo = 8000
        net.serve(net.lan, echo, "cat")
        sshd = Sshd(tmp / "ssh")  # started in the LAN namespace, on its loopback
        sshd.proc = Proc(["ip", "netns", "exec", net.lan, SSHD, "-D", "-e", "-f", str(sshd.config)])
        stack.callback(sshd.kill)
        sshd.proc.wait_for(f"Server listening on 127.0.0.1 port {sshd.port}")
        rules = {"web": free_port(), "bulk": free_port()}
        tunnel_port, web = free_port(), free_port()
        config = tmp / "portfwd.toml"
        config.write_text(
            "workers = 2\n"
            + "".join(
                f'[[forward]]\nname = "{name}"\nlisten = "127.0.0.1:{port}"\nconnect = "127.0.0.1:{echo}"\n'
                for name, port in rules.items()
            )
            + f'[[tunnel]]\nname = "edge"\nssh = "root@127.0.0.1:{sshd.port}"\nidentity = ["{sshd.user_key}"]\n'
            f'agent = false\nknown_hosts = ["{sshd.known_hosts}"]\nssh_config = ["/dev/null"]\n'
            f'local = ["127.0.0.1:{tunnel_port}:127.0.0.1:{echo}"]\n'
            f'[[map]]\nport = {echo}\nexternal_port = 18090\nmethod = "natpmp"\nlease = "120s"\ngateway = "{GW_LAN}"\n'
            f'[web]\nlisten = "127.0.0.1:{web}"\ntoken = "{TOKEN}"\n'
            f'[control]\nsocket = "{tmp}/ctl.sock"\n'
        )
        portfwd, url = serve_page(stack, net.lan, config, tmp, web, socat)
        portfwd.wait_for("published at", timeout=30)
        driver = _driver()
        stack.callback(driver.quit)
        yield Dashboard(net, url, rules, tmp, driver)
        assert "Traceback" not in "\n".join(portfwd.lines)


def serve_page(
    stack: contextlib.ExitStack, ns: str, config: Path, tmp: Path, web: int, socat: str
) -> tuple[Proc, str]:
    """`portfwd run -c config` in namespace `ns` until `stack` closes, and a socat bridge from
    this host's loopback to its [web] on port `web` there: (the portfwd, the page's URL)."""
    from tests.integration.processes import wait_listening

    env = {**os.environ, "PORTFWD_STATE_DIR": str(tmp / "state")}
    portfwd = Proc(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "portfwd", "run", "-c", str(config)],
        env=env,
        cwd=REPO,
    )
    stack.callback(portfwd.close)
    stack.callback(portfwd.stop)
    portfwd.wait_for(" ready: ", timeout=30)
    bridge = free_port()
    relay = Proc([socat, f"TCP-LISTEN:{bridge},bind=127.0.0.1,reuseaddr,fork",
                  f"EXEC:ip netns exec {ns} socat STDIO TCP\\:127.0.0.1\\:{web}"])  # fmt: skip
    stack.callback(relay.close)
    stack.callback(relay.stop)
    wait_listening(bridge)
    return portfwd, f"http://127.0.0.1:{bridge}/"


def wait(driver: Any, what: str, condition: Any, seconds: float = 15.0) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, seconds, poll_frequency=0.1).until(condition, message=what)


def cell(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return found[0] if found else None


def browser_errors(driver: Any, expected: str = "\0") -> list[str]:
    """The console's errors (a script error, a CSP violation), less the one a test caused."""
    return [
        entry["message"]
        for entry in driver.get_log("browser")
        if entry["level"] == "SEVERE" and expected not in entry["message"]
    ]


def test_the_page_shows_rules_a_tunnel_and_a_mapping(dashboard: Dashboard) -> None:
    driver = dashboard.driver
    driver.get(dashboard.url)
    for selector in (
        'tr[data-rule="web"]',
        'tr[data-rule="bulk"]',
        'tr[data-tunnel="edge"]',
        "tr[data-mapping]",
    ):
        wait(driver, selector, lambda d, s=selector: cell(d, s) is not None)
    wait(driver, "the tunnel up", lambda d: " up" in " " + cell(d, TUNNEL_ROW).text)
    mapping = cell(driver, "tr[data-mapping]").text
    assert "natpmp" in mapping
    assert "18090" in mapping
    assert "live" in cell(driver, "#connection").text
    assert driver.title.startswith("portfwd")
    wait(driver, "a graph per rule", lambda d: cell(d, 'svg.rate-graph[data-series="rule:bulk"]') is not None)
    assert cell(driver, 'svg.rate-graph[data-series="tunnel:edge"]') is not None
    sizes = driver.execute_script(
        "return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".filter(e => !e.name.includes('/api/v1/events')).map(e => [e.name, e.transferSize || e.encodedBodySize]);"
    )
    assert sum(size for _, size in sizes) < 100 * 1024, sizes
    assert all(name.startswith(dashboard.url) for name, _ in sizes), "nothing from another host (no CDN)"
    assert browser_errors(driver) == []
    driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))


def test_a_transfer_grows_on_the_page_and_then_shows_as_closed(dashboard: Dashboard) -> None:
    driver = dashboard.driver
    driver.get(dashboard.url)
    proc, stop, port = dashboard.client("bulk", "stream")
    try:
        row = "tr[data-session] td.client"
        wait(
            driver,
            "the session row",
            lambda d: any(str(port) in e.text for e in d.find_elements("css selector", row)),
        )

        def sent(d: Any) -> int:
            for element in d.find_elements("css selector", "tr[data-session]"):
                if str(port) in element.find_element("css selector", "td.client").text:
                    return int(
                        element.find_element("css selector", "td.bytes-up").get_attribute("data-value")
                    )
            return -1

        first = wait(driver, "bytes counted", lambda d: sent(d) > 0 and sent(d))
        wait(driver, "bytes growing", lambda d: sent(d) > first + 100_000, seconds=20)
        driver.save_screenshot(str(ARTIFACTS / "dashboard-transfer.png"))
        height = int(driver.execute_script("return document.documentElement.scrollHeight"))
        driver.set_window_size(1280, min(height + 140, 4000))  # the whole page, for the README
        driver.save_screenshot(str(ARTIFACTS / "dashboard-full.png"))
        driver.set_window_size(1280, 1000)
    finally:
        stop.touch()
        proc.wait_for("done", timeout=15)
        proc.stop()
        proc.close()

    def closed(d: Any) -> str | None:
        for element in d.find_elements("css selector", "#closed tr.closed-row"):
            if str(port) in element.text:
                return str(element.find_element("css selector", "td.reason").text)
        return None

    assert wait(driver, "the session among the closed", closed) == "client closed"
    assert browser_errors(driver) == []


def test_closing_a_session_from_the_page_needs_the_token(dashboard: Dashboard) -> None:
    driver = dashboard.driver
    driver.get(dashboard.url)
    driver.execute_script("sessionStorage.clear()")
    driver.refresh()
    proc, _, port = dashboard.client("web", "hold")
    try:

        def button(d: Any) -> Any:
            for element in d.find_elements("css selector", "tr[data-session]"):
                if str(port) in element.find_element("css selector", "td.client").text:
                    return element.find_element("css selector", "button.close-session")
            return None

        wait(driver, "the held session's close button", button).click()
        wait(driver, "a 401 shown", lambda d: "401" in cell(d, "#message").text)
        assert "token" in cell(driver, "#message").text
        assert button(driver) is not None, "without the token nothing closed"
        field = cell(driver, "#token")
        field.clear()
        field.send_keys(TOKEN)
        cell(driver, "#token-form button, #token-form [type=submit]").click()
        wait(driver, "the stream back", lambda d: "live" in cell(d, "#connection").text)
        wait(driver, "the close button again", button).click()
        assert proc.wait_for("EOF", timeout=10) == "EOF", "the client saw its session end"

        def closed(d: Any) -> str | None:
            for element in d.find_elements("css selector", "#closed tr.closed-row"):
                if str(port) in element.text:
                    return str(element.find_element("css selector", "td.reason").text)
            return None

        assert wait(driver, "closed by the page", closed) == "closed by API"
    finally:
        proc.stop()
        proc.close()
    assert browser_errors(driver, expected="the server responded with a status of 401") == []


def test_a_phone_and_a_keyboard(dashboard: Dashboard) -> None:
    from selenium.webdriver.common.keys import Keys

    driver = dashboard.driver
    driver.set_window_size(390, 844)
    try:
        driver.get(dashboard.url)
        wait(driver, "rules", lambda d: cell(d, 'tr[data-rule="web"]') is not None)
        width = driver.execute_script("return document.documentElement.scrollWidth")
        assert width <= 390 + 1, "the page itself never scrolls sideways (tables scroll in their box)"
        driver.save_screenshot(str(ARTIFACTS / "dashboard-phone.png"))
        driver.find_element("css selector", "body").send_keys("/")
        assert driver.switch_to.active_element.get_attribute("id") == "filter"
        driver.switch_to.active_element.send_keys("no-such-client", Keys.TAB)
        wait(
            driver,
            "filtered",
            lambda d: (
                not [e for e in d.find_elements("css selector", "tr[data-session]") if e.is_displayed()]
            ),
        )
    finally:
        driver.set_window_size(1280, 1000)


def test_the_gateway_section_shows_rules_with_kernel_counters_and_triggers(
    tmp_path: Path,
) -> None:
    """portfwd as the lab's router ([gateway] in the gw namespace, with [web]): the page shows
    the gateway's rules with the kernel's counters, which grow as a WAN client's bytes are
    DNATed to a LAN server, and its port trigger; nothing in the console."""
    need(os.path.exists(CHROMIUM), "needs Debian's chromium (apt-get install chromium)")
    need(os.path.exists(CHROMEDRIVER), "needs chromedriver (apt-get install chromium-driver)")
    socat = need_binary("socat", "socat")
    from tests.integration.topology import GW_WAN, LAN_HOST

    with lab() as net, contextlib.ExitStack() as stack:
        net.serve(net.lan, 80, "cat")
        web = free_port()
        config = tmp_path / "portfwd.toml"
        config.write_text(
            '[gateway]\nwan = "gwwan0"\nlan = "gwlan0"\n'
            f'[[gateway.forward]]\nport = 8080\nto = "{LAN_HOST}:80"\n'
            '[[gateway.trigger]]\ntrigger = "tcp/6667"\nopen = ["tcp/7000-7010"]\n'
            f'[web]\nlisten = "127.0.0.1:{web}"\ntoken = "{TOKEN}"\n'
            f'[control]\nsocket = "{tmp_path}/ctl.sock"\n'
        )
        portfwd, url = serve_page(stack, net.gw, config, tmp_path, web, socat)
        driver = _driver()
        stack.callback(driver.quit)
        driver.get(url)
        wait(driver, "the gateway section", lambda d: d.find_element("id", "gateway").is_displayed())
        trigger = wait(driver, "the trigger row", lambda d: cell(d, 'tr[data-trigger="gateway.trigger[0]"]'))
        assert "tcp/7000-7010" in trigger.text
        assert trigger.find_element("css selector", "td.host").text == "-", "nobody holds it yet"
        wait(
            driver,
            "the forwards' rule",
            lambda d: gateway_row(d, "prerouting", "gateway.forward tcp") is not None,
        )
        payload = os.urandom(64 * 1024)
        answer = net.run(
            net.wan,
            "socat",
            "-t",
            "5",
            "-T",
            "10",
            "-",
            f"TCP4:{GW_WAN}:8080,connect-timeout=2",
            data=payload,
        )
        assert answer.stdout == payload, "the bytes crossed the gateway whole"

        def counted(d: Any) -> bool:
            first = gateway_row(d, "prerouting", "gateway.forward tcp")  # a flow's first packet
            every = gateway_row(d, "forward", "dnat")  # every packet of DNATed flows, both ways
            return (
                first is not None
                and every is not None
                and int(first.find_element("css selector", "td.packets").text) >= 1
                and int(every.find_element("css selector", "td.bytes").get_attribute("data-value"))
                > len(payload)
            )

        wait(driver, "the kernel's counters on the page", counted, seconds=20)
        flow = wait(
            driver,
            "the DNATed flow among the sessions",
            lambda d: next((row for row in d.find_elements("css selector", "#flows-body tr")
                            if row.text.startswith("gateway gateway.forward[0] tcp 203.0.113.20:")), None),
        )  # fmt: skip
        assert f"8080 {LAN_HOST}:80" in flow.text
        assert browser_errors(driver) == []
        driver.save_screenshot(str(ARTIFACTS / "dashboard-gateway.png"))
    assert "Traceback" not in "\n".join(portfwd.lines)


def gateway_row(driver: Any, chain: str, rule: str) -> Any:
    """The gateway rules' row of `chain` and `rule` (its comment), or None."""
    for row in driver.find_elements("css selector", "#gateway-rules-body tr"):
        cells = row.find_elements("css selector", "td")
        if len(cells) == 4 and cells[0].text == chain and cells[1].text == rule:
            return row
    return None
