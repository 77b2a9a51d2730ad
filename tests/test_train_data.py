"""Dataset reading and checking, aspect-ratio buckets, augmentation and the resumable batch order (no models)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from train_utils import compose_train, make_dataset

from synth.train.data import BucketBatchSampler, ImageCaptionDataModule, ImageCaptionDataset
from synth.train.rows import caption_dropout, load_dataset, make_buckets, nearest_bucket
from synth.train.run import check_train_inputs


def data_cfg(path, **overrides):
    cfg = compose_train(["model=tiny_sd15", f"data.path={path}", *[f"data.{k}={v}" for k, v in overrides.items()]])
    return cfg.data


def test_csv_jsonl_and_plain_folder_layouts(tmp_path):
    csv_root = make_dataset(tmp_path / "csv", count=2)
    assert [item.caption for item in load_dataset(data_cfg(csv_root))] == ["a red car parked on a street", "a photo of a dog"]
    assert len(load_dataset(data_cfg(csv_root / "train"))) == 2  # the folder holding metadata.csv works too

    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    Image.new("RGB", (64, 64), "red").save(jsonl / "a.png")
    (jsonl / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "text": "a red square"}) + "\n")
    assert load_dataset(data_cfg(jsonl))[0].caption == "a red square"

    plain = tmp_path / "plain"
    plain.mkdir()
    Image.new("RGB", (64, 48), "blue").save(plain / "b.jpg")
    (plain / "b.txt").write_text("a blue square\n")
    [item] = load_dataset(data_cfg(plain))
    assert (item.caption, item.width, item.height) == ("a blue square", 64, 48)


@pytest.fixture
def bad_dataset(tmp_path):
    root = make_dataset(tmp_path / "bad", count=2)
    train = root / "train"
    (train / "broken.png").write_bytes(b"not an image at all")
    rows = (train / "metadata.csv").read_text().splitlines()
    rows += ["missing.png,a photo of a cat", "broken.png,a broken file", "001.png,", ",no file name"]
    (train / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_every_bad_row_is_listed_in_one_message(bad_dataset):
    with pytest.raises(ValueError) as error:
        load_dataset(data_cfg(bad_dataset))
    message = str(error.value)
    assert "\n" not in message  # the CLI prints one line
    assert "4 bad row(s)" in message
    assert "line 4: missing.png: no such file" in message
    assert "line 5: broken.png: not a readable image" in message
    assert "line 6: empty caption" in message
    assert "line 7: missing column 'file_name'" in message
    assert "data.skip_bad=true" in message


def test_skip_bad_keeps_the_good_rows(bad_dataset, caplog):
    items = load_dataset(data_cfg(bad_dataset, skip_bad="true"))
    assert [item.file.name for item in items] == ["000.png", "001.png"]
    assert "skipping 4 bad row(s)" in caplog.text


def test_missing_caption_column_and_jsonl_key(tmp_path):
    root = tmp_path / "nocol"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(root / "a.png")
    (root / "metadata.csv").write_text("file_name,caption\na.png,a dog\n")
    with pytest.raises(ValueError, match="missing column 'text'"):
        load_dataset(data_cfg(root))
    assert load_dataset(data_cfg(root, caption_column="caption"))[0].caption == "a dog"
    (root / "metadata.csv").unlink()
    (root / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1: missing column 'text'"):
        load_dataset(data_cfg(root))


def test_train_refuses_bad_settings_before_loading_a_model(tmp_path):
    root = make_dataset(tmp_path / "ok")
    cases = {
        "data.size=60": "multiple of 8",
        "data.crop=middle": "data.crop=middle",
        "objective.timestep_sampling=normal": "timestep_sampling",
        "lora.rank=0": "lora.rank",
        "lora.path=x.safetensors": "lora.path is for inference",
        "data.caption_dropout=[0.1,0.2]": "1 text encoder",
        "ckpt_path=last": "ckpt_path=last",
    }
    for override, message in cases.items():
        cfg = compose_train(["model=tiny_sd15", f"data.path={root}", override], output_dir=tmp_path / "out")
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            check_train_inputs(cfg)
    kolors = compose_train(["model=tiny_kolors", f"data.path={root}", "vae_dtype=fp16"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="Kolors' VAE overflows"):
        check_train_inputs(kolors)
    hunyuan = compose_train(["model=tiny_hunyuan_dit", f"data.path={root}", "gradient_checkpointing=true"],
                            output_dir=tmp_path)
    with pytest.raises(ValueError, match="gradient_checkpointing=true: diffusers' Hunyuan-DiT"):
        check_train_inputs(hunyuan)
    sd3 = compose_train(["model=tiny_sd3", f"data.path={root}", "objective.snr_gamma=5"], output_dir=tmp_path)
    with pytest.raises(ValueError, match="not sd3"):
        check_train_inputs(sd3)
    missing = compose_train(["model=tiny_sd15", f"data.path={tmp_path / 'nope'}"], output_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        check_train_inputs(missing)


def test_buckets_keep_area_and_aspect():
    buckets = make_buckets(1024, 1024, 64, 2.0)
    assert (1024, 1024) in buckets
    for width, height in buckets:
        assert width % 64 == 0 and height % 64 == 0
        assert 0.5 <= width / height <= 2.0
        assert abs(width * height - 1024 * 1024) / (1024 * 1024) < 0.15

    class Item:
        def __init__(self, width, height):
            self.width, self.height = width, height

    wide, tall = nearest_bucket(Item(1600, 900), buckets), nearest_bucket(Item(900, 1600), buckets)
    assert wide[0] > wide[1] and tall[0] < tall[1]


def test_every_batch_comes_from_one_bucket_and_has_its_size(tmp_path):
    root = make_dataset(tmp_path / "mixed", count=6, sizes=((128, 64), (64, 128), (64, 64)))
    cfg = data_cfg(root, buckets="true", bucket_step=16, batch_size=2, size=64)
    module = ImageCaptionDataModule(load_dataset(cfg), cfg, num_text_encoders=1, seed=0)
    assert len(set(module.buckets)) == 3
    loader = module.train_dataloader()
    shapes = [tuple(batch["pixels"].shape[2:]) for batch in loader]
    assert len(shapes) == 3
    assert {(h, w) for h, w in shapes} == {(h, w) for w, h in set(module.buckets)}
    assert any(h > w for h, w in shapes) and any(w > h for h, w in shapes)  # a tall and a wide bucket


def test_batch_order_depends_on_seed_and_epoch_and_can_skip():
    buckets = [(64, 64)] * 10
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=0)
    first = list(sampler)
    assert first == list(sampler)  # the same epoch gives the same batches
    sampler.set_epoch(1)
    assert list(sampler) != first
    sampler.set_epoch(0)
    sampler.skip = 2
    assert list(sampler) == first[2:]
    ranks = [list(BucketBatchSampler(buckets, 2, 0, rank=r, world=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2  # 5 batches over 2 ranks: equal shares
    assert not {i for b in ranks[0] for i, _, _ in b} & {i for b in ranks[1] for i, _, _ in b}


def test_crops_flips_and_caption_dropout(tmp_path):
    root = make_dataset(tmp_path / "aug", count=1, sizes=((128, 64),))
    cfg = data_cfg(root, crop="random", flip="true", caption_dropout=0.5)
    dataset = ImageCaptionDataset(load_dataset(cfg), cfg, caption_dropout(cfg, 2))
    samples = [dataset[(0, (64, 64), seed)] for seed in range(40)]
    assert all(s["pixels"].shape == (3, 64, 64) for s in samples)
    assert all(-1 <= s["pixels"].min() and s["pixels"].max() <= 1 for s in samples)
    assert len({int(s["crop_top_left"][1]) for s in samples}) > 3  # random horizontal crops
    assert {s["key"].endswith("|1") for s in samples} == {True, False}  # flipped and not
    dropped = [p for s in samples for p in s["prompts"]]
    assert "" in dropped and "a red car parked on a street" in dropped
    assert any(s["prompts"][0] != s["prompts"][1] for s in samples)  # each encoder drops on its own
    again = dataset[(0, (64, 64), 7)]
    assert torch.equal(again["pixels"], samples[7]["pixels"]) and again["prompts"] == samples[7]["prompts"]
    center = ImageCaptionDataset(load_dataset(cfg), OmegaConf.merge(cfg, {"crop": "center", "flip": False}), [0.0])
    assert center[(0, (64, 64), 0)]["crop_top_left"].tolist() == [0, 32]


def test_rows_outside_data_path_are_refused_unless_allowed(tmp_path):
    root = make_dataset(tmp_path / "data", count=1)
    outside = make_dataset(tmp_path / "elsewhere", count=1) / "train" / "000.png"
    (root / "train" / "link.png").symlink_to(outside)
    with open(root / "train" / "metadata.csv", "a") as file:
        file.write(f"{outside},absolute\n../../elsewhere/train/000.png,dotdot\nlink.png,a symlink\n")
    with pytest.raises(ValueError) as error:
        load_dataset(data_cfg(root))
    message = str(error.value)
    assert "3 bad row(s)" in message and message.count("points outside data.path=") == 3
    assert f"line 3: {outside}: points outside" in message and "line 5: link.png: points outside" in message
    assert "data.allow_outside=true" in message
    assert len(load_dataset(data_cfg(root, allow_outside="true"))) == 4


def test_rows_that_cannot_be_read_name_file_and_line(tmp_path):
    root = tmp_path / "jsonl"
    root.mkdir()
    Image.new("RGB", (64, 64)).save(root / "a.png")
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n[1, 2]\n"text"\n{broken\n'
                                         '{"file_name": ["a.png"], "text": "x"}\n')
    with pytest.raises(ValueError) as error:
        load_dataset(data_cfg(root))
    message = str(error.value)
    assert "4 bad row(s)" in message and "\n" not in message
    assert "metadata.jsonl line 2: a JSON list, not an object" in message
    assert "metadata.jsonl line 3: a JSON str, not an object" in message
    assert "metadata.jsonl line 4: not valid JSON" in message
    assert "line 5: file_name must be a file name, not list" in message
    (root / "metadata.jsonl").unlink()
    (root / "metadata.csv").write_bytes("file_name,text\na.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"metadata.csv: line 2 is not UTF-8 text"):
        load_dataset(data_cfg(root))
    (root / "metadata.csv").unlink()
    (root / "a.txt").write_bytes("un caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"a.png: a.txt is not UTF-8 text"):
        load_dataset(data_cfg(root))


def test_decompression_bombs_are_bad_rows(tmp_path, monkeypatch):
    root = make_dataset(tmp_path / "data", count=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 80 - 1)  # the dataset's images are 96 x 80
    with pytest.raises(ValueError) as error:
        load_dataset(data_cfg(root))
    assert "000.png: 96x80 = 7680 pixels is over the limit of 7679 pixels" in str(error.value)


def test_images_are_read_as_a_viewer_shows_them(tmp_path):
    import numpy as np

    root = tmp_path / "data"
    root.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees: stored 96 x 64, shown 64 x 96
    Image.new("RGB", (96, 64), "red").save(root / "rotated.jpg", exif=exif)
    Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16)).save(root / "deep.png")  # 16-bit mid-grey
    for name in ("rotated", "deep"):
        (root / f"{name}.txt").write_text("a caption")
    cfg = data_cfg(root, size=64)
    items = {item.file.name: item for item in load_dataset(cfg)}
    assert (items["rotated.jpg"].width, items["rotated.jpg"].height) == (64, 96)
    dataset = ImageCaptionDataset(list(items.values()), cfg, [0.0])
    deep = dataset[(list(items).index("deep.png"), (64, 64), 0)]["pixels"]
    assert abs(deep.mean().item()) < 0.05  # mid-grey, not clipped to white (1.0)
