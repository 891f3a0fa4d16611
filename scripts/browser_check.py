"""The notebooks in a real JupyterLab, in a real (headless) Chromium: `make browser-check`.

1. trains a short `smoke` run into a temporary runs root ($ADAPTERLIB_RUNS, inherited by the kernels);
2. starts JupyterLab from this environment on 127.0.0.1 with a token, on a temporary copy of the
   notebooks (so neither autosave nor a run touches notebooks/);
3. notebook 05: opens unmodified, runs to the slider, moves the scale handle with the mouse and picks
   another layout; each time the status line shows it is rendering, the image changes, and it is
   `GateSlider.render(scale, layout, seed, tau)` for the values the browser shows, at its own pixel size.
   What the slider shows (its layouts, seeds, sampling settings and checkpoint) is read from the notebook's
   kernel (the one GateSlider in its namespace), never restated here; this process renders the same values
   on its own copy of that checkpoint to compare, and checks the layouts are the run's (`run_layouts`);
4. notebook 02: opens unmodified, its parameters cell (the cell tagged `parameters`) set to a short smoke
   run as a user would type it (a field's line is replaced, or added when the cell has none), runs; the
   progress bar and the live plot (the output of the cell that calls `LivePlot(`) update while it trains,
   the run has the fields typed, and the last plot is the final state (`LivePlot.png`);
5. screenshots to docs/browser_05_slider.png and docs/browser_02_live_plot.png.

What it assumes of the notebooks (keep these true, or change this script with them):
- 05 runs top to bottom with its default parameters on a short smoke run (`run_name` "" picks the only run)
  and leaves exactly one `adapterlib.notebook.slider.GateSlider` in its namespace, displayed (an ipywidgets image,
  scale and tau sliders, a layout dropdown, a seed box); it shows at least 3 layouts, the run's own;
- 02 has a code cell tagged `parameters` in which a line `name = value` sets a TrainConfig field (fields not
  listed there may be added as such lines), a cell whose source contains `LivePlot(` (the live plot, an image
  output) and a progress bar (an ipywidgets progress widget with a text label) while `train` runs.

Every process it starts is stopped; any failure exits non-zero with a message.
Needs /usr/bin/chromium and /usr/bin/chromedriver (Debian: chromium chromium-driver) and selenium.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PY = sys.executable
RUN = "browser-smoke"          # the run notebook 05 picks (the only one in the temporary runs root)
LIVE_RUN = "browser-live"      # the run notebook 02 trains in the browser
LIVE_PARAMS = {"preset": '"smoke"', "run_name": f'"{LIVE_RUN}"', "steps": "60", "log_every": "5",
               "save_every": "30", "n_samples": "2"}


class CheckFailed(Exception):
    pass


T0 = time.monotonic()
# the longest waits (a whole notebook, a training run): generous, for a loaded machine (2 shared cores ran
# notebook 05 in about 15 minutes with 6 other jobs; about 1-2 minutes alone)
NOTEBOOK_05_S, NOTEBOOK_02_S, RENDER_S = 1800, 900, 180


def say(text: str) -> None:
    print(f"[browser-check {time.monotonic() - T0:5.0f} s] {text}", flush=True)


def check(condition, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    say(f"ok: {message}")


def wait_for(what: str, predicate, timeout: float, every: float = 0.25):
    """Poll `predicate` until it returns something truthy (returned), or fail naming `what`."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# the processes: JupyterLab and the browser

def start_lab(root: Path, env: dict, log: Path) -> tuple[subprocess.Popen, str]:
    port, token = free_port(), secrets.token_hex(16)
    labconfig = Path(env["JUPYTER_CONFIG_DIR"]) / "labconfig"       # no "official Jupyter news?" toast
    labconfig.mkdir(parents=True, exist_ok=True)
    (labconfig / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    cmd = [PY, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.expose_app_in_browser=True",            # window.jupyterapp: run commands, read the models
           "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def up():
        if proc.poll() is not None:
            raise CheckFailed(f"JupyterLab exited ({proc.returncode}); its log: {log}\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False
    wait_for("JupyterLab to answer", up, 300, 0.5)
    say(f"JupyterLab {url} (pid {proc.pid}, log {log})")
    return proc, f"{url}/lab/tree/{{}}?token={token}"


def stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)        # its own session: the server and its kernels
        proc.wait(15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    say(f"stopped {name} (pid {proc.pid})")


def start_browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000",
                "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_script_timeout(120)
    driver.command_executor.client_config.timeout = 600     # a page busy on a loaded machine answers late (default 120 s)
    return driver


# ---------------------------------------------------------------------------------------------
# JupyterLab through the page: window.jupyterapp (exposed by --LabApp.expose_app_in_browser)

PANEL = "const app = window.jupyterapp; const panel = app && app.shell.currentWidget;"


def js(driver, body: str, *args):
    return driver.execute_script(PANEL + body, *args)


def open_notebook(driver, url_of: str, path: str) -> None:
    driver.get(url_of.format(path))
    wait_for(f"{path} to open with a kernel", lambda: js(driver, """
        return !!(panel && panel.context && panel.context.path.endsWith(arguments[0]) && panel.sessionContext
                  && panel.sessionContext.session && panel.sessionContext.session.kernel
                  && panel.sessionContext.session.kernel.status === 'idle'
                  && panel.content.widgets.length > 0);""", path), 300, 0.5)
    time.sleep(3)                        # what JupyterLab does after the kernel is up (language_info, ...)


def dirty_report(driver) -> str | None:
    """None when the open notebook is unmodified (the tab has no dirty mark), else what differs
    between the model and the file on disk."""
    dirty = js(driver, "return panel.context.model.dirty;")
    tab = driver.find_elements("css selector", ".lm-TabBar-tab.lm-mod-current.jp-mod-dirty")
    if not dirty and not tab:
        return None
    model = json.loads(js(driver, "return JSON.stringify(panel.context.model.toJSON());"))
    return (f"model dirty={dirty}, tab marked={bool(tab)}; in the model: nbformat {model['nbformat']}."
            f"{model['nbformat_minor']}, metadata {model['metadata']}")


def run_all(driver) -> None:
    js(driver, "app.commands.execute('notebook:run-all-cells'); return true;")   # not awaited


def kernel_idle(driver) -> bool:
    return js(driver, """
        const busy = panel.sessionContext.session.kernel.status !== 'idle';
        const pending = panel.content.widgets.some(c => c.model.type === 'code'
            && (c.promptNode && c.promptNode.textContent.includes('*')));
        return !busy && !pending;""")


def cell_errors(driver) -> list[str]:
    """The error outputs of the open notebook ("ename: evalue")."""
    return js(driver, """
        return panel.content.widgets.filter(c => c.model.type === 'code')
            .flatMap(c => c.model.outputs.toJSON()).filter(o => o.output_type === 'error')
            .map(o => o.ename + ': ' + o.evalue);""")


def kernel_value(driver, expression: str):
    """The value of a Python expression in the open notebook's kernel (a literal: dict, list, str, number),
    evaluated silently (`user_expressions`): no cell, output or execution count of the notebook changes."""
    import ast
    reply = driver.execute_async_script(PANEL + """
        const done = arguments[arguments.length - 1];
        const future = panel.sessionContext.session.kernel.requestExecute(
            {code: '', silent: true, store_history: false, user_expressions: {value: arguments[0]}});
        future.done.then(r => done(JSON.stringify(r.content.user_expressions.value)))
                   .catch(e => done(JSON.stringify({status: 'error', ename: 'browser', evalue: String(e)})));""",
                                        expression)
    value = json.loads(reply)
    if value.get("status") != "ok":
        raise CheckFailed(f"the kernel could not evaluate {expression[:80]}...: {value.get('ename')}: {value.get('evalue')}")
    return ast.literal_eval(value["data"]["text/plain"])


# what notebook 05's slider shows, from its kernel: the one GateSlider in the namespace (whatever its name;
# IPython's output history `_`, `_25`, ... holds the same object again),
# pickled (layouts and sampling settings), and the checkpoint(s) in the namespace whose adapter it drives
SLIDER_IN_KERNEL = """(lambda g: (lambda found: {'count': len(found)} if len(found) != 1 else (lambda s: {
    'count': 1,
    'pickle': __import__('base64').b64encode(__import__('pickle').dumps(dict(
        layouts=s.layouts, steps=s.steps, guidance=s.guidance, upscale=s.upscale))).decode(),
    'checkpoints': sorted({(str(v.run_dir), int(v.step)) for v in list(g.values())
                           if getattr(v, 'adapter', None) is s.adapter and hasattr(v, 'run_dir')})})(found[0]))(
    list({id(v): v for v in list(g.values()) if type(v).__name__ == 'GateSlider'
          and type(v).__module__ == 'adapterlib.notebook.slider'}.values())))(globals())"""


def shown_slider(driver):
    """What notebook 05's slider shows: (layouts, render settings, run folder, checkpoint step)."""
    import pickle
    found = kernel_value(driver, SLIDER_IN_KERNEL)
    check(found["count"] == 1, f"notebook 05 holds one GateSlider ({found['count']} found in its namespace)")
    check(len(found["checkpoints"]) == 1,
          f"the slider's adapter is that of one loaded checkpoint ({found['checkpoints']})")
    shown = pickle.loads(base64.b64decode(found["pickle"]))
    run_dir, step = found["checkpoints"][0]
    return shown.pop("layouts"), shown, Path(run_dir), step


# ---------------------------------------------------------------------------------------------
# notebook 05: the slider

def slider_state(driver) -> dict | None:
    """What the browser shows of the slider: the values of its controls, its status line and image."""
    return js(driver, """
        const img = panel.node.querySelector('.widget-image');
        if (!img) return null;
        const box = img.closest('.widget-vbox');
        const sliders = {};
        box.querySelectorAll('.widget-slider').forEach(s => {
            sliders[s.querySelector('.widget-label').textContent.trim()] = s.querySelector('.widget-readout').textContent.trim();
        });
        const seed = box.querySelector('.widget-text input');
        const select = box.querySelector('.widget-dropdown select');
        const labels = Array.from(box.querySelectorAll(':scope > .widget-label')).map(n => n.textContent);
        const r = img.getBoundingClientRect();
        return {scale: sliders.scale, tau: sliders.tau, seed: seed && seed.value,
                layout: select && select.selectedIndex, status: labels.join(' '), src: img.src,
                width: r.width, height: r.height, natural: [img.naturalWidth, img.naturalHeight],
                cell_width: panel.content.node.getBoundingClientRect().width, bottom: r.bottom,
                window: window.innerHeight};""")


def image_bytes(driver, src: str) -> bytes:
    data = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(b => {
            let s = ''; const a = new Uint8Array(b);
            for (let i = 0; i < a.length; i++) s += String.fromCharCode(a[i]);
            done(btoa(s));
        }).catch(e => done('ERROR ' + e));""", src)
    if data.startswith("ERROR"):
        raise CheckFailed(f"could not read the slider image ({data})")
    return base64.b64decode(data)


def pixels(png: bytes):
    import numpy as np
    from PIL import Image
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def same_image(shown: bytes, expected: bytes) -> tuple[bool, str]:
    a, b = pixels(shown), pixels(expected)
    if a.shape != b.shape:
        return False, f"sizes differ: {a.shape} shown, {b.shape} expected"
    diff = abs(a - b)
    # the same computation in another process: equal up to float rounding of a few pixels at most
    return float(diff.mean()) < 0.5 and float((diff > 8).mean()) < 0.002, \
        f"mean |diff| {diff.mean():.4f}, max {diff.max()}, share of pixels off by >8: {(diff > 8).mean():.5f}"


def watch_change(driver, before_src: str, timeout: float) -> tuple[dict, bool]:
    """Wait for a new image; whether the status line showed the busy sign meanwhile."""
    busy_seen, end = False, time.monotonic() + timeout
    while time.monotonic() < end:
        state = slider_state(driver)
        busy_seen |= "rendering" in state["status"]
        if state["src"] != before_src and "rendering" not in state["status"]:
            return state, busy_seen
        time.sleep(0.05)
    raise CheckFailed(f"the slider image did not change within {timeout:.0f} s")


def slider_reference(driver, runs_root: Path):
    """render(state) -> PNG bytes: what the slider should show for the browser's values, computed in this
    process from what the notebook's slider holds (its layouts, settings and checkpoint)."""
    from adapterlib.training.checkpoint import load_checkpoint
    from adapterlib.data.manifest import png_bytes
    from adapterlib.evaluation.evaluate import run_layouts
    from adapterlib.notebook.slider import GateSlider

    layouts, settings, run_dir, step = shown_slider(driver)
    check(run_dir == runs_root / RUN, f"notebook 05 loaded the run {RUN!r} (it loaded {run_dir}), step {step}")
    own = run_layouts(run_dir, len(layouts))
    same = [r.to_json() for r in layouts.records] == [r.to_json() for r in own.records] and layouts.seeds == own.seeds
    check(same, f"the slider shows the run's own layouts ({len(layouts)} of {own.source}: "
                f"{[r.caption for r in layouts.records[:3]]} ...; the run's: {[r.caption for r in own.records[:3]]} ...)")
    check(len(layouts) >= 3, f"the slider offers at least 3 layouts ({len(layouts)})")
    ck = load_checkpoint(run_dir, step)
    reference = GateSlider(ck.base, ck.adapter, layouts, **settings)
    say(f"reference: {ck.name}, {len(layouts)} layouts of {layouts.source}, {settings}")

    def render(state):
        return png_bytes(reference.render(scale=float(state["scale"]), layout=int(state["layout"]),
                                          seed=int(state["seed"]), tau=float(state["tau"])))
    render.seeds = layouts.seeds
    return render


def check_slider(driver, url_of: str, runs_root: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    nb = "notebooks/05_gate_effect_grid.ipynb"
    open_notebook(driver, url_of, nb)
    report = dirty_report(driver)
    check(report is None, f"{nb} opens unmodified" + (f" (it is modified: {report})" if report else ""))
    say("running notebook 05 (the grid, the curves, then the slider) ...")
    run_all(driver)
    wait_for("notebook 05 to run to the end", lambda: kernel_idle(driver) and slider_state(driver), NOTEBOOK_05_S, 1)
    errors = cell_errors(driver)
    check(not errors, "notebook 05 ran without errors" + (f": {errors}" if errors else ""))
    expected_render = slider_reference(driver, runs_root)
    state = wait_for("the slider's first image", lambda: (s := slider_state(driver)) and s["src"] and s, RENDER_S)
    check(state["natural"][0] > 0 and abs(state["width"] - state["natural"][0]) <= 1,
          f"the slider image is shown at its own size ({state['width']:.0f} px for {state['natural'][0]} px, "
          f"cell {state['cell_width']:.0f} px wide)")
    check(same_image(image_bytes(driver, state["src"]), expected_render(state))[0],
          f"the first image is render{values(state)}")

    # move the scale: drag the handle with the mouse
    handle = driver.find_element("css selector", ".widget-image")
    handle = handle.find_element("xpath", "ancestor::div[contains(@class,'widget-vbox')][1]") \
        .find_elements("css selector", ".widget-slider")[0].find_element("css selector", ".noUi-handle")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", handle)
    before = state
    ActionChains(driver).click_and_hold(handle).move_by_offset(-25, 0).pause(0.2).release().perform()
    state, busy = watch_change(driver, before["src"], RENDER_S)
    check(state["scale"] != before["scale"], f"dragging the handle moved the scale ({before['scale']} -> {state['scale']})")
    check(busy, "the status line said 'rendering ...' while the new image was computed")
    ok, detail = same_image(image_bytes(driver, state["src"]), expected_render(state))
    check(ok, f"the new image is render{values(state)} ({detail})")
    shot(driver, "browser_05_slider.png")

    # pick another layout: the seed follows (the layout's evaluation seed), the image changes
    before = state
    select = driver.find_element("css selector", ".widget-image").find_element(
        "xpath", "ancestor::div[contains(@class,'widget-vbox')][1]").find_element("css selector", ".widget-dropdown select")
    Select(select).select_by_index(2)
    state, busy = watch_change(driver, before["src"], RENDER_S)
    check(state["layout"] == 2 and state["seed"] == str(expected_render.seeds[2]),
          f"layout 2 picked, seed {state['seed']} (its evaluation seed {expected_render.seeds[2]})")
    ok, detail = same_image(image_bytes(driver, state["src"]), expected_render(state))
    check(ok, f"the new image is render{values(state)} ({detail})")
    check(state["bottom"] <= state["window"], "the controls and the image fit on one screen (1600x1000 window)")
    js(driver, "panel.sessionContext.shutdown(); return true;")


def values(state) -> str:
    return f"(scale={state['scale']}, layout={state['layout']}, seed={state['seed']}, tau={state['tau']})"


# ---------------------------------------------------------------------------------------------
# notebook 02: the progress bar and the live plot

def live_state(driver) -> dict:
    return js(driver, """
        const bar = panel.node.querySelector('.widget-hprogress progress, .widget-hprogress');
        const html = Array.from(panel.node.querySelectorAll('.widget-html-content')).map(n => n.textContent);
        const imgs = Array.from(panel.node.querySelectorAll('.jp-OutputArea-output img'));
        const cell = panel.content.widgets.find(c => c.model.sharedModel.getSource().includes('LivePlot('));
        const plot = cell && cell.node.querySelector('.jp-OutputArea-output img');
        return {bar: html.join(' | '), plot: plot ? plot.src : null};""")


def check_live_plot(driver, url_of: str, runs_root: Path) -> None:
    nb = "notebooks/02_train.ipynb"
    open_notebook(driver, url_of, nb)
    report = dirty_report(driver)
    check(report is None, f"{nb} opens unmodified" + (f" (it is modified: {report})" if report else ""))
    # the parameters cell (tagged `parameters`): a short smoke run, typed as a user would: a field's line
    # `name = ...` gets the value; a field the cell does not list is added as a line of its own
    source = js(driver, """
        const cell = panel.content.widgets.find(c => c.model.type === 'code'
            && ((c.model.getMetadata && c.model.getMetadata('tags')) || c.model.metadata.tags || []).includes('parameters'));
        if (!cell) return null;
        let src = cell.model.sharedModel.getSource();
        for (const [name, value] of Object.entries(arguments[0])) {
            const line = new RegExp('^' + name + '([ \\t]*)=[^#\\n]*', 'm');
            src = line.test(src) ? src.replace(line, name + '$1= ' + value + ' ')
                                 : src.replace(/\\n*$/, '\\n') + name + ' = ' + value + '\\n';
        }
        cell.model.sharedModel.setSource(src);
        return cell.model.sharedModel.getSource();""", LIVE_PARAMS)
    check(source is not None, f"{nb} has a code cell tagged 'parameters'")
    import re
    missing = [n for n, v in LIVE_PARAMS.items() if not re.search(rf"^{n}[ \t]*= {re.escape(v)}(?=[ \t#]|$)", source, re.M)]
    check(not missing, f"the parameters cell now sets {LIVE_PARAMS}" + (f" (not set: {missing})" if missing else ""))
    run_all(driver)
    bars, plots, t0 = [], [], time.monotonic()
    while not kernel_idle(driver) or time.monotonic() - t0 < 5:
        s = live_state(driver)
        if s["bar"] and (not bars or bars[-1] != s["bar"]):
            bars.append(s["bar"])
        if s["plot"] and (not plots or plots[-1] != s["plot"]):
            plots.append(s["plot"])
            if len(plots) == 2:
                shot(driver, "browser_02_live_plot.png", scroll_to="LivePlot(")
        if time.monotonic() - t0 > NOTEBOOK_02_S:
            raise CheckFailed(f"notebook 02 did not finish its short run in {NOTEBOOK_02_S} s")
        time.sleep(0.2)
    errors = cell_errors(driver)
    check(not errors, "notebook 02 ran without errors" + (f": {errors}" if errors else ""))
    config = json.loads((runs_root / LIVE_RUN / "config.json").read_text())
    wrong = {n: config.get(n) for n, v in LIVE_PARAMS.items() if json.loads(v) != config.get(n)}
    check(not wrong, f"the run {LIVE_RUN!r} has the fields typed into the parameters cell" + (f" (it has {wrong})" if wrong else ""))
    say(f"progress bar states seen: {len(bars)}, first {bars[:1]}, last {bars[-1:]}")
    check(len(bars) >= 3, f"the progress bar updated while it trained ({len(bars)} states seen)")
    check(len(plots) >= 2, f"the live plot updated while it trained ({len(plots)} images seen)")
    from adapterlib.notebook.monitor import LivePlot
    final = LivePlot().png(runs_root / LIVE_RUN)
    shown = base64.b64decode(plots[-1].split(",", 1)[1])
    ok, detail = same_image(shown, final)
    check(ok, f"the last live plot is the run's final state, step {LIVE_PARAMS['steps']} ({detail})")
    js(driver, "panel.sessionContext.shutdown(); return true;")


def shot(driver, name: str, scroll_to: str | None = None) -> None:
    if scroll_to:
        js(driver, """
            const cell = panel.content.widgets.find(c => c.model.sharedModel.getSource().includes(arguments[0]));
            if (cell) cell.node.scrollIntoView({block: 'start'});""", scroll_to)
    DOCS.mkdir(exist_ok=True)
    driver.save_screenshot(str(DOCS / name))
    say(f"screenshot docs/{name}")


# ---------------------------------------------------------------------------------------------

def main() -> int:
    start = time.monotonic()
    for tool in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(tool).exists():
            print(f"browser-check: {tool} is missing (apt-get install chromium chromium-driver)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="adapterlib-browser-"))
    runs_root, lab_root = tmp / "runs", tmp / "lab"
    (lab_root / "notebooks").mkdir(parents=True)
    for nb in ("02_train.ipynb", "05_gate_effect_grid.ipynb"):
        shutil.copy2(REPO / "notebooks" / nb, lab_root / "notebooks" / nb)
    env = {**os.environ, "ADAPTERLIB_RUNS": str(runs_root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "JUPYTER_CONFIG_DIR": str(tmp / "jupyter-config"), "JUPYTER_RUNTIME_DIR": str(tmp / "jupyter-runtime")}
    env.pop("ADAPTERLIB_DEFAULT_PRESET", None)
    os.environ.update(ADAPTERLIB_RUNS=str(runs_root), OMP_NUM_THREADS=env["OMP_NUM_THREADS"])
    lab = driver = None
    try:
        say(f"training the short run {RUN!r} in {runs_root} ...")
        subprocess.run([PY, "-m", "adapterlib", "train", "--preset", "smoke", "--run_name", RUN], env=env,
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        lab, url_of = start_lab(lab_root, env, tmp / "jupyterlab.log")
        driver = start_browser()
        say(f"browser: {driver.capabilities.get('browserName')} {driver.capabilities.get('browserVersion')}")
        check_slider(driver, url_of, runs_root)
        check_live_plot(driver, url_of, runs_root)
    except subprocess.CalledProcessError as error:
        print(f"browser-check FAILED: {error.cmd} exited {error.returncode}\n{error.stderr[-2000:]}", file=sys.stderr)
        return 1
    except Exception as error:          # a failed check, or the browser/JupyterLab misbehaving
        print(f"browser-check FAILED: {error if isinstance(error, CheckFailed) else repr(error)[:1500]}",
              file=sys.stderr)
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.save_screenshot(str(tmp / "failure.png"))
                print(f"  screenshot of the page: {tmp / 'failure.png'}; JupyterLab log: {tmp / 'jupyterlab.log'}",
                      file=sys.stderr)
        return 1
    finally:
        if driver is not None:
            with contextlib.suppress(Exception):
                driver.quit()
            say("stopped the browser")
        stop(lab, "JupyterLab and its kernels")
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"PASS in {time.monotonic() - start:.0f} s; screenshots in docs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
