"""The web UI's Cancel (the device stops within a step), textual inversions, per-stage progress and the prompter,
through its API (gradio_client) against a server started in this process on the SDXL-Turbo twin."""

import threading

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file

from synth import step_hooks

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client  # noqa: E402
from test_textual_inversion import CLIP_G, CLIP_L, vectors  # noqa: E402
from conftest import free_port  # noqa: E402
from test_ui import NO_LORAS, pixels  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    from synth.ui import start

    run_dir = tmp_path_factory.mktemp("ui-run")
    embeddings = tmp_path_factory.mktemp("embeddings")  # an SDXL embedding, as tests/test_textual_inversion.py makes
    save_file({"clip_l": vectors(2, CLIP_L, 4), "clip_g": vectors(2, CLIP_G, 5)}, embeddings / "xlstyle.safetensors")
    demo, generator, url = start(["model=tiny_sdxl_turbo", f"ui.embeddings_dir={embeddings}"], run_dir, free_port())
    yield generator, url
    demo.close()


@pytest.fixture
def client(server):
    return Client(server[1], verbose=False)  # a client is one session (tab) of its own


def submit(client, seed=0, steps=2, size="", prompt="a house", prompter="none", embeddings=()):
    return client.submit(prompt, "", seed, steps, 0.5, None, "tiny_sdxl_turbo", "default", prompter, size, None, 1,
                         NO_LORAS, list(embeddings), api_name="/generate")


class HeldSteps:
    """Replaces step_hooks.on_step: records every step and holds the render after the step `hold_at` matches,
    until release() (so a test acts while the render is known to be at that step, without sleeps)."""

    def __init__(self, monkeypatch, hold_at, reported=False):
        self.calls, self.hold_at = [], hold_at
        self.reached, self.released = threading.Event(), threading.Event()
        real = step_hooks.on_step

        def on_step(where, step, total):
            self.calls.append((where, step + 1, total))
            if reported:  # hold after the step's progress went out (else before: a Cancel is seen at this step)
                real(where, step, total)
            if self.hold_at(where, step) and not self.released.is_set():
                self.reached.set()
                assert self.released.wait(60), "the test never released the render"
            if not reported:
                real(where, step, total)

        monkeypatch.setattr(step_hooks, "on_step", on_step)

    def release(self):
        self.released.set()


def finished(generator):
    """Wait until the device is free: the render thread holds generator.lock for the whole infer call."""
    assert generator.lock.acquire(timeout=60), "the render did not end"
    generator.lock.release()


def test_cancel_stops_the_render_within_a_step(server, client, monkeypatch):
    generator, _ = server
    before = set(generator.run_dir.rglob("*.png"))
    held = HeldSteps(monkeypatch, lambda where, step: step == 0)
    job = submit(client, seed=7, steps=40)
    assert held.reached.wait(60), "the first step never ran"
    client.predict(api_name="/cancel")  # same client = same tab: sets that tab's cancel event
    held.release()
    finished(generator)
    assert [step for _, step, _ in held.calls] == [1], "the render stopped right after the step it was running"
    assert held.calls[0][2] == 40
    assert set(generator.run_dir.rglob("*.png")) == before, "no PNG for a cancelled image"
    try:
        outcome = job.result(timeout=30)  # the render's answer to Cancel: no image (the page keeps its last one)
    except Exception:
        outcome = None  # or Gradio dropped the job
    assert not outcome or not any(isinstance(value, str) and value.endswith(".png") for value in outcome), outcome
    monkeypatch.undo()
    image, parameters = submit(client, seed=7, steps=2).result(timeout=60)
    assert Image.open(image).size == (64, 64) and "Steps: 2" in parameters, "the next request runs normally"


def test_cancel_of_one_tab_leaves_the_others_alone(server, monkeypatch):
    generator, url = server
    first, second = Client(url, verbose=False), Client(url, verbose=False)
    held = HeldSteps(monkeypatch, lambda where, step: step == 0)
    job = submit(first, seed=8, steps=3)
    assert held.reached.wait(60)
    second.predict(api_name="/cancel")  # the other tab's Cancel: nothing of its own runs
    held.release()
    image, _ = job.result(timeout=60)
    assert [step for _, step, _ in held.calls] == [1, 2, 3]
    assert pixels(image).shape == (64, 64, 3)


def test_cancel_is_a_no_op_outside_an_observer():
    step_hooks.on_step("sampling", 0, 2)  # infer.py's CLI: nothing observes, nothing raises
    step_hooks.check_cancelled()
    cancel = threading.Event()
    cancel.set()
    with step_hooks.observe(cancel), pytest.raises(step_hooks.Cancelled, match="step 3"):
        step_hooks.on_step("stage 1/2: 64x64", 2, 4)
    step_hooks.on_step("sampling", 0, 2)  # the observer is gone again


def test_textual_inversions_from_the_folder(server, client):
    prompt = "a house, xlstyle"
    plain, _ = submit(client, seed=2, prompt=prompt).result(timeout=60)
    styled, parameters = submit(client, seed=2, prompt=prompt, embeddings=["xlstyle.safetensors"]).result(timeout=60)
    assert "xlstyle" in parameters.partition("TI hashes:")[2], parameters
    assert np.abs(pixels(styled) - pixels(plain)).mean() > 0.5, "the keyword is the embedding's vectors now"
    with pytest.raises(Exception, match="xlstyle|embeddings_dir|not in"):
        submit(client, embeddings=["../../elsewhere.safetensors"]).result(timeout=60)


def test_progress_names_each_high_res_stage(server, client, monkeypatch):
    held = HeldSteps(monkeypatch, lambda where, step: where.startswith("stage 2/2") and step == 0, reported=True)
    job = submit(client, seed=3, steps=2, size="128")  # 64 native: the chain is 64x64, then 128x128
    assert held.reached.wait(60), "stage 2 never ran"
    shown = None
    for _ in range(600):  # the page hears the held step's progress (Gradio sends the latest one periodically)
        units = job.status().progress_data or []
        shown = [(unit.desc, unit.index, unit.length) for unit in units]
        if ("stage 2/2: 128x128", 1, held.calls[-1][2]) in shown:
            break
        held.released.wait(0.05)  # not a timing assumption: it polls for an update that must come
    held.release()
    image, parameters = job.result(timeout=60)
    assert ("stage 2/2: 128x128", 1, held.calls[-1][2]) in shown, shown
    labels = [where for where, _, _ in held.calls]
    assert labels[0] == "stage 1/2: 64x64" and labels[-1] == "stage 2/2: 128x128"
    assert labels == sorted(labels), "stage 1's steps, then stage 2's"
    assert Image.open(image).size == (128, 128)


def test_the_prompter_dropdown_changes_the_prompt(server, client):
    job = submit(client, seed=5, prompt="一只猫坐在窗台上", prompter="tiny_translate")
    translated, parameters = job.result(timeout=120)
    assert parameters.startswith("a cat sitting on a windowsill\n"), parameters  # the twin's learned translation
    typed, _ = submit(client, seed=5, prompt="a cat sitting on a windowsill").result(timeout=60)
    assert np.array_equal(pixels(translated), pixels(typed)), "the image is the translated prompt's"
    untranslated, _ = submit(client, seed=5, prompt="一只猫坐在窗台上").result(timeout=60)
    assert not np.array_equal(pixels(untranslated), pixels(typed))
