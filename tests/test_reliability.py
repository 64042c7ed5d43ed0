"""Reliability (issue 10): bad inputs through the real data pipeline, SIGKILL while an asynchronous
checkpoint is being written and while a step is sampling, and `python -m pr1_jax.train` in 2 processes
x 4 CPU devices against 1 x 8. The trainer runs on CPU here whatever the platform of the test run:
these tests compare params bit for bit, which needs a deterministic backend.

Covered elsewhere and not repeated here: SIGKILL after a checkpoint and SIGTERM (test_train.py),
partial / corrupt checkpoint steps (test_checkpoint.py), the NaN guard (test_learner.py), the
single bad-record kinds and strict mode (test_data_*.py), the math-verify time bound
(test_rewards.py).

At the end of the run the counts (faults injected and survived, bad inputs tried, training
steps lost) are printed in the terminal summary (tests/conftest.py).
"""

from __future__ import annotations

import collections
import io
import itertools
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

if __name__ == "__main__":  # a worker of the multi-process test: the device count comes from the parent
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "qwen2_tokenizer"

COUNTS = collections.Counter()  # faults_injected, faults_survived, bad_inputs, steps_lost


@pytest.fixture(autouse=True)
def _report_counts(request):
    """The module's running counts, handed to the report (also from a pytest-xdist worker):
    conftest's terminal summary prints the last one."""
    yield
    request.node.user_properties.append(("reliability_counts", dict(COUNTS)))


# ================================================================================================
# 1. A bad-input corpus through make_iterator
# ================================================================================================

def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(w: int, h: int) -> bytes:
    """A valid 1-bit PNG of w x h white pixels (20000 x 20000 is 76 kB), written row by row without
    ever holding the image."""
    z = zlib.compressobj(9)
    row = b"\x00" + b"\xff" * ((w + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0))
            + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))


def jpeg_with_size(data: bytes, w: int, h: int) -> bytes:
    """A JPEG whose frame header claims w x h (the scan data stays that of the small image)."""
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2):  # SOF: precision (1 byte), height, width
            return data[:i + 5] + struct.pack(">HH", h, w) + data[i + 9:]
        i += 2 + length
    raise ValueError("no SOF marker")


def _encode(img, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tokenizer():
    from pr1_jax.data.processing import load_tokenizer

    return load_tokenizer(TOKENIZER_DIR)


def _data_cfg(**kw):
    from pr1_jax.data.config import DataConfig

    base = dict(tokenizer_path=str(TOKENIZER_DIR), batch_size=2, max_prompt_length=1024,
                length_buckets=(256, 512, 1024), patch_rows_per_batch=2 * 1024, num_epochs=1, seed=0,
                shard_index=0, shard_count=1, read_threads=2, shuffle=False, drop_remainder=False)
    base.update(kw)
    return DataConfig(**base)


def _drain(config, tokenizer):
    from pr1_jax.data.pipeline import make_iterator

    it = make_iterator(config, tokenizer)
    batches = list(it)
    return batches, it


def _examples(batches):
    """{record id: (grid rows, annotations, patch rows)} of every delivered example."""
    out = {}
    for b in batches:
        for row, (rid, ok) in enumerate(zip(b["record_id"], b["example_valid"])):
            if not ok:
                continue
            imgs = np.flatnonzero(b["image_valid"] & (b["image_example_index"] == row))
            grids = [tuple(int(v) for v in b["image_grid_thw"][i]) for i in imgs]
            patches = int(sum(np.sum(b["patch_valid"] & (b["patch_image_index"] == i)) for i in imgs))
            out[rid] = (grids, b["annotations"][row], patches)
            assert np.isfinite(b["pixel_values"]).all()
    return out


def _expected_grid(w: int, h: int, config) -> tuple[int, int, int]:
    from pr1_jax.data.processing import resized_hw

    rh, rw = resized_hw(h, w, config)
    return (1, rh // 14, rw // 14)


class _DecodeSpy:
    """Records the size of every image whose pixels PIL decodes (ImageFile.load)."""

    def __init__(self, monkeypatch):
        from PIL import ImageFile

        self.sizes = []
        original = ImageFile.ImageFile.load

        def load(img):
            self.sizes.append(img.size)
            return original(img)

        monkeypatch.setattr(ImageFile.ImageFile, "load", load)

    @property
    def largest(self) -> int:
        return max((w * h for w, h in self.sizes), default=0)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_input_corpus_jsonl(tokenizer, tmp_path, monkeypatch, caplog):
    """Every kind of bad input in one JSONL file, interleaved with the eight good sample records:
    each bad one is skipped with its documented, counted reason or processed correctly, the
    pipeline keeps going, and the good records all come out in file order."""
    from PIL import Image

    from pr1_jax.data import records as rec
    from pr1_jax.data import sample

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))  # w=300, h=200
    png, jpg = _encode(rgb, "PNG"), _encode(rgb, "JPEG")
    files = {
        "trunc.png": png[: len(png) // 2],
        "trunc.jpg": jpg[: len(jpg) // 2],
        "huge20000.png": huge_png(20000, 20000),  # 4e8 pixels: 1.2 GB as RGB if decoded
        "huge20000.jpg": jpeg_with_size(jpg, 20000, 20000),
        "big12000.png": huge_png(12000, 12000),  # 1.44e8: over PIL's limit, under its hard error
        "empty.png": b"",
        "gray.png": _encode(rgb.convert("L"), "PNG"),
        "rgba.png": _encode(rgb.convert("RGBA"), "PNG"),
        "one.png": _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"),
        "gray16.png": _encode(Image.fromarray(rng.integers(0, 65536, (90, 120), dtype=np.uint16)), "PNG"),
        "palette.gif": _encode(rgb.convert("P"), "GIF"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG"),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "a_directory").mkdir()

    good = [json.loads(line) for line in Path(sample.SAMPLE_JSONL).read_text().splitlines()]
    for g in good:
        g["image"] = str(Path(sample.SAMPLE_DIR) / g["image"])
    base = {"problem": "Find x.", "answer": "1", "annotations": ["AB = 1."]}
    SKIP = object()

    def row(rid, expect, **fields):
        r = {"id": rid, **base, **fields}
        for k, v in list(r.items()):
            if v is SKIP:
                del r[k]
        return r, expect

    ok = "ok"
    # (row as a dict or raw bytes, expected: a skip reason or "ok")
    corpus = [
        ("\ufeff" + json.dumps({**good[0]}), ok),  # a UTF-8 byte-order mark on the first line
        row("trunc-png", rec.BAD_IMAGE, image="trunc.png"),
        row("trunc-jpg", rec.BAD_IMAGE, image="trunc.jpg"),
        row("huge-png", rec.BAD_IMAGE, image="huge20000.png"),
        row("huge-jpg", rec.BAD_IMAGE, image="huge20000.jpg"),
        row("big-png", rec.BAD_IMAGE, image="big12000.png"),
        (good[1], ok),
        row("empty-file", rec.BAD_IMAGE, image="empty.png"),
        row("directory", rec.BAD_IMAGE, image="a_directory"),
        row("gray", ok, image="gray.png"),
        row("rgba", ok, image="rgba.png"),
        row("one-pixel", ok, image="one.png"),
        row("gray16", ok, image="gray16.png"),
        row("palette", ok, image="palette.gif"),
        row("cmyk", ok, image="cmyk.jpg"),
        (good[2], ok),
        row("no-problem", rec.EMPTY_PROBLEM, problem=SKIP, image="gray.png"),
        row("null-problem", rec.EMPTY_PROBLEM, problem=None, image="gray.png"),
        row("number-problem", rec.INVALID_RECORD, problem=42, image="gray.png"),
        row("null-answer", rec.MISSING_ANSWER, answer=None, image="gray.png"),
        row("no-answer", rec.MISSING_ANSWER, answer=SKIP, image="gray.png"),
        row("list-answer", rec.INVALID_RECORD, answer=["1"], image="gray.png"),
        row("null-image", rec.MISSING_IMAGE, image=None),
        row("no-image", rec.MISSING_IMAGE),
        (good[3], ok),
        row("null-annotations", ok, image="gray.png", annotations=None),
        row("no-annotations", ok, image="gray.png", annotations=SKIP),
        row(None, ok, image="gray.png"),  # null id: "<file stem>:<row>"
        row(SKIP, ok, image="gray.png"),  # no id
        row("open-tags", ok, image="gray.png", annotations="<info1>AB = 3.<info2>BC = 4."),
        row("open-last-tag", ok, image="gray.png",
            annotations="Visual Key Information: <info1>AB = 3.</info1> <info2>BC = 4."),
        (b'{"id": "not-utf8", "problem": "Find \xff\xfe x.", "answer": "1", "image": "gray.png"}', rec.INVALID_RECORD),
        (b"\xc3\x28 binary garbage \x00\x01", rec.INVALID_RECORD),
        row("too-long", rec.PROMPT_TOO_LONG, image="gray.png", problem="Find x. " * 900),
        *[(g, ok) for g in good[4:]],
    ]
    lines, expected = [], []
    for k, (r, expect) in enumerate(corpus):
        line = r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode("utf-8")
        lines.append(line)
        rid = r.get("id") if isinstance(r, dict) else (json.loads(r[1:])["id"] if isinstance(r, str) else None)
        expected.append((rid if rid else f"records:{k + 1}", expect))  # line k + 1: no blank lines
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")

    spy = _DecodeSpy(monkeypatch)
    config = _data_cfg(paths=str(path), image_column="image", annotations_column="annotations")
    t0 = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="pr1_jax.data.pipeline"):
        batches, it = _drain(config, tokenizer)
    seconds = time.perf_counter() - t0

    want_ok = [rid for rid, e in expected if e == ok]
    want_skips = collections.Counter(e for _, e in expected if e != ok)
    got = _examples(batches)
    assert [rid for b in batches for rid, v in zip(b["record_id"], b["example_valid"]) if v] == want_ok
    assert it.skip_counts == dict(want_skips)
    assert [s for b in batches for s in b["skipped"]] == [(rid, e) for rid, e in expected if e != ok]
    messages = "\n".join(caplog.messages)
    for rid, e in expected:
        if e != ok:
            assert f"{rid!r}: {e}" in messages, (rid, e)

    # Nothing large was decoded: the sizes came from the headers (a 20000x20000 image would be a
    # 1.2 GB RGB array); the reasons say why.
    assert spy.largest <= 1400 * 1400, sorted(spy.sizes, key=lambda s: -s[0] * s[1])[:3]
    reason_of = {rid: m for m in caplog.messages for rid, _ in expected if f"{rid!r}: " in m}
    assert "12000x12000 = 144000000 pixels > PIL.Image.MAX_IMAGE_PIXELS" in reason_of["big-png"]
    assert "400000000 pixels" in reason_of["huge-png"] and "400000000 pixels" in reason_of["huge-jpg"]
    assert seconds < 60

    # Odd but valid images: RGB conversion, smart-resize within [min_pixels, max_pixels].
    for rid, (w, h) in {"gray": (300, 200), "rgba": (300, 200), "one-pixel": (1, 1), "gray16": (120, 90),
                        "palette": (300, 200), "cmyk": (300, 200)}.items():
        grids, _, patches = got[rid]
        assert grids == [_expected_grid(w, h, config)], rid
        assert patches == grids[0][1] * grids[0][2]
    assert got["one-pixel"][0] == [(1, 4, 4)]  # 1x1 -> 56x56 = min_pixels
    assert got["open-tags"][1] == ["AB = 3.", "BC = 4."]
    assert got["open-last-tag"][1] == ["AB = 3.", "BC = 4."]
    assert got["null-annotations"][1] == [] and got["no-annotations"][1] == []
    assert sum(1 for rid in got if rid.startswith("records:")) == 2
    assert got[good[0]["id"]][1] == good[0]["annotations"]

    n_bad = len(corpus) - len(good)
    COUNTS["bad_inputs"] += n_bad
    print(f"JSONL corpus: {n_bad} bad inputs, {sum(want_skips.values())} skipped {dict(want_skips)}, "
          f"{n_bad - sum(want_skips.values())} processed; {len(want_ok)} records delivered in {seconds:.1f}s")


def _string_array_unchecked(values: list[bytes]):
    """A pyarrow string array holding these bytes as they are (UTF-8 or not)."""
    import pyarrow as pa

    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    return pa.StringArray.from_buffers(len(values), pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values)))


def test_bad_input_corpus_parquet(tokenizer, tmp_path):
    """The paper's parquet layout with bad cells: text that is not UTF-8 (in the problem, the
    annotations, the id), null and empty fields, a zero-byte image, a 20000x20000 image; the good
    rows come out, the bad ones are counted."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from PIL import Image

    from pr1_jax.data import records as rec

    rng = np.random.default_rng(1)
    img = _encode(Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)), "PNG")
    gray = _encode(Image.fromarray(rng.integers(0, 256, (80, 100), dtype=np.uint8)), "PNG")
    one = _encode(Image.new("RGBA", (1, 1), (1, 2, 3, 4)), "PNG")
    huge = huge_png(20000, 20000)
    ok = "ok"
    rows = [  # id, problem, answer, images, visual_key_info, expected
        (b"p-good", b"<image>Find x.", "1", [img], b"<info1>AB = 1.</info1>", ok),
        (b"p-problem-not-utf8", b"<image>Find \xff x.", "1", [img], b"", rec.INVALID_RECORD),
        (b"p-annotations-not-utf8", b"<image>Find x.", "1", [img], b"<info1>\xc3\x28</info1>", rec.INVALID_RECORD),
        (b"\xff\xfe", b"<image>Find x.", "1", [img], b"", rec.INVALID_RECORD),  # the id itself
        (b"p-null-problem", None, "1", [img], None, rec.EMPTY_PROBLEM),
        (b"p-null-answer", b"<image>Find x.", None, [img], None, rec.MISSING_ANSWER),
        (b"p-null-images", b"Find x.", "1", None, None, rec.MISSING_IMAGE),
        (b"p-zero-byte-image", b"<image>Find x.", "1", [b""], None, rec.MISSING_IMAGE),
        (b"p-huge", b"<image>Find x.", "1", [huge], None, rec.BAD_IMAGE),
        (b"p-two-placeholders", b"<image><image>Find x.", "1", [img], None, rec.INVALID_RECORD),
        (b"p-gray", b"<image>Find x.", "2", [gray], b"<info1>AB = 2.<info2>open", ok),
        (b"p-one-pixel-rgba", b"<image>Find x.", "3", [one], None, ok),
        (None, b"<image>Find x.", "4", [img], None, ok),
    ]
    image_t = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    table = pa.table({
        "id": _string_array_unchecked([r[0] or b"" for r in rows]),
        "problem": _string_array_unchecked([r[1] or b"" for r in rows]),
        "answer": pa.array([r[2] for r in rows], pa.string()),
        "images": pa.array([None if r[3] is None else [{"bytes": b, "path": None} for b in r[3]] for r in rows],
                           image_t),
        "visual_key_info": _string_array_unchecked([r[4] or b"" for r in rows]),
    })
    # nulls where the row says None (from_buffers arrays have no validity bitmap)
    for col, k in (("id", 0), ("problem", 1), ("visual_key_info", 4)):
        mask = pa.array([r[k] is None for r in rows])
        table = table.set_column(table.schema.get_field_index(col), col,
                                 pc.if_else(mask, pa.scalar(None, pa.string()), table[col]))
    path = tmp_path / "bad.parquet"
    pq.write_table(table, path)

    config = _data_cfg(paths=str(path))  # the paper's default columns
    batches, it = _drain(config, tokenizer)
    expected = [((r[0].decode() if r[0] else f"bad:{k}") if r[0] != b"\xff\xfe" else f"bad:{k}", r[5])
                for k, r in enumerate(rows)]
    got = _examples(batches)
    assert list(got) == [rid for rid, e in expected if e == ok]
    assert [s for b in batches for s in b["skipped"]] == [(rid, e) for rid, e in expected if e != ok]
    assert it.skip_counts == dict(collections.Counter(e for _, e in expected if e != ok))
    assert got["p-gray"][1] == ["AB = 2.", "open"]
    assert got["p-one-pixel-rgba"][0] == [(1, 4, 4)]
    n_bad = len(rows) - 1  # all but p-good
    COUNTS["bad_inputs"] += n_bad
    print(f"parquet corpus: {n_bad} bad inputs, skips {it.skip_counts}")


# ================================================================================================
# 2. SIGKILL while a checkpoint is being written, and while a step is sampling
# ================================================================================================

@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from pr1_jax.tiny import build_tiny_assets

    return build_tiny_assets(tmp_path_factory.mktemp("tiny"), seed=0, n_train=64, n_val=16)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """A persistent XLA compilation cache shared by this module's training subprocesses: only the
    first run pays the compile (same programs, same results; this only saves time)."""
    return tmp_path_factory.mktemp("xla_cache")


def _args(assets, run_dir, *extra):
    """A short run on the tiny assets without warm starts (as in test_train.py)."""
    return [f"run_dir={run_dir}", "tiny.enabled=false", f"model.policy={assets.policy}", f"model.judge={assets.judge}",
            f"model.tokenizer={assets.tokenizer}", f"model.judge_tokenizer={assets.tokenizer}",
            f"data.paths=[{assets.train}]", f"val_paths=[{assets.val}]", "val_max_batches=1", "val_batch_size=8",
            "data.batch_size=2", "sampling.n=4", "sampling.max_new_tokens=12", "reward.num_workers=1", *extra]


_LOGS = itertools.count()


def _spawn(cmd, env, log: Path):
    """A subprocess whose output goes to `log` (a file, so that nothing blocks on a full pipe)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


# `python -m pr1_jax.train` whose checkpoint of one step (argv[1]) never completes: Orbax's
# background commit of that step (rename of the temporary directory, commit_success.txt) waits
# forever, as a write to slow storage would; the trainer goes on until it must save again.
_HOLD_ONE_SAVE = """
import runpy, sys, threading
from orbax.checkpoint._src.checkpointers import async_checkpointer
held, commit = sys.argv.pop(1), async_checkpointer._on_commit_callback
def _on_commit_callback(tmpdir, *args, **kwargs):
    if tmpdir.get_final().name == held:
        threading.Event().wait()
    return commit(tmpdir, *args, **kwargs)
async_checkpointer._on_commit_callback = _on_commit_callback
runpy.run_module("pr1_jax.train", run_name="__main__", alter_sys=True)
"""


def _train(args, cache, env=None, hold_save_of: int | None = None):
    """`python -m pr1_jax.train ARGS` on one CPU device (unless `env` says otherwise);
    `hold_save_of`: that step's checkpoint is never completed (`_HOLD_ONE_SAVE`)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
           "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0", **(env or {})}
    run_dir = Path(next(a for a in args if a.startswith("run_dir=")).split("=", 1)[1])
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}.{next(_LOGS)}.log"
    entry = ["-m", "pr1_jax.train"] if hold_save_of is None else ["-c", _HOLD_ONE_SAVE, str(hold_save_of)]
    return _spawn([sys.executable, *entry, *args], env, log)


def _output(proc) -> str:
    return proc.log.read_text(errors="replace")


def _finish(proc, timeout=600) -> str:
    """Waits for the process; its output."""
    proc.wait(timeout)
    return _output(proc)


def _kill_when(pred, proc, timeout=300, poll=0.002):
    """SIGKILL `proc` as soon as `pred()` holds (polled every `poll` s); returns pred's value."""
    t0 = time.time()
    while True:
        hit = pred()
        if hit:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return hit
        if proc.poll() is not None:
            raise AssertionError(f"run exited before the fault ({proc.returncode}):\n{_output(proc)[-3000:]}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting for the fault point")
        time.sleep(poll)


def _wait_until(pred, timeout=600, poll=0.1):
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(poll)


def _train_steps_logged(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            x = json.loads(line)
        except ValueError:  # a line cut by the kill
            continue
        if x.get("split") == "train":
            out.append(x["step"])
    return out


def _complete(ckpt: Path, step: int) -> bool:
    return (ckpt / str(step) / "commit_success.txt").exists()  # orbax writes it last


def _final_params(run: Path, policy, *, other_topology: bool = False):
    """(last step, its params). `other_topology`: the checkpoint was written on other devices
    than this process has (Checkpointer.restore_params reads the devices from the file then, so
    target shardings are passed to Orbax directly)."""
    import jax

    from models import load_pretrained
    from pr1_jax.checkpoint import Checkpointer

    ck = Checkpointer(run / "checkpoints")
    step = ck.steps()[-1]
    if not other_topology:
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), load_pretrained(policy).params)
        return step, ck.restore_params(abstract)
    import orbax.checkpoint as ocp

    here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=here),
                            load_pretrained(policy).params)
    out = ck._manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item={"params": abstract}, restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract)},
        partial_restore=True)))
    return step, out["state"]["params"]


class _Reap:
    """Kills the subprocesses still running when the block ends (e.g. on a failed assertion)."""

    def __init__(self, *procs):
        self.procs = list(procs)

    def add(self, proc):
        self.procs.append(proc)
        return proc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_async_save_returns_before_the_write_and_keeps_the_last_complete_step(tmp_path, monkeypatch):
    """`Checkpointer.save(block=False)` returns while the step is still being written (its commit
    held here), the state it was given may be deleted right away (the next update donates it),
    a reader meanwhile sees only the last complete step, and `wait()` completes the write with
    the values as they were at the save."""
    import threading

    import jax
    import jax.numpy as jnp
    from orbax.checkpoint._src.checkpointers import async_checkpointer

    from pr1_jax.checkpoint import Checkpointer

    release, commit = threading.Event(), async_checkpointer._on_commit_callback

    def held(tmpdir, *args, **kwargs):  # the rename of step 2's temporary directory waits
        if tmpdir.get_final().name == "2":
            assert release.wait(120), "never released"
        return commit(tmpdir, *args, **kwargs)

    monkeypatch.setattr(async_checkpointer, "_on_commit_callback", held)
    state = lambda x: {"w": jnp.full((64, 32), float(x)), "step": jnp.asarray(x, jnp.int32)}  # noqa: E731
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state(0))
    ck = Checkpointer(tmp_path)
    ck.save(1, state(1), {"step": 1})  # blocking: complete on return
    two = state(2)
    t0 = time.perf_counter()
    ck.save(2, two, {"step": 2}, block=False)
    returned_after = time.perf_counter() - t0
    for x in jax.tree.leaves(two):  # what donating the state to the next update does
        x.delete()
    assert not (tmp_path / "2").exists() and list(tmp_path.glob("2.orbax-checkpoint-tmp*"))  # in flight
    assert ck.steps() == [1, 2]
    assert Checkpointer(tmp_path).steps() == [1]  # a run killed now resumes from step 1
    restored, meta = Checkpointer(tmp_path).restore(abstract)
    assert int(restored["step"]) == 1 and meta == {"step": 1}
    release.set()
    ck.wait()
    assert Checkpointer(tmp_path).steps() == [1, 2]
    restored, meta = Checkpointer(tmp_path).restore(abstract)
    assert int(restored["step"]) == 2 and meta == {"step": 2}
    np.testing.assert_array_equal(restored["w"], np.full((64, 32), 2.0))
    print(f"async save returned after {returned_after * 1e3:.0f} ms with the write held; completed after wait()")


def test_sigkill_while_sampling_and_while_checkpointing_resumes_to_the_same_params(assets, compile_cache, tmp_path):
    """One run, killed twice, against an uninterrupted one (save every step, 4 steps):

    1. SIGKILL as soon as step 1's checkpoint is complete: the run is inside step 2 (sampling,
       scoring, update: step 2 has neither its metrics line nor its checkpoint);
    2. the rerun resumes from step 1, and step 3's asynchronous checkpoint never completes (its
       commit is held, as on slow storage): step 4 still runs (the step after a save does not wait
       for the write) and is logged; SIGKILL then, while step 3's write is in flight;
    3. the rerun resumes from step 2, never from the partial step 3, and finishes.

    The final params equal the uninterrupted run's bit for bit.
    """
    import jax

    common = ("max_steps=4", "save_freq=1", "val_freq=0", "val_before_train=false", "judge.mode=soft")
    ref_run, run = tmp_path / "ref", tmp_path / "run"
    ckpt = run / "checkpoints"
    with _Reap() as reap:
        # The faulty runs start once the reference has compiled its programs (its first step is
        # logged): they find them in the compilation cache.
        ref = reap.add(_train(_args(assets, ref_run, *common), compile_cache))
        _wait_until(lambda: _train_steps_logged(ref_run) or ref.poll() is not None)

        # -- fault 1: inside step 2 --
        proc = reap.add(_train(_args(assets, run, *common), compile_cache))
        _kill_when(lambda: _complete(ckpt, 1), proc)
        ref_out = _finish(ref)
        assert ref.returncode == 0, ref_out[-3000:]
        COUNTS["faults_injected"] += 1
        logged = _train_steps_logged(run)
        # Inside step 2, or just after its metrics line when step 1's asynchronous write outlasted
        # step 2's compute (step 2's save waits for it): either way step 2 has no checkpoint.
        assert logged in ([1], [1, 2]), f"the kill was meant to land inside step 2, metrics say {logged}"
        assert not (ckpt / "2").exists()
        redone = len(logged) - 1  # step 2 logged by the killed run is trained again

        # -- fault 2: step 3's checkpoint in flight while step 4 trains --
        proc = reap.add(_train(_args(assets, run, *common), compile_cache, hold_save_of=3))
        _kill_when(lambda: 4 in _train_steps_logged(run), proc)
        out2 = _output(proc)
        assert "resumed from step 1" in out2, out2[-3000:]
        COUNTS["faults_survived"] += 1
        COUNTS["faults_injected"] += 1
        assert _complete(ckpt, 2) and not (ckpt / "3").exists() and not (ckpt / "4").exists()
        assert list(ckpt.glob("3.orbax-checkpoint-tmp*")), sorted(p.name for p in ckpt.iterdir())
        logged = _train_steps_logged(run)
        # steps 3 and 4 ran; step 3's checkpoint did not make it
        assert sorted(set(logged)) == [1, 2, 3, 4] and len(logged) == 4 + redone, logged
        steps_lost = 4 - 2 + redone

        # -- the rerun: from step 2 (the last complete checkpoint), to the end --
        proc = reap.add(_train(_args(assets, run, *common), compile_cache))
        out3 = _finish(proc)
        assert proc.returncode == 0, out3[-3000:]
        assert "resumed from step 2" in out3 and "resumed from step 3" not in out3, out3[-3000:]
        COUNTS["faults_survived"] += 1

        (s1, a), (s2, b) = _final_params(ref_run, assets.policy), _final_params(run, assets.policy)
        assert s1 == s2 == 4
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        logged = _train_steps_logged(run)
        assert sorted(set(logged)) == [1, 2, 3, 4]
        assert len(logged) - 4 == steps_lost  # steps 3 and 4 (and step 2 if it was logged) trained twice
        COUNTS["steps_lost"] += steps_lost
        print(f"SIGKILL inside step 2, and in step 4 while step 3's asynchronous checkpoint was being written; "
              f"resumed from 1, then 2; {steps_lost} steps redone; final params equal the uninterrupted run's")


# ================================================================================================
# 3. Two processes x 4 CPU devices against one process x 8
# ================================================================================================

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_trainer_two_processes_match_one(assets, compile_cache, tmp_path):
    """`python -m pr1_jax.train ... distributed=true` in 2 processes x 4 devices (the coordinator
    and process ids come from the environment: jax.distributed.initialize() with no arguments reads
    JAX_COORDINATOR_ADDRESS and, for the rest, the Open MPI variables emulated here) against 1 x 8
    with the same global batch: in the reference epoch order (the tiny config's) each process
    reads its slice of every global batch, so both read the same records step by step."""
    import jax

    # Adam turns float noise on a ~0 gradient into a move of up to lr: sums in another order
    # (across processes) moved rarely used embedding rows by 0.14 lr with eps 1e-6 (measured).
    # eps 1e-3 keeps such rows still and the rest moving. The vision tower is frozen (it still
    # encodes the images) to save compile time.
    common = ("max_steps=2", "save_freq=1", "val_freq=0", "val_before_train=false", "judge.mode=soft",
              "learner.eps=1e-3", "learner.freeze_vision=true")
    sp_args = _args(assets, tmp_path / "sp", *common, "data.batch_size=4")

    with _Reap() as reap:
        sp = reap.add(_train(sp_args, compile_cache, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
        port = _free_port()
        procs = [reap.add(_train(_args(assets, tmp_path / "mp", *common, "distributed=true"), compile_cache, env={
            "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "OMPI_MCA_orte_hnp_uri": "0.0;tcp://127.0.0.1:1",
            "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": str(i), "OMPI_COMM_WORLD_LOCAL_RANK": str(i),
            "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"})) for i in range(2)]
        for p in [sp, *procs]:
            out = _finish(p)
            assert p.returncode == 0, out[-4000:]
        (s1, a), (s2, b) = [_final_params(tmp_path / r, assets.policy, other_topology=True) for r in ("sp", "mp")]
        assert s1 == s2 == 2
        worst = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(jax.tree.leaves(a),
                                                                                       jax.tree.leaves(b)))
        # The same samples, rewards and gradients on both topologies, step by step.
        for r1, r2 in zip(*[[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()]
                            for r in ("sp", "mp")]):
            for k in ("overall", "accuracy", "visual", "response_len", "grad_norm", "loss"):
                assert r1[k] == pytest.approx(r2[k], rel=1e-5, abs=1e-6), (r1["step"], k)
        # Same math; the cross-process reductions may sum in another order than the 8-device one.
        assert worst <= 1e-5, worst
        from models import load_pretrained

        moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) for x, y in zip(
            jax.tree.leaves(a), jax.tree.leaves(load_pretrained(assets.policy).params)))
        assert moved > 100 * worst, (moved, worst)  # the updates are real, the difference is noise
    import orbax.checkpoint as ocp

    from pr1_jax.checkpoint import Checkpointer

    # Every process's data position is in the checkpoint: 2 global batches of 2 x 2 records.
    meta = Checkpointer(tmp_path / "mp" / "checkpoints")._manager.restore(
        2, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    assert [(d["batches"], d["global_batch"]) for d in meta["data"]] == [(2, 4), (2, 4)]
    print(f"trainer 2 x 4 devices vs 1 x 8: 2 steps, max |param diff| {worst:.2e}, max |update| {moved:.2e}")

