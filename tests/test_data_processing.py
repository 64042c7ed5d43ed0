"""Record -> arrays equals the Hugging Face Qwen2-VL processor path, bit for bit."""

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pr1_jax.data.config import DEFAULT_FORMAT_PROMPT, DataConfig
from pr1_jax.data.processing import (ExampleProcessor, build_messages, expand_image_tokens, load_tokenizer,
                                     make_image_processor, num_patches)
from pr1_jax.data.records import (BAD_IMAGE, NO_IMAGE_PLACEHOLDER, PROMPT_TOO_LONG, TOO_MANY_PATCHES, BadRecordError,
                                  ImageRef, Record)

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "qwen2_tokenizer"
GEO3K = Path(__file__).parent / "fixtures" / "geometry3k"
PAPER_PIXELS = dict(min_pixels=3136, max_pixels=1806336)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def hf_processor(tokenizer, config):
    """transformers' own Qwen2VLProcessor built from the pieces (no torchvision needed: the
    video-processor class check is the only thing that wants it, and we pass no video)."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    class _NoVideoQwen2VLProcessor(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    return _NoVideoQwen2VLProcessor(image_processor=make_image_processor(config), tokenizer=tokenizer,
                                    video_processor=None, chat_template=tokenizer.chat_template)


def _png(img: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _noise(w, h, mode="RGB", seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    if mode == "P":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert("P")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


CASES = {
    # name: (encoded image bytes, expectation on the pixel count)
    "plain_150x100": (_png(_noise(150, 100)), "inside"),
    "under_min_37x41": (_png(_noise(37, 41, seed=1)), "under_min"),
    "over_max_2000x1500": (_png(_noise(2000, 1500, seed=2)), "over_max"),
    "tall_30x900": (_png(_noise(30, 900, seed=3)), "inside"),
    "wide_640x56": (_png(_noise(640, 56, seed=4)), "inside"),
    "gray_L_97x203": (_png(_noise(97, 203, "L", seed=5)), "inside"),
    "rgba_geometry3k": ((GEO3K / "14" / "img_diagram.png").read_bytes(), "inside"),
    "palette_P_120x90": (_png(_noise(120, 90, "P", seed=6)), "inside"),
    "jpeg_333x222": (_png(_noise(333, 222, seed=7), "JPEG"), "inside"),
}


def _reference(tokenizer, config, record, images):
    proc = hf_processor(tokenizer, config)
    text = proc.apply_chat_template(build_messages(record.problem, len(images), config), tokenize=False,
                                    add_generation_prompt=True)
    return proc(text=[text], images=images or None, return_tensors="np")


def _assert_same(ex, ref):
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    assert (ref["attention_mask"][0] == 1).all()
    np.testing.assert_array_equal(ex.mm_token_type_ids, ref["mm_token_type_ids"][0])
    np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
    assert ex.pixel_values.dtype == np.float32 and ex.pixel_values.shape[1] == 1176
    np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])


@pytest.mark.parametrize("name", list(CASES))
def test_matches_hf_processor(tokenizer, name):
    data, where = CASES[name]
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), **PAPER_PIXELS, max_prompt_length=16384)
    record = Record(id=name, problem="In the figure, A B = 30. Find x.", answer="5", images=(ImageRef(data=data),))
    ex = ExampleProcessor(config, tokenizer).process(record)
    ref = _reference(tokenizer, config, record, [Image.open(io.BytesIO(data))])
    _assert_same(ex, ref)

    src = Image.open(io.BytesIO(data))
    t, gh, gw = ex.image_grid_thw[0]
    pixels = int(gh * gw * 14 * 14)
    assert t == 1 and gh % 2 == 0 and gw % 2 == 0
    assert config.min_pixels <= pixels <= config.max_pixels
    if where == "under_min":
        assert src.width * src.height < config.min_pixels
    if where == "over_max":
        assert src.width * src.height > config.max_pixels
    n_img_tokens = int(ex.mm_token_type_ids.sum())
    assert n_img_tokens == gh * gw // 4
    assert ex.num_patches == num_patches(src.height, src.width, config)


@pytest.mark.parametrize("placement", ["system", "user"])
def test_prompt_text_and_placement(tokenizer, placement):
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), format_prompt_placement=placement)
    record = Record(id="r", problem="Find x.", answer="5", images=(ImageRef(data=_png(_noise(60, 60))),))
    text = ExampleProcessor(config, tokenizer).prompt_text(record)
    vision = "<|vision_start|><|image_pad|><|vision_end|>"
    if placement == "system":
        expected = (f"<|im_start|>system\n{DEFAULT_FORMAT_PROMPT}<|im_end|>\n"
                    f"<|im_start|>user\n{vision}Find x.<|im_end|>\n<|im_start|>assistant\n")
    else:
        expected = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    f"<|im_start|>user\n{vision}Find x. {DEFAULT_FORMAT_PROMPT}<|im_end|>\n"
                    "<|im_start|>assistant\n")
    assert text == expected
    for word in ("<think>", "</think>", "<answer>", "</answer>", "\\boxed{}"):
        assert word in DEFAULT_FORMAT_PROMPT


def test_format_prompt_names_resolve_to_the_shipped_texts():
    from pr1_jax import reference

    assert DataConfig().format_prompt == "project"
    assert DataConfig().format_prompt_text == DEFAULT_FORMAT_PROMPT
    assert DataConfig(format_prompt="paper").format_prompt_text == reference.format_prompt()
    assert reference.format_prompt().startswith("You FIRST think about the reasoning process")
    assert DataConfig(format_prompt="Answer in \\boxed{}.").format_prompt_text == "Answer in \\boxed{}."
    assert DataConfig(format_prompt="").format_prompt_text == ""


@pytest.mark.parametrize("problem", ["Find x.", "<image>Find x."])
def test_paper_format_prompt_follows_the_question_after_one_space(tokenizer, problem):
    """`format_prompt: paper`, placement user: the user turn is "<question> <reference format
    prompt>" (what the reference's data loader writes), under the template's default system turn."""
    from pr1_jax import reference

    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), format_prompt="paper", format_prompt_placement="user")
    record = Record(id="r", problem=problem, answer="5", images=(ImageRef(data=_png(_noise(60, 60))),))
    text = ExampleProcessor(config, tokenizer).prompt_text(record)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                    f"Find x. {reference.format_prompt()}<|im_end|>\n<|im_start|>assistant\n")


def test_image_placeholder_same_prompt(tokenizer):
    """'<image>Find x.' (the paper's parquet) and 'Find x.' give the same prompt."""
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR))
    img = (ImageRef(data=_png(_noise(60, 60))),)
    proc = ExampleProcessor(config, tokenizer)
    a = proc.process(Record("a", "<image>Find x.", "5", img))
    b = proc.process(Record("b", "Find x.", "5", img))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)


def test_two_images_with_placeholders_match_hf(tokenizer):
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), max_images_per_record=2, **PAPER_PIXELS)
    d1, d2 = _png(_noise(90, 60, seed=11)), _png(_noise(50, 140, seed=12))
    record = Record("two", "Compare <image1> with <image2>: which is taller?", "2",
                    (ImageRef(data=d1), ImageRef(data=d2)))
    ex = ExampleProcessor(config, tokenizer).process(record)
    ref = _reference(tokenizer, config, record, [Image.open(io.BytesIO(d)) for d in (d1, d2)])
    _assert_same(ex, ref)
    assert ex.image_grid_thw.shape == (2, 3)


def test_paper_placeholder_rule(tokenizer):
    """The reference's loader splits the problem at the literal `<image>` only and gives a problem
    without it no image token; the paper configs' rule: `<image>` places the image, `<image1>` is
    text, and a problem without `<image>` is skipped (`no_image_placeholder`), not given the image
    first as the default does."""
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), format_prompt="paper", format_prompt_placement="user",
                        image_placeholder="<image>", unplaced_images="skip")
    img = (ImageRef(data=_png(_noise(60, 60))),)
    proc = ExampleProcessor(config, tokenizer)
    text = proc.prompt_text(Record("a", "Find x.<image>", "5", img))
    assert "<|im_start|>user\nFind x.<|vision_start|><|image_pad|><|vision_end|> You FIRST" in text
    for problem in ("Find x.", "<image1>Find x."):
        with pytest.raises(BadRecordError) as e:
            proc.process(Record("b", problem, "5", img))
        assert e.value.reason == NO_IMAGE_PLACEHOLDER and "'<image>'" in str(e.value)
    assert "<image1>Find x." in ExampleProcessor(dataclasses.replace(config, unplaced_images="first"),
                                                 tokenizer).prompt_text(Record("c", "<image1>Find x.", "5", img))


def test_image_alpha_drop_is_pils_rgb_conversion(tokenizer):
    """`image_alpha: drop` (the reference's `convert("RGB")`) keeps the colour under transparent
    pixels; `white` (transformers' processor) composites them on white. Opaque images are equal."""
    rgba = _noise(64, 48, "RGBA", seed=9)
    record = Record("t", "Find x.", "5", (ImageRef(data=_png(rgba)),))
    white = DataConfig(tokenizer_path=str(TOKENIZER_DIR), **PAPER_PIXELS)
    drop = dataclasses.replace(white, image_alpha="drop")
    got = {c.image_alpha: ExampleProcessor(c, tokenizer).process(record).pixel_values for c in (white, drop)}
    proc = make_image_processor(white)
    np.testing.assert_array_equal(got["white"], proc(images=[rgba], return_tensors="np")["pixel_values"])
    np.testing.assert_array_equal(got["drop"], proc(images=[rgba.convert("RGB")], return_tensors="np")["pixel_values"])
    assert not np.array_equal(got["white"], got["drop"])
    opaque = Record("o", "Find x.", "5", (ImageRef(data=(GEO3K / "14" / "img_diagram.png").read_bytes()),))
    np.testing.assert_array_equal(*(ExampleProcessor(c, tokenizer).process(opaque).pixel_values for c in (white, drop)))


def test_placeholder_count_mismatch_is_invalid(tokenizer):
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), max_images_per_record=2)
    img = ImageRef(data=_png(_noise(60, 60)))
    with pytest.raises(BadRecordError, match="placeholders"):
        ExampleProcessor(config, tokenizer).process(Record("m", "<image> and <image> and <image>", "1", (img, img)))


def test_expand_image_tokens():
    ids = np.array([1, 9, 2, 9, 3])
    out = expand_image_tokens(ids, 9, np.array([[1, 4, 6], [1, 2, 2]]))
    np.testing.assert_array_equal(out, [1] + [9] * 6 + [2] + [9] + [3])
    with pytest.raises(ValueError):
        expand_image_tokens(ids, 9, np.array([[1, 2, 2]]))


def test_bad_images_and_patch_limit(tokenizer):
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), batch_size=1, patch_rows_per_batch=256)
    proc = ExampleProcessor(config, tokenizer)
    good = _png(_noise(200, 200))
    for data in (b"not an image", good[: len(good) // 2], b""):
        with pytest.raises(BadRecordError) as e:
            proc.process(Record("corrupt", "Find x.", "1", (ImageRef(data=data or b"\0"),)))
        assert e.value.reason == BAD_IMAGE and "corrupt" in str(e.value)
    with pytest.raises(BadRecordError) as e:
        proc.process(Record("gone", "Find x.", "1", (ImageRef(path="/nonexistent/x.png"),)))
    assert e.value.reason == BAD_IMAGE
    with pytest.raises(BadRecordError) as e:  # 200x200 -> 14*14 = 196 patches fits; 400x400 does not
        proc.process(Record("big", "Find x.", "1", (ImageRef(data=_png(_noise(400, 400))),)))
    assert e.value.reason == TOO_MANY_PATCHES and "big" in str(e.value)
    assert proc.process(Record("ok", "Find x.", "1", (ImageRef(data=good),))).num_patches == 196


# ---- patch budget: what smart_resize can really produce ---------------------------------------

def _resized_blocks(h, w, min_pixels, max_pixels):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rh, rw = smart_resize(h, w, factor=28, min_pixels=min_pixels, max_pixels=max_pixels)
    return (rh // 28) * (rw // 28)


# (min_pixels, max_pixels): tight bounds (the tiny default's 56*56 both ways, min = max, min close
# to max) and the paper's; the thin images are where smart_resize leaves the bounds.
BOUNDS = [(3136, 3136), (12544, 12544), (3136, 6272), (200704, 200704), (3136, 1806336)]


@pytest.mark.parametrize("min_pixels,max_pixels", BOUNDS)
def test_max_patches_per_image_bounds_every_resize(min_pixels, max_pixels):
    """Every size smart_resize accepts (aspect <= 200) stays within `max_patches_per_image`, and
    the bound is reached: all thin images up to 24 px on the short side (every long side up to
    200x), every size up to 120 px, a coarse grid up to 4000 px and the paper's largest square."""
    config = DataConfig(min_pixels=min_pixels, max_pixels=max_pixels)
    sizes = [(h, w) for h in range(1, 25) for w in range(h, 200 * h + 1)]
    sizes += [(h, w) for h in range(25, 121) for w in range(h, 121)]
    sizes += [(h, w) for h in range(121, 4000, 37) for w in range(h, min(200 * h, 4000), 41)]
    sizes += [(1344, 1344), (1400, 1300)]
    worst = max(_resized_blocks(h, w, min_pixels, max_pixels) for h, w in sizes)
    assert worst * 4 == config.max_patches_per_image
    assert config.max_patches_per_image >= 4 * (max_pixels // 784)


@pytest.mark.parametrize("min_pixels,max_pixels,w,h", [
    (3136, 3136, 197, 1),  # a 1 px line: raised to 28 x 812 = 22736 pixels, 116 patches (max 16)
    (3136, 3136, 2, 400),  # the same standing up
    (3136, 3136, 40, 41),  # min = max, nearly square: 56 x 84 = 4704 pixels
    (12544, 12544, 2000, 10),
    (3136, 6272, 3000, 15),  # over max_pixels, the short side held at 28
    (3136, 1806336, 2000, 10),
    (3136, 1806336, 6000, 30),
    (3136, 1806336, 197, 1),
])
def test_thin_images_fit_the_default_budget_and_match_hf(tokenizer, min_pixels, max_pixels, w, h):
    """Images that transformers' processor takes are processed, bit-identical to it, within the
    default per-record patch limit and the batch's patch rows."""
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), min_pixels=min_pixels, max_pixels=max_pixels,
                        max_prompt_length=16384)
    data = _png(_noise(w, h, seed=w * h))
    record = Record(id=f"thin-{w}x{h}", problem="Find x.", answer="5", images=(ImageRef(data=data),))
    ex = ExampleProcessor(config, tokenizer).process(record)
    _assert_same(ex, _reference(tokenizer, config, record, [Image.open(io.BytesIO(data))]))
    assert ex.num_patches <= config.patch_limit_per_record <= config.patch_rows // config.batch_size


# ---- over-long prompts: data.truncation ----------------------------------------------------------

LONG_TEXT = " ".join(f"Side {chr(65 + i % 26)}{chr(66 + i % 25)} is {i} cm." for i in range(60))  # ~470 tokens
PAPER_USER = dict(format_prompt="paper", format_prompt_placement="user")


def _truncating(tokenizer, side, max_prompt_length=300, **kw):
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), truncation=side, max_prompt_length=max_prompt_length,
                        **{**PAPER_USER, **kw})
    return config, ExampleProcessor(config, tokenizer)


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_cuts_the_problem_text_only(tokenizer, side):
    """An over-long prompt loses problem-text tokens at the end ("right") or the start ("left")
    of the text until it fits: the image at its placeholder, the chat template, the format prompt
    and the generation prompt stay whole, and the result is what transformers' processor makes
    of the shortened problem."""
    from pr1_jax import reference

    data = _png(_noise(60, 60))
    record = Record("long", "<image>" + LONG_TEXT, "5", (ImageRef(data=data),))
    config, proc = _truncating(tokenizer, side)
    full = ExampleProcessor(dataclasses.replace(config, max_prompt_length=4096), tokenizer).process(record)
    ex = proc.process(record)
    assert full.num_tokens > 500 and config.max_prompt_length - 2 <= ex.num_tokens <= config.max_prompt_length
    assert ex.truncated_tokens == full.num_tokens - ex.num_tokens
    kept = ex.problem.removeprefix("<image>")
    assert ex.problem.startswith("<image>") and 0 < len(kept) < len(LONG_TEXT)
    assert LONG_TEXT.startswith(kept) if side == "right" else LONG_TEXT.endswith(kept)
    _assert_same(ex, _reference(tokenizer, config, dataclasses.replace(record, problem=ex.problem),
                                [Image.open(io.BytesIO(data))]))
    np.testing.assert_array_equal(ex.pixel_values, full.pixel_values)
    text = tokenizer.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                           "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>")
    assert text.endswith(f"{kept} {reference.format_prompt()}<|im_end|>\n<|im_start|>assistant\n")


def test_truncation_keeps_every_image_between_text(tokenizer):
    """Text between images is cut too (from the end: the last text first), never an image."""
    d1, d2 = _png(_noise(90, 60, seed=11)), _png(_noise(50, 140, seed=12))
    record = Record("two", f"Compare <image1> with {LONG_TEXT} and <image2> where {LONG_TEXT}", "2",
                    (ImageRef(data=d1), ImageRef(data=d2)))
    config, proc = _truncating(tokenizer, "right", max_prompt_length=200, max_images_per_record=2)
    ex = proc.process(record)
    assert ex.num_tokens <= 200 and ex.image_grid_thw.shape == (2, 3)
    assert ex.problem.startswith("Compare <image1> with ") and ex.problem.endswith("<image2>")
    _assert_same(ex, _reference(tokenizer, config, dataclasses.replace(record, problem=ex.problem),
                                [Image.open(io.BytesIO(d)) for d in (d1, d2)]))


@pytest.mark.parametrize("side", ["right", "left"])
def test_truncation_skips_when_the_images_alone_do_not_fit(tokenizer, side):
    """No problem text left to cut (the image, template and format prompt fill the limit): a
    `prompt_too_long` skip that says so."""
    config, proc = _truncating(tokenizer, side, max_prompt_length=120)
    record = Record("big-image", "<image>Find x.", "5", (ImageRef(data=_png(_noise(300, 300))),))
    with pytest.raises(BadRecordError) as e:
        proc.process(record)
    assert e.value.reason == PROMPT_TOO_LONG and "without the problem text" in e.value.detail


def test_truncation_setting():
    assert DataConfig().truncation == "skip"  # today's behaviour: a prompt_too_long skip
    with pytest.raises(ValueError, match="truncation"):
        DataConfig(truncation="middle")


def test_tokenizer_fixture_reproduces_reference_vectors(tokenizer):
    inp = (TOKENIZER_DIR / "test_vectors.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    out = (TOKENIZER_DIR / "test_vectors.out").read_text().split("\n")
    assert len(inp) == 47
    for text, ids in zip(inp, out):
        assert tokenizer.encode(text, add_special_tokens=False) == [int(x) for x in ids.split()], repr(text)


def test_tokenizer_from_json_file_equals_dir(tokenizer):
    tok2 = load_tokenizer(TOKENIZER_DIR / "tokenizer.json")
    assert tok2.pad_token_id == tokenizer.pad_token_id == 151643
    assert tok2.eos_token_id == tokenizer.eos_token_id == 151645
    assert tok2.convert_tokens_to_ids("<|image_pad|>") == 151655
    assert tok2.chat_template == tokenizer.chat_template
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Find x, given ∠ABC = 40°.<|im_end|>"
    assert tok2(text)["input_ids"] == tokenizer(text)["input_ids"]


def test_lazy_tokenizer_loading_from_config():
    """No tokenizer given: the processor loads it from tokenizer_path on first use."""
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR))
    proc = ExampleProcessor(config)
    ex = proc.process(Record("lazy", "Find x.", "5", (ImageRef(data=_png(_noise(60, 60))),)))
    assert ex.num_tokens > 0 and proc.pad_token_id == 151643


# Qwen3-VL checkpoints' preprocessor_config.json (Qwen/Qwen3-VL-*-Instruct): what AutoProcessor builds.
QWEN3VL_PREPROCESSOR = dict(size={"longest_edge": 16777216, "shortest_edge": 65536}, patch_size=16,
                            temporal_patch_size=2, merge_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


@pytest.mark.parametrize("pixels", [dict(min_pixels=65536, max_pixels=16777216), PAPER_PIXELS])
def test_qwen3vl_images_match_its_hf_processor(tokenizer, pixels):
    """`image_processor: qwen3_vl` against transformers' Qwen3VLProcessor built from a Qwen3-VL
    checkpoint's preprocessor config (its defaults, and the paper's pixel bounds given as the
    processor's size): 16-pixel patches, 32-pixel resize units, mean/std 0.5, bit for bit."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    class _NoVideo(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    size = {"shortest_edge": pixels["min_pixels"], "longest_edge": pixels["max_pixels"]}
    hf = _NoVideo(image_processor=Qwen2VLImageProcessorPil(**{**QWEN3VL_PREPROCESSOR, "size": size}),
                  tokenizer=tokenizer, video_processor=None, chat_template=tokenizer.chat_template)
    config = DataConfig(tokenizer_path=str(TOKENIZER_DIR), image_processor="qwen3_vl", max_prompt_length=1 << 16,
                        max_images_per_record=4, **pixels)
    names = ["plain_150x100", "over_max_2000x1500", "tall_30x900", "rgba_geometry3k"]
    images = [Image.open(io.BytesIO(CASES[n][0])) for n in names]
    record = Record(id="q3", problem="Compare the figures.", answer="5",
                    images=tuple(ImageRef(data=CASES[n][0]) for n in names))
    ex = ExampleProcessor(config, tokenizer).process(record)
    text = hf.apply_chat_template(build_messages(record.problem, len(images), config), tokenize=False,
                                  add_generation_prompt=True)
    ref = hf(text=[text], images=images, return_tensors="np")
    np.testing.assert_array_equal(ex.input_ids, ref["input_ids"][0])
    np.testing.assert_array_equal(ex.image_grid_thw, ref["image_grid_thw"])
    assert ex.pixel_values.shape[1] == config.patch_dim == 1536
    np.testing.assert_array_equal(ex.pixel_values, ref["pixel_values"])
    assert ex.num_patches == sum(num_patches(i.height, i.width, config) for i in images)
    assert ex.num_patches <= len(images) * config.max_patches_per_image
