"""Bad input through the real command line: one line on stderr naming the value, exit code 2, nothing written."""

import errno
import os
import sys

import pytest
from conftest import run_cli
from PIL import Image

from synth.entry import run_entry_point, run_task


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    Image.new("RGB", (64, 64), "red").save(folder / "ok.png")
    Image.new("RGB", (60, 64), "red").save(folder / "odd.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (folder / "model.ckpt").write_bytes(b"not looked at")
    (folder / "model.safetensors").write_bytes(b"not looked at")
    return folder


CASES = [
    (["model=foo"], "unknown model 'foo'; choose one of: "),  # the list grows with every family
    (["scheduler=fast"], "unknown scheduler 'fast'; choose one of: ddim, default"),
    (["model=tiny_sd3", "scheduler=euler"], "scheduler=euler does not fit sd3"),
    (["model=tiny_sd15", "scheduler=flow_euler"], "scheduler=flow_euler does not fit sd15"),
    (["model=tiny_sd3", "size=1000"], "width 1000 is not a multiple of 16"),
    (["model=tiny_sd15", "size=96x63"], "height 63 is not a multiple of 8"),
    (["model=tiny_sd15", "size=0"], "width 0 is out of range"),
    (["model=tiny_sd15", "size=20000"], "width 20000 is out of range"),
    (["model=tiny_sd15", "size=large"], "size='large'"),
    (["model=tiny_sd15", "num_inference_steps=0"], "num_inference_steps=0"),
    (["model=tiny_sd15", "num_images=0"], "num_images=0"),
    (["model=tiny_sd15", "guidance_scale=-1"], "guidance_scale=-1"),
    (["model=tiny_sd15", "device=tpu"], "device=tpu: choose one of auto, cuda, cpu, mps"),
    (["model=tiny_sd15", "dtype=int8"], "dtype=int8: choose one of auto, fp16, bf16, fp32"),
    (["model=tiny_sd15", "init_image={d}/ok.png", "denoise_strength=1.5"], "denoise_strength=1.5: must be in (0, 1]"),
    (["model=tiny_sd15", "init_image={d}/ok.png", "denoise_strength=0"], "denoise_strength=0: must be in (0, 1]"),
    (["model=tiny_sd15", "init_image={d}/missing.png"], "missing.png: no such file"),
    (["model=tiny_sd15", "init_image={d}/broken.png"], "broken.png: not a readable image"),
    (["model=tiny_sd15", "init_image={d}/odd.png"], "its size 60x64 is not a multiple of 8"),
    (["model=sd15", "model.path=no such model"], "neither an existing local path nor a hub id"),
    (["model=sd15", "model.path={d}"], "has no model_index.json"),
    (["model=sd15"], "stable-diffusion-v1-5/stable-diffusion-v1-5: weights are not available offline"),
    (["model=sd15", "model.path={d}/model.ckpt"], "only .safetensors single-file checkpoints"),
    (["model=kolors", "model.path={d}/model.safetensors"], "kolors has no single-file format"),
    (["model=sd15", "model.path={d}/none.safetensors"], "none.safetensors: no such file"),
    (["replay={d}/ok.png"], "ok.png: the image has no synth metadata"),
    (["replay={d}/missing.png"], "missing.png: no such file"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(args, message, files, tmp_path):
    args = [arg.format(d=files) for arg in args] + ["hydra.run.dir=" + str(tmp_path / "run")]
    result = run_cli("infer.py", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert not list(tmp_path.rglob("*.png")), "nothing is written on bad input"


# Overrides Hydra cannot read or compose, and run folders that cannot be written: one line, before any model loads.
GRAMMAR_CASES = [
    ("infer.py", ["size=("], 2, "cannot read 'size=(': a value with spaces, commas, brackets"),
    ("infer.py", ["seed=[1,"], 2, "cannot read 'seed=[1,'"),
    ("infer.py", ["a cat"], 2, "'a cat' is not an override: write key=value"),
    ("infer.py", ["promt=x"], 2, "promt=x: promt is not a key of infer.py; did you mean prompt?"),
    ("infer.py", ["model=tiny_sd15", "model.pth=x"], 2, "model.pth is not a key of infer.py; did you mean model.path?"),
    ("infer.py", ["hydra/launcher=nope"], 2, "hydra/launcher=nope: no such hydra/launcher config; choose one of: basic"),
    ("infer.py", ["~nokey"], 2, "'nokey' does not exist"),
    ("infer.py", ["prompt=@missing.txt"], 2, "prompt=@missing.txt: no such prompts file"),
    ("infer.py", ["-m", "prompt=choice(a,)"], 2, "cannot read 'prompt=choice(a,)': in a sweep function quote each item"),
    ("train.py", ["trainer.max_steps=[1,"], 2, "cannot read 'trainer.max_steps=[1,'"),
    ("train.py", ["trainer.max_stpes=5"], 2, "trainer.max_stpes is not a key of train.py; did you mean trainer.max_steps?"),
    ("train.py", ["experiment=nope"], 2, "unknown experiment 'nope'; conf/experiment/ has none yet"),
    ("infer.py", ["experiment=nope"], 2, "experiment=nope: no such experiment config; conf/experiment/ has none yet"),
    ("infer.py", ["model=tiny_sd15", "hydra.run.dir={d}/file"], 1, "cannot write the run folder: {d}/file: a file is there"),
    ("infer.py", ["model=tiny_sd15", "hydra.run.dir={d}/file/run"], 1, "cannot write the run folder: {d}/file/run: Not a directory"),
    ("infer.py", ["-m", "model=tiny_sd15", "hydra.sweep.dir={d}/file"], 1, "cannot write the run folder: {d}/file: a file"),
]


@pytest.mark.parametrize("script, args, code, message", GRAMMAR_CASES, ids=[f"{s} {' '.join(a)}" for s, a, _, _ in GRAMMAR_CASES])
def test_hydra_errors_are_one_line(script, args, code, message, tmp_path):
    (tmp_path / "file").write_text("in the way")
    args = [arg.format(d=tmp_path) for arg in args]
    if not any(arg.startswith("hydra.") for arg in args):
        args.append(f"hydra.run.dir={tmp_path}/run")
    result = run_cli(script, *args, cwd=tmp_path)
    assert result.returncode == code, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message.format(d=tmp_path) in lines[0]
    assert "HYDRA_FULL_ERROR" not in result.stderr
    assert not (tmp_path / "run").exists(), "nothing is written"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_run_folder_is_one_line(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        result = run_cli("infer.py", "model=tiny_sd15", f"hydra.run.dir={folder}/run", cwd=tmp_path)
    finally:
        folder.chmod(0o700)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: cannot write the run folder: {folder}/run: Permission denied")


def entry_point(monkeypatch, main, *argv):
    """run_entry_point as `python infer.py argv...` runs it, in this process."""
    monkeypatch.setattr(sys, "argv", ["infer.py", *argv])
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)  # restored afterwards, whatever the wrapper sets
    run_entry_point(main, "infer.py", ("model",), text_keys=("prompt",))


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exit_info:
        entry_point(monkeypatch, main, "prompt=a cat")
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_ctrl_c_in_a_multirun_job_is_not_swallowed():
    def task(cfg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_task(task, None)


def test_a_full_disk_is_one_line(capsys):
    def task(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", "/runs/a/000-seed0.png")

    with pytest.raises(SystemExit) as exit_info:
        run_task(task, None)
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == "error: cannot write the outputs: /runs/a/000-seed0.png: No space left on device\n"


def test_a_bug_in_the_task_still_raises(monkeypatch):
    def main():
        run_task(lambda cfg: 1 / 0, None)

    with pytest.raises(ZeroDivisionError):
        entry_point(monkeypatch, main, "prompt=x")


def test_prompt_with_equals_is_a_prompt(monkeypatch):
    seen = []
    entry_point(monkeypatch, lambda: seen.append(list(sys.argv[1:])), "prompt=a=b", "model=tiny_sd15")
    assert seen == [["prompt='a=b'", "model=tiny_sd15"]]



def test_unreachable_hub_is_one_line(tmp_path):
    """Without HF_HUB_OFFLINE, a hub id that cannot be fetched (here: the hub endpoint refuses connections, the
    cache is empty) ends in one line naming the key, not the loaders' chained tracebacks."""
    from conftest import free_port

    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HOME": str(tmp_path / "hf")}
    result = run_cli("infer.py", "model=sd3", "device=cpu", cwd=tmp_path, env=env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: model.path=stabilityai/stable-diffusion-3-medium-diffusers: weights are not available offline")


def test_hub_load_names_the_key_for_hub_ids_only(tmp_path):
    """synth.config.hub_load turns a hub id's OSError into the one-line offline error for the key it names (the
    prompter's and ControlNet's loads use it too); a local path's own error is left as the loader raised it."""
    from synth.config import hub_load

    def fail():
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    with pytest.raises(FileNotFoundError, match=r"^prompter\.translator\.path=Helsinki-NLP/opus-mt-zh-en: weights "
                       r"are not available offline.*prompter=tiny_"):
        hub_load("Helsinki-NLP/opus-mt-zh-en", "prompter.translator.path", fail)
    with pytest.raises(OSError, match="couldn't connect") as raised:
        hub_load(str(tmp_path), "controlnet.path", fail)
    assert not isinstance(raised.value, FileNotFoundError)
    assert hub_load("org/name", "model.path", lambda: 7) == 7
