"""PNG metadata in A1111's and civitai's vocabulary: the `parameters` text synth writes (sampler and schedule type
of the scheduler that ran, Model hash, LoRA tokens and hashes, TI hashes, Hashes, img2img and hires fields), read
back by a maintained reader (sd-parsers), and replay= of PNGs that A1111 or Forge wrote."""

import hashlib
import json
import logging
import os
import re

import numpy as np
import pytest
import torch
from conftest import compose_infer, run_cli
from omegaconf import OmegaConf
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from synth import hashes
from synth.a1111 import a1111_parameters, parse_parameters, sampler_name
from synth.config import CONF_DIR, group_options
from synth.images import PARAMETERS_KEY, read_config, read_text
from synth.infer import infer
from synth.replay import replay_config
from synth.stages import Stage

PNDM = ("PNDMScheduler", {"skip_prk_steps": True})  # SD1.5's own scheduler, for calls that run nothing


def generate(tmp_path, *overrides):
    [path] = infer(compose_infer(list(overrides), output_dir=tmp_path))
    return path


def settings(text: str) -> dict:
    return parse_parameters(text).fields


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


# --- the parameters text -----------------------------------------------------------------------------------

# Every scheduler option's A1111 name (diffusers' scheduler overview table; A1111 1.9+ writes the schedule apart).
OPTION_NAMES = {
    "ddim": ("DDIM", None),
    "dpmpp_2m": ("DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "flow_euler": ("Euler", "Simple"),
    "unipc": ("UniPC", None),
}


def test_every_scheduler_option_has_its_a1111_name():
    options = {name: OmegaConf.load(CONF_DIR / "scheduler" / f"{name}.yaml") for name in group_options("scheduler")}
    with_class = {name: option for name, option in options.items() if option.cls}
    assert set(with_class) == set(OPTION_NAMES), "a new scheduler option needs its A1111 name here"
    for name, option in with_class.items():
        kwargs = OmegaConf.to_container(option.kwargs)
        assert sampler_name(option.cls.rsplit(".", 1)[-1], kwargs) == OPTION_NAMES[name], name


@pytest.mark.parametrize("identity, expected", [
    (PNDM, ("PLMS", None)),
    (("EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}), ("Euler a", "SGM Uniform")),  # turbo
    (("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}),
     ("DPM++ 2M SDE", "Karras")),
    (("DPMSolverMultistepScheduler", {"solver_order": 3, "algorithm_type": "sde-dpmsolver++"}), ("DPM++ 3M SDE", None)),
    (("EulerDiscreteScheduler", {"use_exponential_sigmas": True}), ("Euler", "Exponential")),
    (("DDPMScheduler", {}), ("DDPM", None)),  # Hunyuan-DiT's: A1111 has no such sampler
])
def test_sampler_names(identity, expected):
    assert sampler_name(*identity) == expected


@pytest.mark.parametrize("model, sampler, schedule", [
    ("tiny_sd15", "PLMS", None),  # scheduler=default: the PNDM stored with the weights
    ("tiny_sd3", "Euler", "Simple"),  # flow-matching Euler, as Forge names it
    ("tiny_sdxl_turbo", "Euler a", "SGM Uniform"),  # model.default_scheduler: trailing Euler ancestral
])
def test_default_scheduler_is_named_as_the_one_that_ran(model, sampler, schedule, tmp_path):
    fields = settings(read_text(generate(tmp_path, f"model={model}"))[PARAMETERS_KEY])
    assert fields["Sampler"] == sampler and fields.get("Schedule type") == schedule
    assert list(fields)[:3] == (["Steps", "Sampler", "Schedule type"] if schedule else ["Steps", "Sampler", "CFG scale"])


def folder_identity(folder) -> str:
    """synth's documented identity of a diffusers folder, computed here from scratch: sha256 over sorted lines
    `<component>/<file> <sha256>` of each component's .safetensors files."""
    index = json.loads((folder / "model_index.json").read_text())
    lines = []
    for component, entry in sorted(index.items()):
        if isinstance(entry, list) and all(entry):
            for file in sorted((folder / component).glob("*.safetensors")):
                lines.append(f"{component}/{file.name} {hashlib.sha256(file.read_bytes()).hexdigest()}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:10]


def test_sd_parsers_reads_synth_pngs_back(tmp_path):
    from sd_parsers import ParserManager

    path = generate(tmp_path, "model=tiny_sd15", "scheduler=dpmpp_2m_karras", "prompt='a red car, at night'",
                    "negative_prompt=blurry", "seed=5", "guidance_scale=6.5", "size=64x48")
    info = ParserManager().parse(str(path))
    assert info.generator.name == "AUTOMATIC1111"
    [sampler] = info.samplers
    assert sampler.name == "DPM++ 2M" and sampler.parameters["scheduler"] == "Karras"
    assert sampler.parameters["seed"] == "5" and sampler.parameters["steps"] == "2"
    assert sampler.parameters["cfg_scale"] == "6.5"
    assert [str(p) for p in sampler.prompts] == ["a red car, at night"]
    assert [str(p) for p in sampler.negative_prompts] == ["blurry"]
    assert info.metadata["Size"] == "64x48"
    twin = compose_infer(["model=tiny_sd15"]).model.path
    from pathlib import Path

    assert sampler.model.hash == folder_identity(Path(twin)) and sampler.model.name == "sd15-tiny"
    assert info.metadata["Hashes"] == {"model": sampler.model.hash}
    assert read_config(path).scheduler.name == "dpmpp_2m_karras"  # replay's own chunk is unchanged


def test_single_file_model_hash_is_autov2_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SYNTH_CACHE_DIR", str(tmp_path / "cache"))
    checkpoint = tmp_path / "dreamshaper_8.safetensors"
    checkpoint.write_bytes(os.urandom(3000))
    autov2 = hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10]
    cfg = compose_infer(["model=sd15", f"model.path={checkpoint}"])
    text = a1111_parameters(cfg, 64, 64, 2, 7.5, scheduler=PNDM)
    assert f"Model hash: {autov2}, Model: dreamshaper_8," in text
    assert settings(text)["Hashes"] == {"model": autov2}
    cache = json.loads((tmp_path / "cache" / hashes.CACHE_FILE).read_text())
    assert cache[str(checkpoint.resolve())]["sha256"].startswith(autov2)

    # Keyed by (path, size, mtime_ns): other bytes of the same size and time are not read again ...
    stat = checkpoint.stat()
    checkpoint.write_bytes(os.urandom(3000))
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashes.model_hash(cfg.model) == autov2
    # ... and a new modification time hashes the file again.
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert hashes.model_hash(cfg.model) == hashlib.sha256(checkpoint.read_bytes()).hexdigest()[:10] != autov2


def lora_file(path, seed: int, note: str = "") -> str:
    torch.manual_seed(seed)
    save_file({"unet.a.lora_A.weight": torch.randn(4, 8), "unet.a.lora_B.weight": torch.randn(8, 4)}, str(path),
              metadata={"note": note})
    return str(path)


def tensor_hash(path) -> str:
    """sha256 of what follows a .safetensors header (A1111's Lora hash, civitai's AutoV3), from the file format."""
    data = open(path, "rb").read()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]


def test_lora_tokens_and_hashes(tmp_path):
    style = lora_file(tmp_path / "my_style.safetensors", 0)
    subject = lora_file(tmp_path / "subject.safetensors", 1)
    cfg = compose_infer(["model=tiny_sd15", "prompt=a dog", f"lora.path=[{style},{subject}]", "lora.scale=[0.8,1.0]"])
    text = a1111_parameters(cfg, 64, 64, 2, 7.5, scheduler=PNDM)
    assert text.splitlines()[0] == "a dog <lora:my_style:0.8> <lora:subject:1>"
    fields = settings(text)
    assert fields["Lora hashes"] == f"my_style: {tensor_hash(style)}, subject: {tensor_hash(subject)}"
    assert fields["Hashes"]["lora:my_style"] == tensor_hash(style) and fields["Hashes"]["lora:subject"] == tensor_hash(subject)
    assert '"my_style: ' in text  # A1111 quotes a value holding ':' or ','
    # civitai's prompt pattern for extra networks finds both tokens with their weights
    assert re.findall(r"<(lora|hypernet):([a-zA-Z0-9_.\-]+):([0-9.]+)>", text) == [("lora", "my_style", "0.8"),
                                                                                 ("lora", "subject", "1")]
    # The hash covers the tensors only: the same weights with other metadata keep it.
    relabelled = lora_file(tmp_path / "relabelled.safetensors", 0, note="renamed")
    assert tensor_hash(relabelled) == tensor_hash(style) == hashes.lora_hash(relabelled)
    assert hashlib.sha256(open(relabelled, "rb").read()).digest() != hashlib.sha256(open(style, "rb").read()).digest()


def test_lora_of_a_run_is_in_its_png(tmp_path):
    from test_lora_infer import make_lora

    lora = str(make_lora("sd15", tmp_path / "trained.safetensors"))
    fields_text = read_text(generate(tmp_path / "run", "model=tiny_sd15", "prompt=a dog", f"lora.path={lora}",
                                     "lora.scale=0.7"))[PARAMETERS_KEY]
    assert fields_text.splitlines()[0] == "a dog <lora:trained:0.7>"
    assert settings(fields_text)["Lora hashes"] == f"trained: {tensor_hash(lora)}"


def test_ti_hashes_name_the_embeddings_the_prompts_use(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, str(folder / "mystyle.safetensors"))
    torch.save({"string_to_param": {"*": torch.randn(1, 32)}, "name": "badhands"}, folder / "badhands.pt")
    save_file({"emb_params": torch.randn(1, 32)}, str(folder / "unused.safetensors"))
    cfg = compose_infer(["model=tiny_sd15", "prompt='a castle, mystyle'", "negative_prompt=badhands",
                         f"textual_inversion=[{folder}]"])
    fields = settings(a1111_parameters(cfg, 64, 64, 2, 7.5, scheduler=PNDM))
    digest = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest()[:12]
              for name in ("mystyle.safetensors", "badhands.pt")}
    assert fields["TI hashes"] == f"badhands: {digest['badhands.pt']}, mystyle: {digest['mystyle.safetensors']}"
    assert fields["Hashes"]["embed:mystyle"] == digest["mystyle.safetensors"]
    assert "embed:unused" not in fields["Hashes"]


def test_img2img_writes_its_denoising_strength():
    cfg = compose_infer(["model=tiny_sd15", "init_image=in.png", "denoise_strength=0.6"])
    fields = settings(a1111_parameters(cfg, 64, 64, 2, 7.5, scheduler=PNDM))
    assert fields["Denoising strength"] == "0.6" and "Hires upscale" not in fields


def test_highres_chain_writes_a1111_hires_fields(tmp_path):
    path = generate(tmp_path, "model=tiny_sd15", "size=128")  # native 64: base 64x64, one refinement at 0.7
    fields = settings(read_text(path)[PARAMETERS_KEY])
    assert Image.open(path).size == (128, 128)
    assert fields["Size"] == "64x64"  # A1111's Size is the first pass
    assert (fields["Hires upscale"], fields["Hires steps"], fields["Hires upscaler"]) == ("2", "2", "Lanczos")
    assert fields["Denoising strength"] == "0.7" and "Hires stages" not in fields

    cfg = compose_infer(["model=tiny_sd15", "highres.upscale=latent"])
    plan = [Stage(64, 48, None, 2), Stage(96, 72, 0.6, 3), Stage(136, 96, 0.5, 4)]
    fields = settings(a1111_parameters(cfg, 136, 96, 2, 7.5, scheduler=PNDM, plan=plan))
    assert (fields["Size"], fields["Hires upscale"], fields["Hires resize"]) == ("64x48", "2.125", "136x96")
    assert (fields["Hires steps"], fields["Hires upscaler"], fields["Denoising strength"]) == ("3", "Latent", "0.6")
    assert fields["Hires stages"] == "96x72 at 0.6 (3 steps), 136x96 at 0.5 (4 steps)"


# --- replay= of PNGs that A1111 or Forge wrote -------------------------------------------------------------

A1111_TEXT = (
    "a lighthouse at dusk <lora:style:0.6>\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234, Size: 64x48, "
    'Model hash: 0123456789, Model: dreamshaper_8, Clip skip: 2, ENSD: 31337, Lora hashes: "style: 0123456789ab", '
    'Hashes: {"model": "0123456789", "lora:style": "0123456789ab"}, Version: v1.9.4'
)


def a1111_png(folder, text: str, name: str = "a1111.png") -> str:
    """A PNG as A1111 saves it: one tEXt chunk `parameters`, nothing else."""
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, text)
    path = folder / name
    Image.new("RGB", (64, 48), "gray").save(path, pnginfo=info)
    return str(path)


def replayed(png, *overrides, output_dir="/tmp/unused"):
    args = [*overrides, f"replay={png}"]
    return replay_config(compose_infer(args, output_dir=output_dir), args)


def note(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if r.name == "synth.replay_a1111"]
    return line


def test_replay_of_an_a1111_png_regenerates_with_its_settings(tmp_path, caplog):
    png = a1111_png(tmp_path, A1111_TEXT)
    with caplog.at_level(logging.INFO, logger="synth.replay_a1111"):
        cfg = replayed(png, "model=tiny_sd15", output_dir=tmp_path / "replay")
    assert (cfg.prompt, cfg.negative_prompt) == ("a lighthouse at dusk", "blurry, lowres")
    assert (cfg.num_inference_steps, cfg.guidance_scale, cfg.seed, cfg.size) == (3, 6.5, 1234, "64x48")
    assert cfg.scheduler.name == "dpmpp_2m_karras" and cfg.scheduler.kwargs.use_karras_sigmas is True
    line = note(caplog)
    assert "\n" not in line and line.startswith(f"replay={png}: an A1111 PNG")
    for unmapped in ("<lora:style:0.6> (no lora.path file named style)", "Model hash: 0123456789",
                     "Clip skip: 2", "ENSD: 31337"):
        assert unmapped in line
    for mapped in ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Version"):
        assert f"{mapped}:" not in line

    [image] = infer(cfg)
    assert Image.open(image).size == (64, 48)
    stored = read_config(image)
    assert (stored.scheduler.name, stored.seed, stored.num_inference_steps) == ("dpmpp_2m_karras", 1234, 3)
    direct = generate(tmp_path / "direct", "model=tiny_sd15", "prompt=a lighthouse at dusk",
                      "negative_prompt='blurry, lowres'", "num_inference_steps=3", "scheduler=dpmpp_2m_karras",
                      "guidance_scale=6.5", "seed=1234", "size=64x48")
    assert np.array_equal(pixels(image), pixels(direct)), "the replay runs exactly the mapped settings"


@pytest.mark.parametrize("model, line, scheduler, unmapped", [
    ("tiny_sd15", "Sampler: DPM++ 2M Karras", "dpmpp_2m_karras", None),  # A1111 before 1.9
    ("tiny_sd15", "Sampler: Euler a, Schedule type: Automatic", "euler_a", None),
    ("tiny_sd15", "Sampler: PLMS", "default", None),  # the family's own PNDM
    ("tiny_sd3", "Sampler: Euler, Schedule type: Simple", "flow_euler", None),  # Forge on a flow model
    ("tiny_sd15", "Sampler: Euler, Schedule type: Karras", "euler", "Schedule type: Karras"),
    ("tiny_sd15", "Sampler: DPM++ SDE", "default", "Sampler: DPM++ SDE (no synth scheduler for sd15"),
])
def test_replay_maps_a1111_samplers(model, line, scheduler, unmapped, tmp_path, caplog):
    png = a1111_png(tmp_path, f"a cat\nSteps: 2, {line}, CFG scale: 7, Seed: 3, Size: 64x64")
    with caplog.at_level(logging.INFO, logger="synth.replay_a1111"):
        assert replayed(png, f"model={model}").scheduler.name == scheduler
    assert (unmapped in note(caplog)) if unmapped else note(caplog).endswith("every setting mapped")


def test_replay_maps_the_hires_pass(tmp_path, caplog):
    text = ("a cat\nSteps: 4, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 64x64, Denoising strength: 0.5, "
            "Hires upscale: 2, Hires steps: 3, Hires upscaler: Latent (bicubic antialiased)")
    with caplog.at_level(logging.INFO, logger="synth.replay_a1111"):
        cfg = replayed(a1111_png(tmp_path, text), "model=tiny_sd15")
    assert cfg.size == "128x128" and cfg.highres.upscale == "latent"
    assert OmegaConf.to_container(cfg.highres.stages) == [{"size": "128x128", "strength": 0.5, "steps": 3}]
    assert "Hires upscaler: Latent (bicubic antialiased) (ran synth's bilinear latent upscale)" in note(caplog)


def test_replay_resolves_lora_tokens_against_the_command_line(tmp_path, caplog):
    style = lora_file(tmp_path / "style.safetensors", 0)
    png = a1111_png(tmp_path, A1111_TEXT.replace("0123456789ab", tensor_hash(style)))
    with caplog.at_level(logging.INFO, logger="synth.replay_a1111"):
        cfg = replayed(png, "model=tiny_sd15", f"lora.path={style}")
    assert list(cfg.lora.scale) == [0.6] and cfg.prompt == "a lighthouse at dusk"
    assert "<lora:" not in note(caplog) and "Lora hashes" not in note(caplog)

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="synth.replay_a1111"):  # another file of that name: said so
        cfg = replayed(a1111_png(tmp_path, A1111_TEXT, "other.png"), "model=tiny_sd15", f"lora.path={style}",
                       "lora.scale=0.9")
    assert cfg.lora.scale == 0.9  # the command line wins
    assert f"Lora hashes: style: 0123456789ab (lora.path style.safetensors has {tensor_hash(style)})" in note(caplog)


def test_replay_keeps_interpolations_in_the_prompt_as_text(tmp_path):
    cfg = replayed(a1111_png(tmp_path, "a ${oc.env:HOME} cat\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1"),
                   "model=tiny_sd15")
    assert cfg.prompt == "a ${oc.env:HOME} cat"


MALFORMED = [
    ("a cat\nSteps: two, Sampler: Euler, CFG scale: 7", "Steps='two' in its parameters text is not an integer"),
    ("a cat\nSteps: 2, Sampler: Euler, Size: 64", "Size='64' in its parameters text is not WIDTHxHEIGHT"),
    ("a cat\nSteps: 2, Seed: 1, Seed: 2", "its settings line gives 'Seed' twice"),
    ('a cat\nSteps: 2, Lora hashes: "style: 123', "Lora hashes: its value is not complete JSON (an unclosed quote)"),
    ('a cat\nSteps: 2, Lora hashes: "style"', "Lora hashes='style' in its parameters text is not \"name: hash, ...\""),
    ("a cat\nSteps: 2, Hashes: [1, 2]", "Hashes='[1, 2]' in its parameters text is not a JSON object of hashes"),
    ("a cat\nSteps: 2, Sampler: Euler, !!!", "its settings line cannot be read at '!!!'"),
    ("a cat <lora:style:lots>\nSteps: 2", "<lora:style:lots> in its prompt: te weight 'lots' is not a number"),
    ("just a prompt, no settings", "its parameters text has no settings line"),
    ("a cat\x1b\nSteps: 2", "its parameters text holds control characters"),
    ("a cat\nSteps: 2, a" + " " * 90_000 + "b", "its settings line cannot be read at 'a "),  # linear, not quadratic
]


@pytest.mark.parametrize("text, message", MALFORMED, ids=[m[:30] for _, m in MALFORMED])
def test_malformed_a1111_text_is_refused_in_one_line(text, message, tmp_path):
    png = a1111_png(tmp_path, text)
    with pytest.raises(ValueError) as error:
        replayed(png, "model=tiny_sd15")
    assert str(error.value).startswith(f"replay={png}: {message}")
    assert "\n" not in str(error.value)


def test_replay_of_an_a1111_png_on_the_command_line(tmp_path):
    png = a1111_png(tmp_path, A1111_TEXT)
    result = run_cli("infer.py", "model=tiny_sd15", f"replay={png}", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [image] = [line for line in result.stdout.splitlines() if line.endswith(".png")]
    assert Image.open(image).size == (64, 48) and read_config(image).seed == 1234
    [line] = [line for line in result.stderr.splitlines() if "an A1111 PNG" in line]
    assert "not mapped: " in line and "Model hash: 0123456789" in line and "<lora:style:0.6>" in line
