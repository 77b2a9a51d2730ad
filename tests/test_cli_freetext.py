"""Prompts as typed: free-text values reach the image, its metadata and the contact sheet exactly, in runs and sweeps."""

import pytest
import yaml
from conftest import compose_infer, run_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from synth.cli_args import escape_interpolations, hydra_quoted, parser, prepare_argv, typed_text
from synth.images import read_text
from synth.sweep import read_jobs, swept_axes

TEXT = ("prompt", "negative_prompt")
LIST = ("callbacks.validation.prompts",)
NASTY = [
    "masterpiece, best quality, a cat",
    "一只猫坐在窗台上",
    "猫が窓辺に座っている, 고양이, кошка на окне 🐱",
    "a (red:1.2) car, [blue] sky, {x} y, a=b, c: d",
    "it's a \"quoted\" 'word'",
    "back\\slash, trailing\\",
    "\\' \\\" \\\\' ends with quote'",
    "${seed} and ${oc.env:HOME} stay text",
    "\\${escaped} \\\\${double}",
    "choice(a, b) is text here",
    "",
    "  spaces around  ",
    "a,b",
    "@not a file at the end",
    "tab\tand\nnewline",
]


def as_typed(arg: str, key: str = "prompt"):
    """The value the config holds after the command line `arg`, as the task reads it (interpolations resolved)."""
    [rewritten] = prepare_argv([arg], TEXT, LIST)
    value = parser().parse_override(rewritten).value()
    return OmegaConf.to_container(OmegaConf.create({key: value, "seed": 1}), resolve=True)[key]


@pytest.mark.parametrize("text", NASTY)
def test_free_text_reads_back_exactly(text):
    if text.startswith("@"):
        text = "x " + text  # a leading @ names a prompts file (tested below)
    assert as_typed(f"prompt={text}") == text
    assert as_typed(f"++negative_prompt={text}", "negative_prompt") == text
    assert typed_text(escape_interpolations(text)) == text


@settings(max_examples=300, derandomize=True, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
def test_any_text_round_trips_through_hydra_and_omegaconf(text):
    value = parser().parse_override("prompt=" + hydra_quoted(text)).value()
    assert OmegaConf.create({"prompt": value}).prompt == text
    assert typed_text(escape_interpolations(text)) == text


def test_composed_config_holds_the_text(tmp_path):
    typed = "masterpiece, 一只猫 (red:1.2) a=b ${seed} 'q' \"d\""
    cfg = compose_infer(prepare_argv(["model=tiny_sd15", f"prompt={typed}", "negative_prompt=blurry, ugly"], TEXT))
    assert cfg.prompt == typed and cfg.negative_prompt == "blurry, ugly"


def test_hydra_syntax_is_kept():
    # Quoted the Hydra way (the shell passed the quotes): as before.
    assert as_typed('prompt="a, b"') == "a, b"
    assert as_typed("prompt='一只猫'") == "一只猫"
    assert prepare_argv(["prompt='${seed}'"], TEXT) == ["prompt='${seed}'"]  # Hydra's rules, interpolation and all
    # Sweep functions stay Hydra's, so -m 'prompt=choice("a, b","c")' sweeps two prompts.
    assert prepare_argv(['prompt=choice("a, b","c")'], TEXT, LIST) == ['prompt=choice("a, b","c")']
    # A list key: Hydra's list, or one prompt as typed.
    assert as_typed('callbacks.validation.prompts=["a, b",c]', "callbacks.validation.prompts") == ["a, b", "c"]
    assert as_typed("callbacks.validation.prompts=[y] a cat, red", "callbacks.validation.prompts") == ["[y] a cat, red"]
    # Other keys and flags are untouched.
    assert prepare_argv(["-m", "seed=0,1", "--cfg", "job", "size=96"], TEXT) == ["-m", "seed=0,1", "--cfg", "job", "size=96"]


def test_prompts_file(tmp_path):
    file = tmp_path / "prompts.txt"
    file.write_text("\ufeffa cat, on a mat\n\n一只猫\r\nit's \"x\" ${y}\n", encoding="utf-8")
    [sweep] = prepare_argv([f"prompt=@{file}", "-m"], TEXT)[:1]
    override = parser().parse_override(sweep)
    assert [typed_text(v) for v in override.sweep_iterator()] == ["a cat, on a mat", "一只猫", "it's \"x\" ${y}"]
    assert as_typed(f"callbacks.validation.prompts=@{file}", "callbacks.validation.prompts") == [
        "a cat, on a mat", "一只猫", "it's \"x\" ${y}"]
    one = tmp_path / "one.txt"
    one.write_text("just one, prompt\n")
    assert as_typed(f"prompt=@{one}") == "just one, prompt"  # one line: no -m needed
    with pytest.raises(ValueError, match="holds 3 prompts, one job each; add -m"):
        prepare_argv([f"prompt=@{file}"], TEXT)
    with pytest.raises(FileNotFoundError, match="no such prompts file"):
        prepare_argv([f"prompt=@{tmp_path}/missing.txt"], TEXT)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        prepare_argv([f"prompt=@{tmp_path}/empty.txt", "-m"], TEXT)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        prepare_argv([f"prompt=@{tmp_path}/latin1.txt", "-m"], TEXT)


def test_cli_run_stores_the_prompt_as_typed(tmp_path):
    typed = "masterpiece, best quality, 一只猫 (red:1.2) a=b {x} [y] 'q' \"d\" ${seed} back\\slash"
    result = run_cli("infer.py", "model=tiny_sd15", f"prompt={typed}", "negative_prompt=blurry, (ugly:1.3)",
                     "num_inference_steps=1", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [png] = (tmp_path / "run").glob("*.png")
    text = read_text(png)
    assert text["parameters"].splitlines()[:2] == [typed, "Negative prompt: blurry, (ugly:1.3)"]
    stored = yaml.safe_load(text["synth-config"])
    assert stored["prompt"] == typed and stored["negative_prompt"] == "blurry, (ugly:1.3)"


def test_cli_multirun_does_not_split_a_comma_prompt(tmp_path):
    result = run_cli("infer.py", "-m", "model=tiny_sd15", "seed=0,1", "prompt=a cat, on a mat", "num_inference_steps=1",
                     f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "sweep").glob("*/*.png"))
    assert [p.parent.name for p in pngs] == ["0", "1"]
    assert {read_text(p)["parameters"].splitlines()[0] for p in pngs} == {"a cat, on a mat"}


def test_cli_prompts_file_sweep_labels_each_prompt(tmp_path):
    prompts = ["a cat, on a mat", "一只猫坐在窗台上", "it's a \"dog\" ${x} \\${y}"]
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    result = run_cli("infer.py", "-m", "model=tiny_sd15", "prompt=@prompts.txt", "num_inference_steps=1",
                     f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    jobs = read_jobs(sweep, ["prompt"])
    assert [job.values["prompt"] for job in jobs] == prompts  # the contact sheet's cell labels
    assert [read_text(job.images[0])["parameters"].splitlines()[0] for job in jobs] == prompts
    assert read_text(sweep / "contact_sheet.png")["synth-sweep"] == "prompt: " + ", ".join(prompts)
    task = OmegaConf.to_container(OmegaConf.load(sweep / "multirun.yaml").hydra.overrides.task, resolve=False)
    assert swept_axes(task) == [("prompt", prompts)]


def test_train_validation_prompts_as_typed(tmp_path):
    (tmp_path / "val.txt").write_text("a dog, sitting\n一只狗\n", encoding="utf-8")
    result = run_cli("train.py", "model=tiny_sd15", "callbacks.validation.prompts=@val.txt", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["callbacks"]["validation"]["prompts"] == ["a dog, sitting", "一只狗"]
