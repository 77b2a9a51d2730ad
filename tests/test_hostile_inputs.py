"""Untrusted files stay data: hostile replay PNGs, LoRA, embedding and model files, and non-finite numbers,
through the real command line. Each is refused in one line naming the key or file (exit 2, no traceback), runs
nothing, reads no secret and writes nothing outside the run folder."""

import json
import os
import struct

import numpy as np
import pytest
import yaml
from conftest import compose_infer, run_cli
from PIL import Image, PngImagePlugin

from synth.images import CONFIG_KEY, read_text

SECRET = "s3cr3t-hf-token-value"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A folder of hostile inputs, outside every run folder, and an importable module that leaves a marker."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "evil_module.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(folder / 'MARKER')!r}).write_text('imported')\n"
        "class X:\n    pass\n"
    )
    Image.new("RGB", (64, 64), "red").save(folder / "init.png")
    return folder


def env_for(inputs):
    """The secret a hostile config would like to read, and the hostile module importable by name."""
    path = os.pathsep.join(filter(None, [str(inputs), os.environ.get("PYTHONPATH")]))
    return {"SYNTH_TEST_SECRET": SECRET, "PYTHONPATH": path}


def stored_config(*overrides) -> dict:
    """What synth writes into a PNG of `python infer.py model=tiny_sd15 <overrides>` (resolved, plain YAML)."""
    from omegaconf import OmegaConf

    cfg = compose_infer(["model=tiny_sd15", *overrides], output_dir="/run")
    return yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))


def png_with(folder, name: str, config) -> str:
    """A small PNG whose synth-config chunk is `config` (a dict dumped as YAML, or the raw text)."""
    info = PngImagePlugin.PngInfo()
    info.add_itxt(CONFIG_KEY, config if isinstance(config, str) else yaml.safe_dump(config, allow_unicode=True))
    path = folder / name
    Image.new("RGB", (64, 64), "gray").save(path, pnginfo=info)
    return str(path)


def refused(result, message, inputs, tmp_path):
    """One line on stderr naming the problem, exit 2, nothing run, read or written."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    assert message in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "HYDRA_FULL_ERROR" not in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (inputs / "MARKER").exists(), "nothing from a hostile file is imported"
    assert not [p for p in tmp_path.rglob("*.png")], "nothing is written on refused input"


def with_changes(base: dict, changes: dict) -> dict:
    config = json.loads(json.dumps(base))
    for key, value in changes.items():
        node = config
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = value
    return config


# --- replay PNGs -------------------------------------------------------------------------------------------

REPLAY_CASES = [
    ({"scheduler.cls": "evil_module.X"}, "scheduler.cls='evil_module.X' is not taken from a PNG"),
    ({"scheduler.cls": "diffusers.DDIMScheduler"}, "scheduler.cls='diffusers.DDIMScheduler' is not taken"),
    ({"scheduler.name": "evil_module"}, "scheduler.name='evil_module' is not a scheduler synth offers"),
    ({"scheduler.kwargs": {"_target_": "evil_module.X"}}, "unknown key 'scheduler.kwargs._target_'"),
    ({"_target_": "evil_module.X"}, "unknown key '_target_'"),
    ({"model.default_scheduler": {"cls": "evil_module.X", "kwargs": {}}}, "model.default_scheduler="),
    ({"model.path": "{inputs}/elsewhere/twin"}, "model.path="),
    ({"model.twin": {"family": "sd15", "preset": "tiny"}, "model.path": "/tmp/anywhere"}, "model.path='/tmp/anywhere'"),
    ({"model.family": "evil"}, "model.family='evil' is not a family synth knows"),
    ({"model.controlnets.tile": "{inputs}/elsewhere/cn"}, "model.controlnets.tile="),
    ({"model.path": "${oc.env:SYNTH_TEST_SECRET}"}, "model.path='${oc.env:SYNTH_TEST_SECRET}'"),
    ({"seed": "${oc.env:SYNTH_TEST_SECRET}"}, "seed='${oc.env:SYNTH_TEST_SECRET}' in its synth-config must be an integer"),
    ({"size": "${oc.env:SYNTH_TEST_SECRET}"}, "size='${oc.env:SYNTH_TEST_SECRET}'"),
    ({"dtype": "${oc.env:SYNTH_TEST_SECRET}"}, "dtype='${oc.env:SYNTH_TEST_SECRET}'"),
    ({"init_image": "{inputs}/init.png"}, "init_image="),
    ({"lora.path": "{inputs}/lora.safetensors"}, "lora.path="),
    ({"textual_inversion": ["{inputs}/emb.pt"]}, "textual_inversion="),
    ({"prompter.translator": {"path": "/tmp/x", "twin": "marian"}}, "unknown key 'prompter.translator'"),
    ({"guidance_scale": float("nan")}, "guidance_scale=nan: must be a finite number"),
    ({"denoise_strength": float("inf")}, "denoise_strength=inf: must be a finite number"),
    ({"lora.scale": [float("nan")]}, "lora.scale[0]=nan: must be a finite number"),
    ({"seed": True}, "seed=True in its synth-config must be an integer"),
    ({"prompt": ["a", "list"]}, "prompt=['a', 'list'] in its synth-config must be text"),
    ({"highres.stages": [{"size": 128, "strength": 0.5, "evil": "x"}]}, "highres.stages="),
    ({"highres.strengths.evil": [0.5]}, "unknown key 'highres.strengths.evil'"),
]


@pytest.mark.parametrize("changes, message", REPLAY_CASES, ids=[next(iter(c)) + str(i) for i, (c, _) in enumerate(REPLAY_CASES)])
def test_hostile_replay_config_is_refused(changes, message, inputs, tmp_path):
    changes = {key: json.loads(json.dumps(value).replace("{inputs}", str(inputs))) for key, value in changes.items()}
    png = png_with(inputs, f"{tmp_path.name}.png", with_changes(stored_config(), changes))
    result = run_cli("infer.py", f"replay={png}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env_for(inputs))
    refused(result, message, inputs, tmp_path)
    assert not (inputs / "elsewhere").exists(), "no folder is made where a PNG says"


RAW_CASES = [
    ("!!python/object/apply:os.system ['touch {inputs}/MARKER']\n", "is not plain YAML"),
    ("prompt: !!python/object/apply:evil_module.X []\nseed: 1\n", "is not plain YAML"),
    ("- just\n- a list\n", "is a list, not a mapping of config keys"),
    ("just text\n", "is a str, not a mapping of config keys"),
    ("prompt: [unclosed\n", "is not plain YAML"),
    ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n", "more than"),
    ("[" * 5000 + "]" * 5000 + "\n", "synth-config chunk"),
    ("prompt: ${oc.env:SYNTH_TEST_SECRET}\nevil: 1\n", "unknown key 'evil'"),
    ("1: 2\n", "is not a config key"),
]


@pytest.mark.parametrize("text, message", RAW_CASES, ids=[str(i) for i in range(len(RAW_CASES))])
def test_malformed_replay_chunk_is_one_line(text, message, inputs, tmp_path):
    png = png_with(inputs, f"{tmp_path.name}.png", text.replace("{inputs}", str(inputs)))
    result = run_cli("infer.py", f"replay={png}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env_for(inputs))
    refused(result, message, inputs, tmp_path)


def test_replay_of_a_file_that_is_no_image(inputs, tmp_path):
    broken = inputs / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    result = run_cli("infer.py", f"replay={broken}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, "not a readable image", inputs, tmp_path)


def test_replay_keeps_interpolations_as_text_and_writes_only_into_the_run(inputs, tmp_path):
    """A PNG's `${oc.env:...}` prompt is literal text (never the secret), and its output_dir is not used."""
    prompt = "a cat ${oc.env:SYNTH_TEST_SECRET} \\${x}"
    config = with_changes(stored_config(), {
        "prompt": prompt, "output_dir": str(inputs / "elsewhere"), "seed": 3,
        "logger": {"_target_": "evil_module.X"},  # the logger, like output_dir, is the current run's
        "hydra": {"run": {"dir": str(inputs / "elsewhere")}},  # and so are Hydra's settings
    })
    png = png_with(inputs, "literal.png", config)
    result = run_cli("infer.py", f"replay={png}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path, env=env_for(inputs))
    assert result.returncode == 0, result.stderr
    [path] = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    assert path.startswith(str(tmp_path / "run"))
    text = read_text(path)
    assert SECRET not in json.dumps(text) + result.stdout + result.stderr
    assert yaml.safe_load(text[CONFIG_KEY])["prompt"] == prompt  # stored again exactly as the PNG had it
    assert not (inputs / "elsewhere").exists() and not (inputs / "MARKER").exists()


# --- LoRA and embedding files ------------------------------------------------------------------------------


def safetensors_bytes(header, data: bytes = b"") -> bytes:
    """A .safetensors file written by hand: 8-byte little-endian header length, the header, then the data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensor(dtype: str, shape, offset: int) -> dict:
    size = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "BOOL": 1, "I64": 8}[dtype] * int(np.prod(shape))
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}


def lora_pair(rank_a=2, rank_b=2, dtype="F32", values=None, module="unet.mid.to_q"):
    """Header and data of one lora_A/lora_B pair: A (rank_a, 8), B (8, rank_b)."""
    a = tensor(dtype, (rank_a, 8), 0)
    b = tensor(dtype, (8, rank_b), a["data_offsets"][1])
    count = a["data_offsets"][1] // 4 + (b["data_offsets"][1] - b["data_offsets"][0]) // 4
    data = (values if values is not None else np.full(count, 0.01, "<f4")).astype("<f4").tobytes()
    data = data[: b["data_offsets"][1]] if dtype != "F32" else data
    return {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}, data


def lora_cases():
    good_header, good_data = lora_pair()
    nan = np.full(32, 0.01, "<f4")
    nan[5] = np.nan
    inf = np.full(32, 0.01, "<f4")
    inf[20] = np.inf
    return [
        ("list-header", safetensors_bytes([1, 2, 3]), "its header is a JSON list, not an object"),
        ("text-header", safetensors_bytes(b"this is not json"), "not a readable .safetensors file"),
        ("huge-length", struct.pack("<Q", 2**62) + b"{}", "not a readable .safetensors file (header too large)"),
        ("short-header", struct.pack("<Q", 500) + b'{"a":', "the file ends inside its 500-byte header"),
        ("no-length", b"\x01\x02", "not a readable .safetensors file"),
        ("truncated", safetensors_bytes(good_header, good_data[:20]), "the file is truncated"),
        ("int-dtype", safetensors_bytes(*lora_pair(dtype="I32")), "has dtype I32; LoRA weights must be floating point"),
        ("bool-dtype", safetensors_bytes(*lora_pair(dtype="BOOL")), "has dtype BOOL"),
        ("wrong-length", safetensors_bytes({"unet.x.lora_A.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]}},
                                           b"\0" * 8), "bytes of data do not hold F32 values of shape [2, 2]"),
        ("not-a-tensor", safetensors_bytes({"unet.x.lora_A.weight": "oops"}), "is not a tensor entry"),
        ("bad-shape", safetensors_bytes({"unet.x.lora_A.weight": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
         "malformed shape"),
        ("nan", safetensors_bytes(*lora_pair(values=nan)), "'unet.mid.to_q.lora_A.weight' holds nan or inf values"),
        ("inf", safetensors_bytes(*lora_pair(values=inf)), "'unet.mid.to_q.lora_B.weight' holds nan or inf values"),
        ("rank", safetensors_bytes(*lora_pair(rank_a=2, rank_b=3)), "has rank 2 but 'unet.mid.to_q.lora_B.weight' has rank 3"),
        ("metadata", safetensors_bytes({"__metadata__": {"synth_lora": "[1, 2]"}}), "synth_lora metadata is not a JSON object"),
        ("metadata-type", safetensors_bytes({"__metadata__": {"format": 3}}), "__metadata__ must map names to strings"),
        ("pickle-renamed", b"\x80\x04\x95" + b"\0" * 40, "not a readable .safetensors file"),
    ]


@pytest.mark.parametrize("name, content, message", lora_cases(), ids=[case[0] for case in lora_cases()])
def test_malformed_lora_is_refused_naming_file_and_tensor(name, content, message, inputs, tmp_path):
    path = inputs / f"lora-{name}.safetensors"
    path.write_bytes(content)
    result = run_cli("infer.py", "model=tiny_sd15", f"lora.path={path}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, message, inputs, tmp_path)
    assert str(path) in result.stderr


def test_pickled_lora_is_refused(inputs, tmp_path):
    path = inputs / "lora.bin"
    path.write_bytes(b"\x80\x04\x95 never unpickled")
    result = run_cli("infer.py", "model=tiny_sd15", f"lora.path={path}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, "only .safetensors LoRA files are loaded", inputs, tmp_path)


def embedding_cases():
    values = np.full(32, 0.1, "<f4")
    values[3] = np.inf
    entry = {"dtype": "F32", "shape": [1, 32], "data_offsets": [0, 128]}
    return [
        ("list-header", safetensors_bytes([1]), "not a readable .safetensors file"),
        ("truncated", safetensors_bytes({"emb_params": entry}, values.tobytes()[:50]), "not a readable .safetensors file"),
        ("int", safetensors_bytes({"emb_params": {**entry, "dtype": "I32"}}, np.zeros(32, "<i4").tobytes()),
         "emb_params is not a float vector or matrix"),
        ("inf", safetensors_bytes({"emb_params": entry}, values.tobytes()), "emb_params holds nan or inf values"),
    ]


@pytest.mark.parametrize("name, content, message", embedding_cases(), ids=[case[0] for case in embedding_cases()])
def test_malformed_embedding_is_refused(name, content, message, inputs, tmp_path):
    path = inputs / f"emb{name.replace('-', '')}.safetensors"
    path.write_bytes(content)
    result = run_cli("infer.py", "model=tiny_sd15", f"textual_inversion=[{path}]", f"hydra.run.dir={tmp_path}/run",
                     cwd=tmp_path)
    refused(result, message, inputs, tmp_path)
    assert str(path) in result.stderr


def test_model_folder_with_only_pickled_weights_is_refused(inputs, tmp_path):
    folder = inputs / "pickled-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "config.json").write_text("{}")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04\x95 never unpickled")
    result = run_cli("infer.py", "model=sd15", f"model.path={folder}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, "unet/ holds only pickled weights (diffusion_pytorch_model.bin)", inputs, tmp_path)


# --- finite numbers ----------------------------------------------------------------------------------------

FINITE_CASES = [
    (["guidance_scale=inf"], "guidance_scale=inf: must be a finite number"),
    (["guidance_scale=nan"], "guidance_scale=nan: must be a finite number"),
    (["guidance_scale=-inf"], "guidance_scale=-inf"),
    (["model.guidance_scale=nan"], "model.guidance_scale=nan"),
    (["init_image={inputs}/init.png", "denoise_strength=nan"], "denoise_strength=nan"),
    (["lora.scale=nan"], "lora.scale=nan"),
    (["lora.scale=[1.0,inf]"], "lora.scale[1]=inf"),
    (["controlnet=tile", "size=128", "controlnet.conditioning_scale=nan"], "controlnet.conditioning_scale=nan"),
    (["controlnet=tile", "size=128", "controlnet.conditioning_scale=inf"], "controlnet.conditioning_scale=inf"),
    (["size=128", "highres.strengths.sd15=[nan]"], "highres.strengths.sd15[0]=nan"),
    (["size=128", "highres.stages=[{size:128,strength:nan}]"], "highres.stages[0].strength=nan"),
    (["prompter=tiny_refine", "prompter.refiner.temperature=inf"], "prompter.refiner.temperature=inf"),
]


@pytest.mark.parametrize("args, message", FINITE_CASES, ids=[" ".join(a) for a, _ in FINITE_CASES])
def test_non_finite_knob_is_refused_before_loading(args, message, inputs, tmp_path):
    args = [arg.replace("{inputs}", str(inputs)) for arg in args]
    result = run_cli("infer.py", "model=tiny_sd15", *args, f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, message, inputs, tmp_path)
    assert "loading" not in result.stderr, "refused before any model loads"


def test_non_finite_latents_stop_the_run_naming_the_step(inputs, tmp_path):
    # guidance 1e38 is finite, but the guided noise prediction overflows float32 within two steps
    result = run_cli("infer.py", "model=tiny_sd15", "guidance_scale=1e38", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, "sampling: the latents became nan or inf at step", inputs, tmp_path)


def test_lora_with_huge_finite_weights_stops_the_staged_run(inputs, tmp_path):
    """Finite weights pass the file check; the latents they give are caught in the highres chain, tiled or not."""
    from synth.twins import ensure_twin

    twin = compose_infer(["model=tiny_sd15"]).model
    ensure_twin("sd15", twin.path, preset="tiny")
    with open(f"{twin.path}/unet/diffusion_pytorch_model.safetensors", "rb") as file:
        unet = json.loads(file.read(struct.unpack("<Q", file.read(8))[0]))
    # an attention output projection: its inf goes straight into the residual stream
    module = next(key[: -len(".weight")] for key in sorted(unet) if key.endswith("attn1.to_out.0.weight"))
    out_features, in_features = unet[f"{module}.weight"]["shape"]
    a = tensor("F32", (2, in_features), 0)
    b = tensor("F32", (out_features, 2), a["data_offsets"][1])
    data = np.full((a["data_offsets"][1] + b["data_offsets"][1] - b["data_offsets"][0]) // 4, 1e19, "<f4").tobytes()
    path = inputs / "huge.safetensors"
    path.write_bytes(safetensors_bytes({f"unet.{module}.lora_A.weight": a, f"unet.{module}.lora_B.weight": b}, data))
    result = run_cli("infer.py", "model=tiny_sd15", f"lora.path={path}", "size=128", "highres.tiled=true",
                     f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, "stage 1 (64x64): the latents became nan or inf at step 1", inputs, tmp_path)


def test_non_finite_latents_stop_the_controlnet_refinement(inputs, tmp_path):
    result = run_cli("infer.py", "model=tiny_sd15", "controlnet=tile", f"init_image={inputs}/init.png", "size=128",
                     "guidance_scale=1e38", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    refused(result, "the latents became nan or inf at step", inputs, tmp_path)
    assert "stage" in result.stderr.splitlines()[-1]
