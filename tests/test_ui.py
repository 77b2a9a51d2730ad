"""The web UI through its API (gradio_client) against a server started in this process on the SDXL-Turbo twin."""

import struct
import zlib

import numpy as np
import pytest
from conftest import ROOT, compose_infer, free_port, run_cli
from PIL import Image

from synth import pipelines
from synth.images import CONFIG_KEY, PARAMETERS_KEY, read_config, read_text

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402


@pytest.fixture(scope="module")
def server(tmp_path_factory, one_thread):
    from synth.ui import start

    from test_lora_infer import make_lora

    run_dir = tmp_path_factory.mktemp("ui-run")
    lora_dir = tmp_path_factory.mktemp("loras")
    make_lora("sdxl", lora_dir / "style.safetensors")
    demo, generator, url = start(["model=tiny_sdxl_turbo", "ui.max_upload_mb=1", f"ui.lora_dir={lora_dir}"], run_dir,
                                 free_port())
    yield generator, url
    demo.close()


@pytest.fixture
def client(server):
    return Client(server[1], verbose=False)  # a client is one session (tab) of its own


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def live(client, prompt="a red car", sketch=None, seed=1, steps=2, strength=0.5, **kwargs):
    return client.predict(prompt, "", seed, steps, strength, sketch, True, api_name="/live", **kwargs)


def sketch_of(path):
    return {"background": handle_file(str(path)), "layers": [], "composite": handle_file(str(path))}


def written(generator, shown):
    """The run-folder PNG behind an image the page shows (Gradio serves a copy from its cache in the run folder)."""
    [path] = [p for p in generator.run_dir.glob("[0-9]*/*.png") if np.array_equal(pixels(p), pixels(shown))][-1:]
    return path


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    """Two sketches: a red disc and a blue bar on white."""
    folder = tmp_path_factory.mktemp("sketches")
    yy, xx = np.mgrid[:64, :64]
    red = np.full((64, 64, 3), 255, np.uint8)
    red[(yy - 32) ** 2 + (xx - 32) ** 2 < 300] = (220, 20, 20)
    blue = np.full((64, 64, 3), 255, np.uint8)
    blue[20:44, 8:56] = (20, 20, 220)
    Image.fromarray(red).save(folder / "red.png")
    Image.fromarray(blue).save(folder / "blue.png")
    return folder / "red.png", folder / "blue.png"


def test_text_to_image(server, client):
    generator, _ = server
    image, parameters = live(client, "a red car", seed=3)
    path = written(generator, image)
    assert path.parent.parent == generator.run_dir and path.name == "000-seed3.png", "infer.py's names, a folder a request"
    assert Image.open(image).size == (64, 64) and pixels(image).std() > 1
    text = read_text(path)
    assert CONFIG_KEY in text
    assert text[PARAMETERS_KEY].startswith("a red car\n") and "Seed: 3" in text[PARAMETERS_KEY]
    assert parameters == text[PARAMETERS_KEY]
    cfg = read_config(path)
    assert cfg.prompt == "a red car" and cfg.seed == 3 and cfg.init_image is None and "ui" not in cfg
    [(shown, caption)] = [(item["image"], item["caption"]) for item in client.predict(api_name="/gallery")]
    assert np.array_equal(pixels(shown), pixels(path)) and caption == parameters, "the tab's gallery"


def test_sketch_to_image_and_replay(server, client, drawn, tmp_path):
    generator, _ = server
    red, blue = drawn
    image_red, *_ = live(client, "a ball", sketch_of(red))
    image_blue, *_ = live(client, "a ball", sketch_of(blue))
    assert np.abs(pixels(image_red) - pixels(image_blue)).mean() > 0.3, "the sketch shapes the image (a random twin: faintly)"
    path = written(generator, image_red)
    cfg = read_config(path)
    assert cfg.init_image is not None and cfg.init_image.startswith(str(generator.run_dir / "inputs"))
    assert np.array_equal(pixels(cfg.init_image), pixels(red)), "the sketch, as drawn, is the init image"

    # infer.py replay=<png> init_image=<its sketch>, as its main() runs it (replay takes no paths from a PNG): the
    # same pixels
    from synth.infer import infer
    from synth.replay import replay_config

    overrides = [f"replay={path}", f"init_image={cfg.init_image}"]
    [again] = infer(replay_config(compose_infer(overrides, output_dir=tmp_path), overrides))
    assert np.array_equal(pixels(again), pixels(path))


def test_rapid_requests_collapse_to_the_latest(server, client):
    generator, _ = server
    before = set(generator.run_dir.glob("[0-9]*"))
    claimed = generator.claimed
    with generator.lock:  # the device is busy: the requests below arrive while one runs
        jobs = []
        for seed in range(10, 14):
            jobs.append(client.submit("a red car", "", seed, 2, 0.5, None, True, api_name="/live"))
            while generator.claimed < claimed + len(jobs):  # until the server has it: edits arrive in order
                jobs[-1].status()
    results = [job.result(timeout=60) for job in jobs]
    made = set(generator.run_dir.glob("[0-9]*")) - before
    assert len(made) == 1, "one render for four edits: no backlog"
    assert [p.name for p in next(iter(made)).glob("*.png")] == ["000-seed13.png"], "the newest one"
    assert "Seed: 13" in results[-1][1]


def test_tabs_keep_their_own_gallery(server):
    a, b = Client(server[1], verbose=False), Client(server[1], verbose=False)
    live(a, "one")
    live(a, "two")
    live(b, "three")
    gallery_a, gallery_b = a.predict(api_name="/gallery"), b.predict(api_name="/gallery")
    assert [item["caption"].split("\n")[0] for item in gallery_a] == ["one", "two"]
    assert [item["caption"].split("\n")[0] for item in gallery_b] == ["three"]


NO_LORAS = {"headers": ["LoRA", "scale"], "data": [], "metadata": None}


def full(client, model="tiny_sdxl_turbo", seed=0, steps=2, size="", guidance=None, num_images=1, prompt="a house",
         scheduler="default", loras=NO_LORAS):
    return client.predict(prompt, "", seed, steps, 0.5, None, model, scheduler, "none", size, guidance, num_images,
                          loras, api_name="/generate")


def test_loras_from_the_folder_with_a_scale_each(server, client):
    table = {"headers": ["LoRA", "scale"], "data": [["style.safetensors", 0.8]], "metadata": None}
    base, _ = full(client, seed=4)
    styled, parameters = full(client, seed=4, loras=table)
    assert "<lora:style:0.8>" in parameters
    assert np.abs(pixels(styled) - pixels(base)).mean() > 0.5, "the LoRA changes the image"
    off, _ = full(client, seed=4, loras={**table, "data": [["style.safetensors", 0]]})
    assert np.array_equal(pixels(off), pixels(base)), "scale 0 = off"
    with pytest.raises(Exception, match="is not in ui.lora_dir"):
        full(client, loras={**table, "data": [["../../elsewhere.safetensors", 1.0]]})


def test_model_switch_reloads_only_on_change(server, client):
    generator, _ = server
    full(client, "tiny_sdxl_turbo")
    loads = pipelines.load_count
    full(client, "tiny_sdxl_turbo", seed=1)
    assert pipelines.load_count == loads, "same model: the cached pipeline"
    image, parameters = full(client, "tiny_sd15", guidance=2.0, num_images=2)
    assert pipelines.load_count == loads + 1
    assert "Family: sd15" in parameters and "Seed: 1" in parameters and "CFG scale: 2" in parameters
    full(client, "tiny_sd15", seed=5)
    assert pipelines.load_count == loads + 1
    full(client, "tiny_sdxl_turbo")
    assert pipelines.load_count == loads + 2


def test_full_mode_above_native_runs_the_highres_chain(server, client):
    image, parameters = full(client, size="128", steps=2)
    assert Image.open(image).size == (128, 128)
    assert "Hires" in parameters


def test_bad_settings_are_a_message(server, client):
    with pytest.raises(Exception, match="scheduler=flow_euler does not fit sdxl"):
        full(client, scheduler="flow_euler")
    with pytest.raises(Exception, match="size="):
        full(client, size="big")


def bomb_png(path):
    """A valid 1x1 PNG whose header claims 20000 x 20000 pixels."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = bytearray(data[12:29])
    ihdr[4:12] = struct.pack(">II", 20000, 20000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


def test_bad_uploads_get_a_message_and_the_server_keeps_running(server, client, tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(text)), api_name="/load_image")
    with pytest.raises(Exception, match="decompression bomb"):
        client.predict(handle_file(str(bomb_png(tmp_path / "bomb.png"))), api_name="/load_image")
    truncated = tmp_path / "truncated.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:2000])
    with pytest.raises(Exception, match="not a readable image"):
        client.predict(handle_file(str(truncated)), api_name="/load_image")
    large = tmp_path / "large.png"
    large.write_bytes(b"\0" * (1024 * 1024 + 10))  # over ui.max_upload_mb=1
    with pytest.raises(Exception):
        client.predict(handle_file(str(large)), api_name="/load_image")
    image, *_ = live(client, "still here")
    assert pixels(image).std() > 1


def test_an_upload_goes_onto_the_sketch_pad(server, client, drawn):
    value = client.predict(handle_file(str(drawn[0])), api_name="/load_image")
    assert np.array_equal(pixels(value["composite"]), pixels(drawn[0]))


def test_png_drop_restores_settings(server, client, tmp_path):
    generator, _ = server
    image, *_ = full(client, "tiny_sd15", seed=7, steps=3, guidance=1.5, prompt="a (red:1.2) car, ${x}")
    png = written(generator, image)
    restored = client.predict(handle_file(str(png)), api_name="/restore")
    prompt, negative, seed, steps, strength, model, scheduler, prompter, size, guidance, num_images = restored
    assert (prompt, seed, steps, model, guidance, num_images) == ("a (red:1.2) car, ${x}", 7, 3, "tiny_sd15", 1.5, 1)

    a1111 = tmp_path / "a1111.png"
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat on a mat\nNegative prompt: ugly\nSteps: 5, Sampler: Euler a, CFG scale: 2.5, "
                                "Seed: 42, Size: 64x64")
    Image.new("RGB", (64, 64)).save(a1111, pnginfo=info)
    prompt, negative, seed, steps, *_rest = client.predict(handle_file(str(a1111)), api_name="/restore")
    assert (prompt, negative, seed, steps) == ("a cat on a mat", "ugly", 42, 5)


def test_files_are_served_only_from_the_run_folder(server):
    import httpx

    _, url = server
    for path in (ROOT / "README.md", ROOT / "conf" / "ui.yaml"):
        response = httpx.get(f"{url}gradio_api/file={path}")
        assert response.status_code in (403, 404), path


def test_other_host_needs_auth(tmp_path):
    result = run_cli("ui.py", "model=tiny_sdxl_turbo", "ui.host=0.0.0.0", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: ui.host=0.0.0.0 serves the page to other machines; give ui.auth=user:password too "
        "(or keep ui.host=127.0.0.1)"]


def test_ctrl_c_stops_the_server(tmp_path):
    import signal
    import subprocess
    import sys

    import httpx

    port = free_port()
    server = subprocess.Popen([sys.executable, str(ROOT / "ui.py"), "model=tiny_sdxl_turbo", f"ui.port={port}"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):  # until the page is served (at most ~60 s), then Ctrl-C
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                try:
                    server.wait(timeout=0.1)  # not up yet: wait a little for it (or for it to exit)
                except subprocess.TimeoutExpired:
                    pass
            assert server.poll() is None, server.stderr.read()
        server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=30)
    finally:
        server.kill()
    assert server.returncode == 130 and stderr.strip().splitlines()[-1] == "interrupted"
