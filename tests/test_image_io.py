"""The radiograph loader on the real samples in ../shared/xray-samples and on generated bad files."""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
import struct
import warnings
import zlib
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import SAMPLES, sample_rows
from PIL import Image

from xraygpt_app.config import ImageConfig
from xraygpt_app.errors import ImageLoadError
from xraygpt_app.imaging.loader import Radiograph, describe_content, load_radiograph, looks_like_dicom, model_ready

ROWS = sample_rows()
# Tests that read ../shared/xray-samples (through SAMPLES) skip with samples_dir's reason when it is missing.
needs_samples = pytest.mark.usefixtures("samples_dir")
PNG_8BIT = "nih_cxr14_00000001_000_pa_512.png"
JPEG_8BIT = "covidcxr_2168a917_pa_2000.jpg"
J2K_MONO1 = "cr_nema_rg1_chest_pa_mono1_15bit_j2k_lossy.dcm"
RAW_MONO1 = "cr_nema_rg1_chest_pa_mono1_15bit_uncompressed_DERIVED.dcm"
PNG_16BIT = "cr_nema_rg1_chest_pa_16bit_gray_15bit_range_DERIVED.png"
DX_8BIT = "dx_nih_chest_mono2_8bit_implicit_vr.dcm"
CANINE = "dx_canine_thorax_lateral_mono1_8bit_explicit_vr.dcm"
JPEG_DICOM = "cr_siim_chest_pa_mono2_jpeg_baseline.dcm"


@cache
def _load(name: str) -> Radiograph:
    return load_radiograph(SAMPLES / name)


def _bytes(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def _grey(name: str) -> np.ndarray:
    return np.asarray(_load(name).image.convert("L"), dtype=np.float64)


def _box(array: np.ndarray, cx: float, cy: float, half: float = 0.06) -> float:
    """Mean of a square region centred at (cx, cy) in fractions of width and height."""
    h, w = array.shape
    return float(array[int((cy - half) * h):int((cy + half) * h), int((cx - half) * w):int((cx + half) * w)].mean())


def _refuse(data: bytes, match: str, limits: ImageConfig | None = None) -> str:
    with pytest.raises(ImageLoadError, match=match) as info:
        load_radiograph(data, limits)
    return str(info.value)


def _png(image: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **params)
    return buffer.getvalue()


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _dicom_bytes(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------ every sample, checked against the manifest


@needs_samples
def test_manifest_lists_samples():
    assert len(ROWS) >= 10, "manifest.csv of ../shared/xray-samples not found or nearly empty"


@pytest.mark.parametrize("row", ROWS, ids=[row["filename"] for row in ROWS])
@needs_samples
def test_sample_loads_as_manifest_says(row):
    radiograph = _load(row["filename"])
    info, image = radiograph.info, radiograph.image
    width, height = (int(v) for v in row["dimensions_wxh"].split("x"))
    assert (info.width, info.height) == (width, height) == image.size
    assert image.mode in ("L", "RGB")
    assert info.format == row["file_format"]
    json.dumps(info.to_dict())  # JSON-serialisable
    if info.format == "DICOM":
        assert info.photometric == row["photometric_interpretation"]
        assert info.bit_depth == int(row["bit_depth"].split("/")[1].split()[0])  # "16 allocated / 15 stored"
        assert info.modality == row["modality"].split()[0]
        expected_body = row["body_part"] if row["body_part"].isupper() else None
        assert info.body_part == expected_body
        expected_view = row["view"] if row["view"].isupper() and " " not in row["view"] else None
        assert info.view_position == expected_view
    else:
        assert info.photometric == row["photometric_interpretation"].split("mode ")[1].rstrip(")")
        assert info.bit_depth == int(row["bit_depth"].split("-")[0])
        assert info.modality is info.view_position is info.body_part is None


ORDINARY_8BIT = [r for r in ROWS if r["file_format"] in ("PNG", "JPEG") and r["bit_depth"].startswith("8")]


@pytest.mark.parametrize("row", ORDINARY_8BIT, ids=lambda row: row["filename"])
@needs_samples
def test_ordinary_8bit_files_keep_pil_pixels_exactly(row):
    """The model references opened these files with PIL directly: same mode, same values."""
    with Image.open(SAMPLES / row["filename"]) as reference:
        expected = np.asarray(reference)
        mode = reference.mode
    image = _load(row["filename"]).image
    assert image.mode == mode
    np.testing.assert_array_equal(np.asarray(image), expected)


@needs_samples
def test_path_and_bytes_give_the_same_image():
    from_bytes = load_radiograph(_bytes(JPEG_DICOM))
    assert from_bytes.info == _load(JPEG_DICOM).info
    np.testing.assert_array_equal(np.asarray(from_bytes.image), np.asarray(_load(JPEG_DICOM).image))
    assert load_radiograph(str(SAMPLES / PNG_8BIT)).info == _load(PNG_8BIT).info


@pytest.mark.parametrize("name", [J2K_MONO1, RAW_MONO1, PNG_16BIT, JPEG_DICOM, DX_8BIT, PNG_8BIT])
@needs_samples
def test_frontal_chests_have_dark_lungs_and_bright_mediastinum(name):
    grey = _grey(name)
    mediastinum = _box(grey, 0.5, 0.4, 0.04)
    for lung in (_box(grey, 0.3, 0.4), _box(grey, 0.7, 0.4)):
        assert mediastinum - lung > 40, (name, lung, mediastinum)


@needs_samples
def test_monochrome1_lateral_shows_air_dark():
    grey = _grey(CANINE)  # MONOCHROME1 with Presentation LUT Shape INVERSE: inverted once, not twice
    air = grey[: grey.shape[0] // 12].mean()
    assert air < 50 and grey.mean() > 2 * air
    assert any("MONOCHROME1" in notice for notice in _load(CANINE).info.notices)


@needs_samples
def test_16bit_png_uses_full_8bit_range_and_matches_the_dicom_it_came_from():
    grey = _grey(PNG_16BIT)
    assert grey.min() == 0 and grey.max() == 255
    assert _load(PNG_16BIT).info.bit_depth == 16
    # The PNG is 32767 - (DICOM value): after range scaling vs windowing + inversion both are linear in it.
    assert np.corrcoef(grey.ravel(), _grey(J2K_MONO1).ravel())[0, 1] > 0.99


@needs_samples
def test_j2k_and_uncompressed_monochrome1_agree():
    difference = np.abs(_grey(J2K_MONO1) - _grey(RAW_MONO1))
    assert difference.max() <= 1


@needs_samples
def test_grey_stored_as_rgb_is_kept_as_rgb_with_a_notice():
    radiograph = _load("covidcxr_X-ray_of_cyst_in_pneumocystis_pneumonia_1_rgb_943x751.jpg")
    assert radiograph.image.mode == "RGB"
    assert any("Grey image stored as RGB" in notice for notice in radiograph.info.notices)


@needs_samples
def test_colour_ultrasound_loads_with_a_warning():
    radiograph = _load("us_rgb_colour_explicit_vr.dcm")
    assert radiograph.image.mode == "RGB"
    assert len({tuple(p) for p in np.asarray(radiograph.image).reshape(-1, 3)[::97]}) > 50  # real colour kept
    assert any("not a radiograph" in notice for notice in radiograph.info.notices)


# ------------------------------------------------------------------ other Pillow inputs


@pytest.fixture(scope="module")
def chest_l() -> Image.Image:
    return _load(PNG_8BIT).image


@needs_samples
def test_palette_image_becomes_rgb_with_palette_colours(chest_l):
    palette = chest_l.convert("P")
    radiograph = load_radiograph(_png(palette))
    assert radiograph.image.mode == "RGB" and radiograph.info.photometric == "P"
    np.testing.assert_array_equal(np.asarray(radiograph.image), np.asarray(palette.convert("RGB")))


@needs_samples
def test_opaque_alpha_is_dropped(chest_l):
    radiograph = load_radiograph(_png(chest_l.convert("RGBA")))
    np.testing.assert_array_equal(np.asarray(radiograph.image), np.asarray(chest_l.convert("RGB")))
    grey = load_radiograph(_png(chest_l.convert("LA")))
    assert grey.image.mode == "L" and any("Transparency" in n for n in grey.info.notices)
    np.testing.assert_array_equal(np.asarray(grey.image), np.asarray(chest_l))


@needs_samples
def test_transparent_areas_become_black(chest_l):
    rgba = chest_l.convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 255))
    rgba.paste((255, 255, 255, 0), (0, 0, 100, 100))
    radiograph = load_radiograph(_png(rgba))
    pixels = np.asarray(radiograph.image)
    assert pixels[:100, :100].max() == 0 and pixels[200:, 200:].max() > 0


@needs_samples
def test_cmyk_jpeg_is_converted_without_inversion(chest_l):
    radiograph = load_radiograph(_encode(chest_l.convert("CMYK"), "JPEG", quality=95))
    grey = np.asarray(radiograph.image.convert("L"), dtype=np.float64)
    assert radiograph.info.photometric == "CMYK" and radiograph.image.mode == "RGB"
    assert abs(grey.mean() - np.asarray(chest_l, dtype=np.float64).mean()) < 8


@pytest.mark.parametrize("bits", [12, 15, 16])
@needs_samples
def test_16bit_grey_scaled_by_actual_range(chest_l, bits):
    values = np.asarray(chest_l, dtype=np.uint16) * ((2**bits - 1) // 255)
    radiograph = load_radiograph(_png(Image.fromarray(values)))
    pixels = np.asarray(radiograph.image)
    assert radiograph.image.mode == "L" and radiograph.info.bit_depth == 16
    assert pixels.min() == 0 and pixels.max() == 255
    np.testing.assert_allclose(pixels, np.asarray(chest_l), atol=1)


@needs_samples
def test_exif_orientation_applied(chest_l):
    wide = chest_l.crop((0, 0, 512, 300))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    radiograph = load_radiograph(_encode(wide, "JPEG", exif=exif.tobytes()))
    assert radiograph.image.size == (300, 512)
    assert any("EXIF" in notice for notice in radiograph.info.notices)
    exif[0x0112] = 9  # not an orientation: nothing is done, and nothing is claimed
    radiograph = load_radiograph(_encode(wide, "JPEG", exif=exif.tobytes()))
    assert radiograph.image.size == (512, 300) and not any("EXIF" in n for n in radiograph.info.notices)


@needs_samples
def test_model_ready_keeps_loader_images_and_converts_raw_pil_images_its_way():
    path = SAMPLES / "cr_nema_rg1_chest_pa_16bit_gray_15bit_range_DERIVED.png"
    loaded = load_radiograph(path).image
    assert model_ready(loaded) is loaded  # 8-bit L/RGB: untouched (reference parity)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"
        np.testing.assert_array_equal(np.asarray(model_ready(raw)), np.asarray(loaded))


@needs_samples
def test_file_metadata_is_not_carried_with_the_image(chest_l):
    """PNG text chunks and EXIF (names, dates, phone details) stay behind: only pixels go on."""
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("PatientName", "Doe^Jane")
    exif = Image.Exif()
    exif[0x9003] = "2024:01:01 10:00:00"  # DateTimeOriginal
    for data in (_encode(chest_l, "PNG", pnginfo=text), _encode(chest_l, "JPEG", exif=exif.tobytes())):
        image = load_radiograph(data).image
        assert image.info == {} and not image.getexif()


@needs_samples
def test_multi_frame_tiff_first_frame_with_notice(chest_l):
    first, second = chest_l, Image.eval(chest_l, lambda v: 255 - v)
    radiograph = load_radiograph(_encode(first, "TIFF", save_all=True, append_images=[second]))
    assert radiograph.info.frames == 2 and any("first" in n for n in radiograph.info.notices)
    np.testing.assert_array_equal(np.asarray(radiograph.image), np.asarray(first))


@pytest.mark.parametrize("fmt", ["BMP", "WEBP", "TIFF", "PPM"])
@needs_samples
def test_other_lossless_formats_load_unchanged(chest_l, fmt):
    params = {"lossless": True} if fmt == "WEBP" else {}
    radiograph = load_radiograph(_encode(chest_l, fmt, **params))
    assert radiograph.info.format == fmt
    np.testing.assert_array_equal(np.asarray(radiograph.image.convert("L")), np.asarray(chest_l))


# ------------------------------------------------------------------ DICOM variants built from the samples


@needs_samples
def test_dicom_without_preamble_or_file_meta_loads():
    data = _bytes(CANINE)
    assert data[128:132] == b"DICM"
    expected = np.asarray(_load(CANINE).image)
    without_preamble = data[128:]  # "DICM" + file meta
    ds = pydicom.dcmread(io.BytesIO(data))
    raw = pydicom.filebase.DicomBytesIO()
    raw.is_little_endian, raw.is_implicit_VR = True, False
    pydicom.filewriter.write_dataset(raw, ds)  # the bare data set: no preamble, no file meta
    for variant in (without_preamble, data[132:], raw.getvalue()):
        assert looks_like_dicom(variant)
        np.testing.assert_array_equal(np.asarray(load_radiograph(variant).image), expected)


@needs_samples
def test_dicom_voi_lut_sequence_is_applied():
    ds = pydicom.dcmread(SAMPLES / DX_8BIT)
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 8]
    item.add_new(0x00283006, "US", list(range(255, -1, -1)))  # LUT Data: an inverting VOI LUT
    ds.VOILUTSequence = [item]
    radiograph = load_radiograph(_dicom_bytes(ds))
    original = np.asarray(_load(DX_8BIT).image, dtype=np.int16)  # value range 0..252 stretched to 0..255
    inverted = np.asarray(radiograph.image, dtype=np.int16)
    assert any("VOI LUT" in notice for notice in radiograph.info.notices)
    assert np.corrcoef(original.ravel(), inverted.ravel())[0, 1] < -0.99


@needs_samples
def test_dicom_rescale_then_window():
    ds = pydicom.dcmread(SAMPLES / DX_8BIT)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -1000  # stored 0..252 -> -1000..-496
    ds.WindowCenter, ds.WindowWidth = -748, 505  # covers exactly that range, so only if the rescale came first
    grey = np.asarray(load_radiograph(_dicom_bytes(ds)).image, dtype=np.int16)
    np.testing.assert_allclose(grey, np.asarray(_load(DX_8BIT).image, dtype=np.int16), atol=3)


@needs_samples
def test_dicom_header_warnings_do_not_refuse():
    ds = pydicom.dcmread(SAMPLES / DX_8BIT)
    ds.BodyPartExamined, ds.ViewPosition, ds.PresentationIntentType = "HIP", "LL", "FOR PROCESSING"
    notices = " ".join(load_radiograph(_dicom_bytes(ds)).info.notices)
    assert "Body part HIP" in notices and "Lateral view" in notices and "For Processing" in notices


@needs_samples
def test_multi_frame_dicom_uses_first_frame():
    ds = pydicom.dcmread(SAMPLES / DX_8BIT)
    first = ds.PixelData
    ds.NumberOfFrames = 2
    ds.PixelData = first + bytes(255 - b for b in first[:4096]) + first[4096:]
    radiograph = load_radiograph(_dicom_bytes(ds))
    assert radiograph.info.frames == 2 and any("first" in n for n in radiograph.info.notices)
    np.testing.assert_array_equal(np.asarray(radiograph.image), np.asarray(_load(DX_8BIT).image))


@pytest.fixture(scope="module")
def small_mono1_15bit() -> bytes:
    """The 15-bit MONOCHROME1 chest subsampled to 231x245 (keeps the compression tests fast)."""
    ds = pydicom.dcmread(SAMPLES / RAW_MONO1)
    pixels = ds.pixel_array[::8, ::8].copy()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    return _dicom_bytes(ds)


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless])
@needs_samples
def test_lossless_compressed_dicom_matches_uncompressed(small_mono1_15bit, syntax):
    ds = pydicom.dcmread(io.BytesIO(small_mono1_15bit))
    ds.compress(syntax)  # pydicom's own RLE encoder / pylibjpeg-openjpeg
    radiograph = load_radiograph(_dicom_bytes(ds))
    assert radiograph.info.transfer_syntax == syntax.name
    expected = np.asarray(load_radiograph(small_mono1_15bit).image)
    np.testing.assert_array_equal(np.asarray(radiograph.image), expected)


@needs_samples
def test_palette_colour_dicom():
    ds = pydicom.dcmread(SAMPLES / DX_8BIT)
    stored = ds.pixel_array
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ramp = np.arange(256, dtype=np.uint16) * 257  # 16-bit LUT entries
    for colour, table in (("Red", ramp), ("Green", ramp[::-1].copy()), ("Blue", np.zeros(256, np.uint16))):
        ds.add_new(f"{colour}PaletteColorLookupTableDescriptor", "US", [256, 0, 16])
        ds.add_new(f"{colour}PaletteColorLookupTableData", "OW", table.tobytes())
    pixels = np.asarray(load_radiograph(_dicom_bytes(ds)).image)
    np.testing.assert_array_equal(pixels[..., 0], stored)
    np.testing.assert_array_equal(pixels[..., 1], 255 - stored)
    assert pixels[..., 2].max() == 0


@needs_samples
def test_ybr_dicom_becomes_rgb():
    ds = pydicom.dcmread(SAMPLES / "us_rgb_colour_explicit_vr.dcm")
    rgb = ds.pixel_array
    ds.PixelData = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL").tobytes()
    ds.PhotometricInterpretation = "YBR_FULL"
    radiograph = load_radiograph(_dicom_bytes(ds))
    assert radiograph.image.mode == "RGB" and radiograph.info.photometric == "YBR_FULL"
    assert np.abs(np.asarray(radiograph.image, dtype=np.int16) - rgb).max() <= 2


# ------------------------------------------------------------------ refusals, each with its own message


def test_empty_and_zero_bytes():
    _refuse(b"", "empty")
    _refuse(bytes(4096), "zero bytes")


@pytest.mark.parametrize("name, fmt", [(PNG_8BIT, "PNG"), (JPEG_8BIT, "JPEG"),
                                       ("hannover_00870a9c_ap_bedside_640x524.png", "PNG")])
@pytest.mark.parametrize("fraction", [0.2, 0.6, 0.98])
@needs_samples
def test_truncated_pillow_files(name, fmt, fraction):
    data = _bytes(name)
    _refuse(data[:int(len(data) * fraction)], f"The {fmt} file is truncated")


@pytest.mark.parametrize("cut", [6, 20, 60])
@needs_samples
def test_header_cut_png_and_jpeg(cut):
    _refuse(_bytes(PNG_8BIT)[:cut + 4], "PNG file is truncated or damaged")
    _refuse(_bytes(JPEG_8BIT)[:cut], "JPEG file is truncated or damaged")


def _png_header_only(width: int, height: int, bit_depth: int = 1) -> bytes:
    """A PNG that declares a huge image (a decompression bomb is ~110 KB; the header is what matters)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(100_000)))
            + chunk(b"IEND", b""))


def test_huge_png_refused_before_decoding():
    message = _refuse(_png_header_only(30000, 30000), "not decoded")
    assert "900 megapixels" in message
    # Below Pillow's own bomb threshold, our configurable limit still applies (decoding would say "truncated").
    message = _refuse(_png_header_only(9000, 9000), "not decoded")
    assert "81 megapixels" in message and "image.max_pixels" in message


@needs_samples
def test_configurable_limits():
    small = ImageConfig(max_pixels=100_000)
    assert "1024x1024" in _refuse(_bytes(DX_8BIT), "not decoded", small)
    assert "512x512" in _refuse(_bytes(PNG_8BIT), "not decoded", small)
    _refuse(_bytes(PNG_8BIT), r"0\.2 MB, more than the limit of 0\.1 MB", ImageConfig(max_bytes=100_000))
    assert "211x169" in _refuse(_bytes(CANINE), "too small", ImageConfig(min_side=200))


def test_too_small_image():
    message = _refuse(_png(Image.new("L", (20, 30))), "too small for a radiograph")
    assert "20x30" in message


@pytest.mark.parametrize("data, looks_like", [
    (b"Patient had a cough.\nPlease see attached X-ray.\n", "plain text"),
    (b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n", "PDF"),
    (b"<!DOCTYPE html><html><body>not an image</body></html>", "web page"),
    (b'{"image": "elsewhere"}', "JSON"),
])
def test_non_images_say_what_they_look_like(data, looks_like):
    _refuse(data, f"not an image: it looks like .*{looks_like}")


@needs_samples
def test_zip_renamed_png(tmp_path):
    import zipfile

    path = tmp_path / "scan.png"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("scan.png", _bytes(PNG_8BIT))
    with pytest.raises(ImageLoadError, match="ZIP archive"):
        load_radiograph(path)
    assert describe_content(b"\x1f\x8b\x08rest") == "a gzip-compressed file"


@needs_samples
def test_other_pillow_format_not_accepted(chest_l):
    _refuse(_encode(chest_l.resize((64, 64)), "ICO"), "ICO image, which is not accepted")


@needs_samples
def test_dicom_without_pixel_data():
    ds = pydicom.dcmread(SAMPLES / CANINE)
    del ds.PixelData
    _refuse(_dicom_bytes(ds), r"contains no image \(no Pixel Data\)")


@pytest.mark.parametrize("name", [J2K_MONO1, JPEG_DICOM, RAW_MONO1, DX_8BIT, CANINE])
@pytest.mark.parametrize("where", [0.5, 0.999])
@needs_samples
def test_dicom_cut_inside_pixel_data(name, where):
    """Encapsulated data cut short parses as an empty data set with only a warning: detect it."""
    data = _bytes(name)
    start = data.rfind(b"\xe0\x7f\x10\x00")
    cut = start + 16 + int((len(data) - start - 16) * where)
    _refuse(data[:cut], "truncated")
    _refuse(data[:start + 6], "truncated")  # inside the Pixel Data element header


@needs_samples
def test_undecodable_compressed_dicom():
    data = _bytes(JPEG_DICOM)
    soi = data.find(b"\xff\xd8\xff", data.rfind(b"\xe0\x7f\x10\x00"))
    _refuse(data[:soi] + b"\x00\x00" + data[soi + 2:], r"JPEG Baseline.*damaged")


@needs_samples
def test_unknown_transfer_syntax():
    ds = pydicom.dcmread(SAMPLES / CANINE)
    buffer = _dicom_bytes(ds)
    ds2 = pydicom.dcmread(io.BytesIO(buffer))
    ds2.file_meta.TransferSyntaxUID = "1.2.3.4.5"  # unknown, but still explicit-VR little endian data
    _refuse(_dicom_bytes(ds2), "transfer syntax that cannot be decoded")


@needs_samples
def test_missing_paths_folders_and_permissions(tmp_path, monkeypatch):
    with pytest.raises(ImageLoadError, match="No such file"):
        load_radiograph(tmp_path / "absent.png")
    with pytest.raises(ImageLoadError, match="folder"):
        load_radiograph(tmp_path)
    path = tmp_path / "x.png"
    path.write_bytes(_bytes(PNG_8BIT))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", denied)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_radiograph(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(_bytes(PNG_8BIT))
    path.chmod(0)
    with pytest.raises(ImageLoadError, match="permission denied"):
        load_radiograph(path)


@pytest.mark.parametrize("name", [PNG_8BIT, "covidcxr_41182_2020_203_Fig3_photo_of_film_rgb.jpg", JPEG_DICOM, DX_8BIT,
                                  CANINE, "us_rgb_colour_explicit_vr.dcm"])
@needs_samples
def test_random_damage_gives_a_radiograph_or_a_load_error(name):
    """Seeded corruptions (cuts, flipped header bytes, zeroed runs): never another exception or a warning."""
    rng = np.random.default_rng(sum(name.encode()))
    original = _bytes(name)
    for _ in range(25):
        data = bytearray(original)
        kind = rng.integers(3)
        if kind == 0:
            data = data[: rng.integers(len(data))]
        elif kind == 1:
            for position in rng.integers(0, min(len(data), 4000), size=rng.integers(1, 20)):
                data[position] = int(rng.integers(256))
        else:
            start = int(rng.integers(len(data)))
            data[start:start + 5000] = bytes(len(data[start:start + 5000]))
        with warnings.catch_warnings():
            warnings.simplefilter("error" if name.endswith(".dcm") else "ignore")
            try:
                load_radiograph(bytes(data))
            except ImageLoadError:
                pass


# ------------------------------------------------------------------ privacy


@needs_samples
def test_nothing_written_and_nothing_identifying_logged(monkeypatch, caplog):
    def guard(opener):
        def wrapped(file, mode="r", *args, **kwargs):
            assert not set(str(mode)) & set("wax+"), "the loader must not write files"
            return opener(file, mode, *args, **kwargs)
        return wrapped

    def guarded_os_open(path, flags, *args, **kwargs):
        assert not flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT), "the loader must not write files"
        return real_os_open(path, flags, *args, **kwargs)

    real_os_open = os.open
    monkeypatch.setattr(builtins, "open", guard(builtins.open))
    monkeypatch.setattr(io, "open", guard(io.open))
    monkeypatch.setattr(os, "open", guarded_os_open)
    caplog.set_level(logging.DEBUG)
    names = [row["filename"] for row in ROWS if row["file_format"] == "DICOM"]
    for name in names:
        info = load_radiograph(SAMPLES / name).info
        text = json.dumps(info.to_dict())
        assert "CompressedSamples" not in text and "Dog^" not in text and "Covid0000" not in text
        data = _bytes(name)
        with pytest.raises(ImageLoadError):
            load_radiograph(data[:len(data) // 2])
    test_undecodable_compressed_dicom()  # every decoder plugin fails and pydicom logs each failure
    assert not [record for record in caplog.records if record.name.split(".")[0] in ("pydicom", "libjpeg")]
    logged = caplog.text
    for secret in ("CompressedSamples", "AVeryGood", "Covid0000", "9RG1", "19400305", *names):
        assert secret not in logged
