"""Image reading, preprocessing variants and label-set validation."""
import numpy as np
import pytest
import yaml

from vlm.images import ImageLoadError, find_images, load_image, safe_id
from vlm.labels import LabelSetError, list_label_sets, load_label_set
from vlm.variants import get_variant, list_variants, resolve_variants


@pytest.mark.parametrize("name", ["grey8.png", "grey16.png", "rgb.jpg", "rgba.png"])
def test_every_format_reads_to_rgb_uint8(image_dir, name):
    im = load_image(image_dir / name)
    assert im.pixels.dtype == np.uint8 and im.pixels.shape == (96, 96, 3)
    assert im.pixels.std() > 5  # not blank: 16-bit data was windowed, not truncated


def test_sixteen_bit_uses_full_range(image_dir):
    px = load_image(image_dir / "grey16.png").pixels
    assert px.min() <= 5 and px.max() >= 250


def test_corrupt_and_missing_files_name_file_and_reason(corrupt_file, tmp_path):
    with pytest.raises(ImageLoadError) as e:
        load_image(corrupt_file)
    assert str(corrupt_file) in str(e.value) and "not a recognised image" in str(e.value)
    with pytest.raises(ImageLoadError, match="file not found"):
        load_image(tmp_path / "missing.png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(empty)


def test_safe_id_is_filesystem_safe_and_distinct():
    a = safe_id("<script>alert(1)</script>.png")
    assert "<" not in a and "/" not in a and ">" not in a
    assert safe_id("a/x.png") != safe_id("b/x.png")
    assert safe_id("../../etc/passwd").count("/") == 0


def test_find_images_expands_folders_and_globs(image_dir):
    assert len(find_images([str(image_dir)])) == 4
    assert [p.name for p in find_images([str(image_dir / "*.png")])] == ["grey16.png", "grey8.png", "rgba.png"]


def test_dicom_reader_drops_identifiers():
    from tests.conftest import needs_shared_data

    samples = needs_shared_data("samples")
    dcm = next(samples.glob("*.dcm"))
    im = load_image(dcm)
    assert im.original_mode.startswith("DICOM") and im.pixels.shape[2] == 3
    assert not hasattr(im, "patient_name")


def test_variants_are_documented_and_change_pixels(image_dir):
    px = load_image(image_dir / "grey8.png").pixels
    docs = list_variants()
    for required in ("original", "clahe", "equalize", "gamma", "hflip", "center_crop"):
        assert docs[required]
    assert np.array_equal(get_variant("original")(px), px)
    for name in ("clahe", "equalize", "gamma", "hflip"):
        out = get_variant(name)(px)
        assert out.dtype == np.uint8 and out.shape == px.shape and not np.array_equal(out, px)
    assert get_variant("center_crop")(px).shape[0] < px.shape[0]


def test_resolve_variants_rejects_unknown():
    assert resolve_variants("original,clahe") == ["original", "clahe"]
    with pytest.raises(ValueError, match="unknown preprocessing variant 'sharpen'"):
        resolve_variants(["sharpen"])


def test_builtin_label_sets():
    sets = list_label_sets()
    assert {"chestxray14", "chest4", "mura", "skin12"} <= set(sets)
    cxr = load_label_set("chestxray14")
    assert cxr.multilabel and len(cxr.labels) == 14 and cxr.names[-1] == "Hernia"
    assert cxr.resolve_name("No Finding") == []
    chest4 = load_label_set("chest4")
    assert not chest4.multilabel and chest4.names == ["COVID19", "NORMAL", "PNEUMONIA", "TUBERCULOSIS"]
    skin = load_label_set("skin12")
    assert len(skin.labels) == 12
    assert skin.resolve_name("benign keratosis") == ["seborrheic keratosis", "solar lentigo"]
    for ls in (cxr, chest4, skin, load_label_set("mura")):
        for lab in ls.labels:
            assert len(lab.prompts) >= 2 and all(p.positive and p.negative for p in lab.prompts.values())


def test_skin_set_covers_shared_labels():
    from tests.conftest import needs_shared_data

    import csv

    rows = list(csv.DictReader(open(needs_shared_data("skin") / "labels.csv")))
    skin = load_label_set("skin12")
    unknown = {lab for r in rows for lab in r["labels"].split("|") if skin.resolve_name(lab) is None}
    assert not unknown


def _write(tmp_path, data):
    p = tmp_path / "mine.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_user_label_set_and_errors_name_file_and_key(tmp_path):
    good = {"name": "mine", "mode": "multilabel", "prompt_styles": {"plain": ""},
            "labels": [{"name": "Fracture", "category": "Bone",
                        "prompts": {"plain": {"positive": ["a fracture"], "negative": ["no fracture"]}}}]}
    ls = load_label_set(_write(tmp_path, good))
    assert ls.names == ["Fracture"] and ls.label("Fracture").category == "Bone"

    bad = dict(good, labels=[{"name": "Fracture", "prompts": {"plain": {"positive": ["a fracture"]}}}])
    with pytest.raises(LabelSetError) as e:
        load_label_set(_write(tmp_path, bad))
    assert "mine.yaml" in str(e.value) and "labels[0] (Fracture).prompts.plain.negative" in str(e.value)

    with pytest.raises(LabelSetError, match="mode must be one of"):
        load_label_set(_write(tmp_path, dict(good, mode="ranking")))
    (tmp_path / "broken.yaml").write_text("name: [unclosed")
    with pytest.raises(LabelSetError, match="broken.yaml: not valid YAML"):
        load_label_set(tmp_path / "broken.yaml")
    with pytest.raises(LabelSetError, match="unknown label set 'nope'"):
        load_label_set("nope")


def test_grey_images_take_the_one_plane_path_with_the_same_tensors(tmp_path):
    """Grey inputs are varied, resized and normalised on one plane: the tensors must equal the RGB path's
    bit for bit, for every registered variant; a colour image keeps the RGB path; the normalisation table
    equals the per-pixel formula."""
    import torch
    from PIL import Image as PILImage

    from vlm.transforms import model_transform, resize_center_crop, variant_tensors

    grey = (np.random.default_rng(0).random((90, 121)) * 255).astype(np.uint8)
    PILImage.fromarray(grey).save(tmp_path / "grey.png")
    PILImage.fromarray(np.stack([grey, grey // 2, 255 - grey], -1)).save(tmp_path / "colour.png")
    PILImage.fromarray(np.stack([grey] * 3, -1)).save(tmp_path / "grey-as-rgb.png")
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    names = list(list_variants())
    for name, grey_expected in (("grey.png", True), ("grey-as-rgb.png", True), ("colour.png", False)):
        im = load_image(tmp_path / name)
        assert im.is_grey is grey_expected, name
        fast = variant_tensors(im, names, 64, mean, std)
        im.is_grey = False
        assert torch.equal(fast, variant_tensors(im, names, 64, mean, std)), name
    col = load_image(tmp_path / "colour.png").pixels
    t = torch.from_numpy(resize_center_crop(col, 64)).permute(2, 0, 1).float().div_(255.0)
    per_pixel = (t - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.equal(model_transform(col, 64, mean, std), per_pixel)
