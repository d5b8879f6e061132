"""plot_ci.py as a dashboard: the --html page's tables against ci_table.csv and hand-worked numbers, --watch refreshes
while run folders are being written (a half-written eval.csv row is skipped, a failing refresh is retried), --describe
files, the dm_control note of an official --baseline, and the page in a real headless Chromium."""

import calendar
import csv
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from functools import partial
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO
from matplotlib.colors import to_rgb
from test_plot_ci import WORKED, main_err, main_ok, ramp, table_rows, write_demo_runs, write_run

import plot_ci

OFFICIAL = REPO / "data" / "official_tdmpc2"


class Page(HTMLParser):
    """What the tests read off index.html: each table's cell texts with the id of its <section>, the images, the
    links and the reload period."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self.tables, self.images, self.links, self.refresh = [], [], [], None
        self._section, self._cell = None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section":
            self._section = attrs.get("id")
        elif tag == "table":
            self.tables.append((self._section, []))
        elif tag == "tr":
            self.tables[-1][1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs["src"])
        elif tag == "a":
            self.links.append(attrs["href"])
        elif tag == "meta" and attrs.get("http-equiv") == "refresh":
            self.refresh = attrs["content"]

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def table(self, section: str, first_header: str) -> dict:
        """{(cells 0, 1): {header: cell}} of the table in `section` whose first header cell is `first_header`."""
        rows = next(rows for s, rows in self.tables if s == section and rows[0][0] == first_header)
        return {(r[0], r[1]): dict(zip(rows[0], r, strict=True)) for r in rows[1:]}

    @property
    def made(self) -> int:
        """When the page was made, in Unix seconds."""
        return calendar.timegm(time.strptime(self.text.split('<time datetime="')[1][:20], "%Y-%m-%dT%H:%M:%SZ"))


# docs/plot_ci.md, "The dashboard": the synthetic demo runs (made up, not results) as they would stand 40 hours into
# the experiment, every run started at once, at made-up speeds in env steps per second of wall time.
LIVE_DEMO_HOURS = 40
LIVE_DEMO_SPEEDS = {"glass_off_1m": 60.0, "tdmpc2_k128": 70.0, "tdmpc2_k256": 26.0}
LIVE_DEMO_DESCRIPTIONS = """\
glass_off_1m = "TD-MPC2 + Glass, Glass off at 1M env steps"
tdmpc2_k128 = "TD-MPC2, 128 updates per vector step"
tdmpc2_k256 = "TD-MPC2, 256 updates per vector step: slower"
"""


def write_live_demo_runs(root) -> Path:
    """write_demo_runs, then each run cut where it would be after LIVE_DEMO_HOURS at its family's speed (±3% by
    seed; 90 s to compile before the first evaluation), its wall times and its eval.csv's modification time to
    match. tdmpc2_k256 is still on its way, and its HopperHop seed 5 stopped at 3M hours ago."""
    root = write_demo_runs(root)
    now = time.time()
    elapsed = LIVE_DEMO_HOURS * 3600.0
    for eval_csv in sorted(root.glob("*/eval.csv")):
        run = plot_ci.read_run(eval_csv.parent)
        speed = LIVE_DEMO_SPEEDS[run.exp_name] * (1 + 0.03 * (run.seed - 3))
        wall = 90.0 + run.steps / speed
        keep = wall <= elapsed
        lines = ["step,wall_time,return_pi,return_mppi"] + [
            f"{s:.0f},{w:.2f},{pi:g},{mppi:g}" for s, w, pi, mppi in zip(
                run.steps[keep], wall[keep], run.columns["return_pi"][keep], run.columns["return_mppi"][keep],
                strict=True)]
        eval_csv.write_text("\n".join(lines) + "\n")
        written = now - elapsed + wall[keep][-1]
        os.utime(eval_csv, (written, written))
    return root


def read_page(out: Path) -> Page:
    return Page((out / "index.html").read_text(encoding="utf-8"))


@pytest.fixture
def live_root(tmp_path) -> Path:
    """HopperHop: glass_off_1m ends at WORKED (a 10 s wall-time step per 1M env steps, so 100,000 steps/s), and
    `short` has a run at 2M below G1 that does not count yet; CartpoleBalance: two PPO runs."""
    root = tmp_path / "runs"
    for seed, best in enumerate(WORKED, start=1):
        write_run(root, "HopperHop", "glass_off_1m", seed, ramp(4_000_000, best))
    write_run(root, "HopperHop", "short", 1, ramp(4_000_000, 610.0))
    write_run(root, "HopperHop", "short", 2, ramp(2_000_000, 450.0))
    for seed, ret in ((1, 800.0), (2, 900.0)):
        write_run(root, "CartpoleBalance", "ppo", seed, [(0, 10.0, 0.0), (4_000_000, ret, 0.0)], kind="ppo")
    return root


def test_page_table_equals_ci_table_csv(live_root, tmp_path, capsys):
    describe = tmp_path / "families.json"
    describe.write_text(json.dumps({"glass_off_1m": "Glass until 1M <env steps>, then TD-MPC2", "gone": "no runs"}))
    out = tmp_path / "out"
    before = int(time.time())
    assert plot_ci.main([str(live_root), "--html", "--describe", str(describe), "--out", str(out)]) == 0
    assert "plot_ci.py: note: --describe names no family: gone" in capsys.readouterr().err
    page = read_page(out)
    assert before <= page.made <= time.time()
    assert page.refresh is None  # reloads only with --watch

    with open(out / "ci_table.csv", newline="") as f:
        expected = list(csv.DictReader(f))
    shown = {}
    for env in ("HopperHop", "CartpoleBalance"):
        shown.update(page.table(f"env-{env}", "Env"))
    assert set(shown) == {(r["env_id"], r["family"]) for r in expected}
    for r in expected:
        cell = shown[r["env_id"], r["family"]]
        ci = f"[{r['ci_low']}, {r['ci_high']}]" if r["ci_low"] else "—"
        assert (cell["Runs"], cell["Mean"], cell["95% CI"], cell["G1 hits"], cell["G2"], cell["Values"]) == (
            r["runs"], r["mean"] or "—", ci, f"{r['g1_hits']}/{r['runs']}", "yes" if r["g2"] == "1" else "no",
            ", ".join(r["values"].split()) or "—")
    # ... and the numbers themselves, worked by hand (docs/plot_ci.md, "The table")
    cell = shown["HopperHop", "glass_off_1m"]
    assert (cell["Mean"], cell["95% CI"], cell["G1 hits"]) == ("523.9", "[426.3, 621.5]", "4/5")
    assert cell["Description"] == "Glass until 1M <env steps>, then TD-MPC2"  # escaped on the page, read back whole
    assert shown["HopperHop", "short"]["Values"] == "610.0" and shown["HopperHop", "short"]["Description"] == ""

    # Progress of every run, the one that does not count yet included: 1M env steps per 10 s of wall time, so the
    # run stopped at 2M is 2M steps, i.e. 20 s, from --min-steps 4M.
    progress = page.table("env-HopperHop", "Family")
    assert len(progress) == 7
    short = progress["short", "2"]
    assert (short["Last step"], short["Steps/s"], short["Counts"]) == ("2,000,000", "100,000", "not yet")
    assert short["ETA to 4,000,000"].startswith("20 s (")
    assert progress["glass_off_1m", "3"]["ETA to 4,000,000"] == "reached"
    assert progress["glass_off_1m", "3"]["Counts"] == "yes"

    # Self-contained: every picture is a file beside the page, nothing is fetched from elsewhere.
    assert sorted(src.split("?")[0] for src in page.images) == ["curves_CartpoleBalance.png", "curves_HopperHop.png"]
    assert all(not ref.startswith(("http:", "https:", "//")) for ref in page.images + page.links)
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    # The same page through a static HTTP server (what `python -m http.server` serves).
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(out))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(base) as r:  # the folder's index.html
            assert r.read().decode() == (out / "index.html").read_text(encoding="utf-8")
        for src in page.images:
            with urllib.request.urlopen(base + src) as r:
                assert r.headers["Content-Type"] == "image/png" and r.read().startswith(b"\x89PNG")
    finally:
        server.shutdown()
        server.server_close()


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def test_watch_refreshes_and_skips_half_written_rows(live_root, tmp_path):
    """A real `--watch 1` process: new rows show up, a row being written is left out until its newline arrives, a
    refresh that fails is reported and the next one recovers, SIGTERM stops it cleanly."""
    out, log = tmp_path / "out", tmp_path / "stderr.txt"
    eval_csv = next(live_root.glob("HopperHop__glass_off_1m__1__*")) / "eval.csv"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "plot_ci.py"), str(live_root), "--watch", "1", "--out",
                                 str(out)], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        progress = lambda: read_page(out).table("env-HopperHop", "Family")["glass_off_1m", "1"]["Last step"]
        families = lambda: read_page(out).table("env-HopperHop", "Env")["HopperHop", "glass_off_1m"]["Values"]
        wait_for(lambda: (out / "index.html").exists() and progress() == "4,000,000", "the first page")
        assert read_page(out).refresh == "1"
        with open(eval_csv, "a") as f:  # a new row, and most of the next one: its digits so far parse as a row
            f.write("5000000,50.0,700.0,690.0\n6000000,60.0,999.0,1")
        wait_for(lambda: progress() == "5,000,000", "the new row")
        seen = read_page(out).made
        wait_for(lambda: read_page(out).made > seen, "one more refresh")  # read after the writes, certainly
        assert progress() == "5,000,000" and families().startswith("700.0, 595.3")  # not 6M, not 999
        with open(eval_csv, "a") as f:
            f.write("0.0\n")
        wait_for(lambda: progress() == "6,000,000", "the completed row")
        assert families().startswith("999.0, 595.3") and "refresh skipped" not in log.read_text()

        broken = write_run(live_root, "HopperHop", "late", 1, [])
        (broken / "args.json").write_text('{"env_id": "HopperHop", ')  # as if copied in by hand, half done
        wait_for(lambda: "refresh skipped" in log.read_text(), "a skipped refresh")
        assert f"{broken / 'args.json'}:1: not valid JSON" in log.read_text()
        (broken / "args.json").write_text(json.dumps({"env_id": "HopperHop", "exp_name": "late", "seed": 1}))
        wait_for(lambda: ("HopperHop", "late") in read_page(out).table("env-HopperHop", "Env"), "the recovery")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    err = log.read_text()
    assert err.rstrip().endswith("plot_ci.py: stopped watching") and "Traceback" not in err
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_half_written_last_row_is_left_out(tmp_path, capsys):
    run_dir = write_run(tmp_path, "HopperHop", "a", 1, ramp(2_000_000, 100.0))
    eval_csv = run_dir / "eval.csv"
    eval_csv.write_text(eval_csv.read_text() + "3000000,3")  # no newline yet: still being written
    assert plot_ci.read_run(run_dir).last_step == 2_000_000
    eval_csv.write_text("step,wall_ti")  # even the header
    assert plot_ci.read_run(run_dir).last_step is None
    eval_csv.write_text("step,wall_time,return_pi,return_mppi\n0,0,1,2\n1000,1,3\n")  # a complete bad row still fails
    assert f"{eval_csv}:3: expected 4 fields, got 3" in main_err(capsys, tmp_path)


def test_watch_page_waits_for_aggregates(live_root, tmp_path, capsys):
    """Without --watch, too few countable runs for the bootstrap is an error (test_plot_ci); on a live page it is
    a note in the aggregates' place while the tables go on."""
    args = plot_ci.parse_args([str(live_root), "--env-id", "HopperHop", "--aggregate", "--watch", "5", "--out",
                               str(tmp_path)])
    plot_ci.write_outputs(args, {})
    assert "no aggregates yet: family short has 1 countable run(s)" in capsys.readouterr().err
    page = (tmp_path / "index.html").read_text()
    assert "Not computed at this refresh: family short has 1 countable run(s) on HopperHop" in page
    assert not (tmp_path / "aggregate.csv").exists()
    assert table_rows((tmp_path / "ci_table.md").read_text())["HopperHop", "glass_off_1m"]["Mean"] == "523.9"


def test_describe_json_toml_and_errors(live_root, tmp_path, capsys):
    toml = tmp_path / "families.toml"
    toml.write_text('glass_off_1m = "Glass until 1M"\n"short" = " short runs "\n')
    assert plot_ci.read_descriptions(toml) == {"glass_off_1m": "Glass until 1M", "short": "short runs"}
    rows, _ = plot_ci.summarize(plot_ci.load_runs([live_root]))
    bands = plot_ci.env_bands([r for r in rows if r.env_id == "HopperHop"], [], "best-any", 2,
                              plot_ci.read_descriptions(toml))
    assert [b.legend for b in bands] == ["glass_off_1m (n=5): Glass until 1M", "short (n=1): short runs"]
    text = main_ok(capsys, live_root, "--describe", toml, "--out", tmp_path)
    assert table_rows(text)["HopperHop", "glass_off_1m"]["Description"] == "Glass until 1M"

    cases = {"a.json": ('{"a": "x",\n "b": }', "a.json:2: not valid JSON"),
             "b.json": ('["a", "b"]', "expected an object mapping family -> description, got list"),
             "c.json": ('{"a": 3}', "the description of 'a' is not one line of text"),
             "d.json": ('{"a": "one\\ntwo"}', "the description of 'a' is not one line of text"),
             "e.toml": ("a = \n", "e.toml: not valid TOML"),
             "f.toml": ("[a]\nb = 'x'\n", "the description of 'a' is not one line of text"),
             "g.yaml": ("a: x\n", "--describe takes a .json or .toml file")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content)
        assert message in main_err(capsys, live_root, "--describe", tmp_path / name, "--out", tmp_path / "x"), name
    assert "--describe file not found" in main_err(capsys, live_root, "--describe", tmp_path / "nope.json")
    assert not (tmp_path / "x").exists()  # checked before any file is written


def test_official_baseline_is_labelled_dm_control(tmp_path, capsys):
    """An official curve beside Playground runs: a note under the table and a second legend line with the task's
    known differences; a baseline of another name gets neither."""
    assert {p.stem for p in OFFICIAL.glob("*.csv")} == set(plot_ci.OFFICIAL_DMC_DIFFERENCES)  # every shipped task
    root = tmp_path / "runs"
    write_run(root, "WalkerWalk", "tdmpc2", 1, ramp(4_000_000, 900.0))
    out = tmp_path / "out"
    text = main_ok(capsys, root, "--baseline", OFFICIAL / "walker-walk.csv", "--html", "--out", out)
    under_table = text.split("\n\n")[2].rstrip("\n")
    assert under_table.startswith("Baselines from dm_control, not from Playground. The official TD-MPC2 curves were "
                                  "made on the original dm_control suite.") and "docs/envs.md" in under_table
    assert under_table.endswith("- WalkerWalk, baseline walker-walk: no torso-height observation (a torso orientation "
                                "entry instead)")
    assert "Baseline from dm_control, not from Playground.</b> WalkerWalk, baseline walker-walk: no torso-height" in (
        out / "index.html").read_text()
    baselines = plot_ci.assign_baselines([OFFICIAL / "walker-walk.csv"], ["WalkerWalk"])["WalkerWalk"]
    assert plot_ci.env_bands([], baselines, "best-any", 2)[0].legend.split("\n") == [
        "baseline walker-walk (agent steps ×2, n=3)",
        "dm_control, not Playground: no torso-height observation (a torso orientation entry instead)"]

    own = tmp_path / "my_walker.csv"
    shutil.copy(OFFICIAL / "walker-walk.csv", own)
    text = main_ok(capsys, root, "--baseline", own, "--out", out)
    assert "dm_control" not in text
    baselines = plot_ci.assign_baselines([own], ["WalkerWalk"])["WalkerWalk"]
    assert plot_ci.env_bands([], baselines, "best-any", 2)[0].legend == "baseline my_walker (agent steps ×2, n=3)"


@pytest.fixture(scope="module")
def live_demo(tmp_path_factory) -> Path:
    """The page of the docs' dashboard example (docs/plot_ci.md, "The dashboard"), written once for the tests below."""
    root = tmp_path_factory.mktemp("live_demo")
    docs = (REPO / "docs" / "plot_ci.md").read_text()
    assert f"cat > families.toml <<'EOF'\n{LIVE_DEMO_DESCRIPTIONS}EOF\n" in docs  # the docs show this file
    (root / "families.toml").write_text(LIVE_DEMO_DESCRIPTIONS)
    write_live_demo_runs(root / "live_runs")
    args = [root / "live_runs", "--env-id", "HopperHop", "--baseline", OFFICIAL / "hopper-hop.csv", "--describe",
            root / "families.toml", "--html", "--out", root / "dashboard"]
    assert plot_ci.main([str(a) for a in args]) == 0
    return root / "dashboard"


def test_live_demo_progress(live_demo):
    """Speeds, ETAs, ages and the stalled run, worked from LIVE_DEMO_*: seed 3 of tdmpc2_k256 runs at 26 steps/s, so
    in 40 h less 90 s it made 3.74M, evaluated last at 3.6M and needs 0.4M / 26 = 15,385 s more; seed 5 at
    26 * 1.06 = 27.56 steps/s wrote its 3M row at 90 + 3M / 27.56 = 108,943 s, 35,057 s (584.3 min) before the end,
    more than 3 of its evaluation intervals (200k / 27.56 s, 6 h 3 min for 3); seed 1 of glass_off_1m runs at 60 *
    0.94 and finished."""
    progress = read_page(live_demo).table("env-HopperHop", "Family")
    k256 = progress["tdmpc2_k256", "3"]
    assert (k256["Last step"], k256["Steps/s"], k256["Counts"]) == ("3,600,000", "26.0", "not yet")
    assert k256["ETA to 4,000,000"].startswith("4 h 16 min (")
    stopped = progress["tdmpc2_k256", "5"]
    assert stopped["eval.csv written"] in ("9 h 44 min ago", "9 h 45 min ago")  # + the seconds this test took
    assert stopped["ETA to 4,000,000"] == "stalled?"
    assert progress["tdmpc2_k256", "2"]["Counts"] == "yes"  # best-any 537.9 >= G1 before 4M
    glass = progress["glass_off_1m", "1"]
    assert (glass["Last step"], glass["Steps/s"], glass["ETA to 4,000,000"]) == ("8,000,000", "56.4", "reached")


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install chromium)")
def test_page_renders_in_headless_chromium(live_demo, tmp_path):
    """The docs' dashboard example in Chromium, opened as a file: a screenshot of the size asked for, not blank, and
    with glass_off_1m's colour in at least as many pixels as curves_HopperHop.png holds (the swatches in the tables
    add some hundreds more), so the picture was drawn on the page."""
    pytest.importorskip("PIL")
    from PIL import Image

    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'chr'}",
                    f"--screenshot={shot}", "--window-size=1200,1800", "--hide-scrollbars",
                    (live_demo / "index.html").as_uri()], capture_output=True, timeout=120, check=True)
    image = np.asarray(Image.open(shot).convert("RGB"))
    assert image.shape == (1800, 1200, 3)
    rgb = (image[..., 0].astype(np.int32) << 16) | (image[..., 1].astype(np.int32) << 8) | image[..., 2]
    assert np.unique(rgb).size > 500 and image.std() > 20  # text and pictures, not blank
    colour = np.array(to_rgb(plot_ci.family_color("glass_off_1m"))) * 255
    count = lambda pixels: int(np.all(np.abs(pixels.astype(float) - colour) <= 2, axis=-1).sum())
    in_png = count(np.asarray(Image.open(live_demo / "curves_HopperHop.png").convert("RGB")))
    assert in_png > 500 and count(image) >= in_png, (count(image), in_png)
