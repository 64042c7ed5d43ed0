"""The grain pipeline: static shapes, HF parity per row, order determinism, sharding,
resume-from-state, worker processes, and bad-record skipping / strict mode."""

import dataclasses
import io
import json
import logging
from pathlib import Path

import grain
import numpy as np
import pytest
from PIL import Image

from pr1_jax.data import records as rec
from pr1_jax.data import sample
from pr1_jax.data.batching import ARRAY_KEYS, bucket_length, split_batch
from pr1_jax.data.config import DataConfig
from pr1_jax.data.order import DataStateError, ReferenceOrder, ReferencePlan, state_for_process, steps_per_epoch
from pr1_jax.data.pipeline import make_dataset, make_iterator
from pr1_jax.data.processing import build_messages, load_tokenizer, make_image_processor

TOKENIZER_DIR = Path(__file__).parent / "fixtures" / "qwen2_tokenizer"
SAMPLE_IDS = sorted(json.loads(line)["id"] for line in Path(sample.SAMPLE_JSONL).read_text().splitlines())
N = len(SAMPLE_IDS)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TOKENIZER_DIR)


def cfg(**kw) -> DataConfig:
    base = dict(paths=sample.SAMPLE_PARQUET, tokenizer_path=str(TOKENIZER_DIR), batch_size=2,
                max_prompt_length=1024, length_buckets=(256, 512, 1024), patch_rows_per_batch=2 * 1024,
                num_epochs=1, seed=3, shard_index=0, shard_count=1, read_threads=2)
    base.update(kw)
    return DataConfig(**base)


def ids_of(batches):
    return [rid for b in batches for rid, ok in zip(b["record_id"], b["example_valid"]) if ok]


def run(config, tokenizer, n=None):
    it = make_iterator(config, tokenizer)
    out = []
    for b in it:
        out.append(b)
        if n is not None and len(out) == n:
            break
    return out, it


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["record_id"] == y["record_id"]
        for k in ARRAY_KEYS:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---- shapes + parity ----------------------------------------------------------------------

def test_batch_layout_and_hf_parity_per_row(tokenizer):
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    class _NoVideo(Qwen2VLProcessor):
        def check_argument_for_proper_class(self, name, arg):
            return type(None) if name == "video_processor" and arg is None else super().check_argument_for_proper_class(name, arg)

    config = cfg(batch_size=3, patch_rows_per_batch=3 * 1024, images_per_batch=4, drop_remainder=False)
    hf = _NoVideo(image_processor=make_image_processor(config), tokenizer=tokenizer, video_processor=None,
                  chat_template=tokenizer.chat_template)
    good, _ = rec.read_records(config)
    by_id = {r.id: r for r in good}
    batches, _ = run(config, tokenizer)
    assert len(batches) == 3  # 8 records, batch 3, last batch padded
    for b in batches:
        B, T = b["input_ids"].shape
        assert B == 3 and T in config.buckets
        assert b["pixel_values"].shape == (3 * 1024, 1176) and b["pixel_values"].dtype == np.float32
        assert b["image_grid_thw"].shape == (4, 3) and b["image_grid_thw"].dtype == np.int32
        for k in ("input_ids", "attention_mask", "mm_token_type_ids"):
            assert b[k].dtype == np.int32 and b[k].shape == (B, T)
        lengths = b["attention_mask"].sum(1)
        assert T == bucket_length(int(lengths.max()), config.buckets)
        p = i = 0
        for row in range(B):
            if not b["example_valid"][row]:
                assert lengths[row] == 0 and (b["input_ids"][row] == tokenizer.pad_token_id).all()
                assert b["record_id"][row] == "" and b["answer"][row] == ""
                continue
            L = int(lengths[row])
            # left padding: pads first, then the prompt
            np.testing.assert_array_equal(b["attention_mask"][row], np.r_[np.zeros(T - L), np.ones(L)])
            assert (b["input_ids"][row, :T - L] == tokenizer.pad_token_id).all()
            r = by_id[b["record_id"][row]]
            img = r.images[0].open()
            text = hf.apply_chat_template(build_messages(r.problem, 1, config), tokenize=False,
                                          add_generation_prompt=True)
            ref = hf(text=[text], images=[img], return_tensors="np")
            np.testing.assert_array_equal(b["input_ids"][row, T - L:], ref["input_ids"][0])
            np.testing.assert_array_equal(b["mm_token_type_ids"][row, T - L:], ref["mm_token_type_ids"][0])
            assert (b["mm_token_type_ids"][row, :T - L] == 0).all()
            np.testing.assert_array_equal(b["image_grid_thw"][i], ref["image_grid_thw"][0])
            assert b["image_valid"][i] and b["image_example_index"][i] == row
            n = ref["pixel_values"].shape[0]
            np.testing.assert_array_equal(b["pixel_values"][p:p + n], ref["pixel_values"])
            assert b["patch_valid"][p:p + n].all() and (b["patch_image_index"][p:p + n] == i).all()
            assert b["answer"][row] == r.answer and b["annotations"][row] == list(r.annotations)
            p, i = p + n, i + 1
        assert not b["patch_valid"][p:].any() and (b["pixel_values"][p:] == 0).all()
        assert (b["patch_image_index"][p:] == -1).all()
        assert not b["image_valid"][i:].any() and (b["image_grid_thw"][i:] == 0).all()
        assert (b["image_example_index"][i:] == -1).all()
    arrays, meta = split_batch(batches[0])
    assert set(arrays) == set(ARRAY_KEYS) and "answer" in meta and "skipped" in meta
    assert sorted(ids_of(batches)) == SAMPLE_IDS


def test_drop_remainder_and_default_buckets(tokenizer):
    batches, _ = run(cfg(batch_size=3, patch_rows_per_batch=3 * 1024, length_buckets=None), tokenizer)
    assert len(batches) == N // 3 and all(b["example_valid"].all() for b in batches)
    assert cfg(length_buckets=None).buckets == (64, 128, 256, 512, 1024)
    assert DataConfig().buckets[-1] == 4096 and DataConfig().patch_rows == 8 * 9216


# ---- order -------------------------------------------------------------------------------

def test_shuffle_is_seeded_and_deterministic(tokenizer):
    a, _ = run(cfg(seed=1), tokenizer)
    b, _ = run(cfg(seed=1), tokenizer)
    assert_batches_equal(a, b)
    c, _ = run(cfg(seed=2), tokenizer)
    assert ids_of(a) != ids_of(c) and sorted(ids_of(c)) == SAMPLE_IDS
    plain, _ = run(cfg(shuffle=False), tokenizer)
    good, _ = rec.read_records(cfg())
    assert ids_of(plain) == [r.id for r in good]  # file order
    assert ids_of(a) != ids_of(plain)


def test_epochs_reshuffle_and_cover_everything(tokenizer):
    batches, _ = run(cfg(num_epochs=3, batch_size=4, patch_rows_per_batch=4 * 1024), tokenizer)
    ids = ids_of(batches)
    assert len(ids) == 3 * N
    epochs = [ids[k * N:(k + 1) * N] for k in range(3)]
    assert all(sorted(e) == SAMPLE_IDS for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new order every epoch
    one, _ = run(cfg(num_epochs=1, batch_size=4, patch_rows_per_batch=4 * 1024), tokenizer)
    assert ids_of(one) == epochs[0]
    inf = make_iterator(cfg(num_epochs=None, batch_size=4, patch_rows_per_batch=4 * 1024), tokenizer)
    assert [next(inf)["record_id"] for _ in range(8)][:6] == [b["record_id"] for b in batches]


@pytest.mark.parametrize("count", [2, 3])
def test_shards_are_disjoint_equal_and_deterministic(tokenizer, count):
    shards = [ids_of(run(cfg(shard_index=k, shard_count=count, batch_size=1, patch_rows_per_batch=1024),
                         tokenizer)[0]) for k in range(count)]
    assert all(len(s) == N // count for s in shards)  # remainder dropped: equal shards
    flat = [x for s in shards for x in s]
    assert len(set(flat)) == len(flat) == count * (N // count)
    again = ids_of(run(cfg(shard_index=1, shard_count=count, batch_size=1, patch_rows_per_batch=1024),
                       tokenizer)[0])
    assert again == shards[1]


def test_default_shard_is_the_jax_process():
    import jax

    from pr1_jax.data.pipeline import shard_options

    opts = shard_options(DataConfig())
    assert (opts.shard_index, opts.shard_count) == (jax.process_index(), jax.process_count())


# ---- the reference epoch order -----------------------------------------------------------

def test_reference_order_at_the_paper_shape():
    """1,442 records, 16 prompts per process x 8 processes (the paper configs): each epoch is one
    permutation of all records cut into 11 global batches of 128 (34 left out), 25 epochs are
    275 steps; no record twice in a step or an epoch, a new permutation every epoch, every
    record reached, and process p's batch is slice p of the global batch that one process
    reading 128 at a time gets."""
    n, per_process, processes, epochs = 1442, 16, 8, 25
    config = DataConfig(batch_size=per_process, num_epochs=epochs, seed=1, epoch_order="reference")
    assert steps_per_epoch(n, config, processes) == 11 and steps_per_epoch(n, config, processes) * epochs == 275

    def stream(index, count, batch, length=None):
        order = ReferenceOrder(grain.MapDataset.range(n), ReferencePlan(n, batch, index, count, 1, True, epochs))
        return np.asarray(order._getitems(range(length or len(order))))

    per = np.stack([stream(p, processes, per_process) for p in range(processes)])
    assert per.shape == (processes, 275 * per_process)
    steps = per.reshape(processes, 275, per_process).transpose(1, 0, 2).reshape(275, 128)
    assert all(len(set(step)) == 128 for step in steps)
    by_epoch = steps.reshape(epochs, 11 * 128)
    assert all(len(set(e)) == 11 * 128 for e in by_epoch) and len({tuple(e) for e in by_epoch}) == epochs
    assert set(by_epoch.ravel()) == set(range(n))
    np.testing.assert_array_equal(stream(0, 1, 128, 2 * 11 * 128), steps[:22].ravel())  # two epochs


def test_reference_order_through_the_pipeline(tokenizer):
    """The 8-record sample read by 3 processes x 1 prompt: 2 global batches of 3 per epoch, each
    process its slice of the plan; a checkpoint taken mid-epoch resumes exactly on 1 process x 3
    (the same global batch), within the epoch and across its end; another global batch, or a
    streaming checkpoint on another process count, stops with a clear error."""
    def config(index, count, **kw):
        return cfg(epoch_order="reference", num_epochs=3, shard_index=index, shard_count=count, **kw)

    records = [r.id for r in rec.read_records(cfg())[0]]  # file order = RecordSource order
    plan = [ReferenceOrder(grain.MapDataset.range(N), ReferencePlan(N, 1, p, 3, 3, True, 3)) for p in range(3)]
    its = [make_iterator(config(p, 3, batch_size=1, patch_rows_per_batch=1024), tokenizer) for p in range(3)]
    states, steps = [], []
    for _ in range(6):
        states.append(json.loads(json.dumps([it.get_state() for it in its])))
        steps.append([next(it)["record_id"][0] for it in its])
    assert all(next(it, None) is None for it in its)
    assert steps == [[records[plan[p][s]] for p in range(3)] for s in range(6)]
    assert all(len(set(step)) == 3 for step in steps)
    one = config(0, 1, batch_size=3, patch_rows_per_batch=3 * 1024)
    for k in (1, 3):  # mid-epoch (the rest crosses the epoch's end), mid-epoch 2
        rest = list(make_iterator(one, tokenizer, state=state_for_process(states[k], 0, 1)))
        assert [b["record_id"] for b in rest] == steps[k:]
    with pytest.raises(DataStateError, match="global batches of 3"):
        make_iterator(config(0, 1, batch_size=2, patch_rows_per_batch=2 * 1024), tokenizer, state=states[1][0])
    streaming = [make_iterator(cfg(shard_index=p, shard_count=2), tokenizer).get_state() for p in range(2)]
    with pytest.raises(DataStateError, match="resumes on as many processes"):
        state_for_process(streaming, 0, 1)
    with pytest.raises(DataStateError, match="streaming order"):
        make_iterator(one, tokenizer, state=streaming[0])


def test_reference_order_keeps_a_skipped_records_place(tokenizer, tmp_path):
    """A record that fails leaves an invalid row where it stood (counted, logged), so every
    batch is its own positions; a batch of bad records only is all filler rows."""
    config = dataclasses.replace(bad_config(tmp_path), epoch_order="reference")
    batches, it = run(config, tokenizer)
    assert len(batches) == 9  # 18 rows, 2 a batch
    for b in batches:
        assert b["example_valid"].shape == (2,) and int(b["example_valid"].sum()) + len(b["skipped"]) == 2
    assert not batches[1]["example_valid"].any() and batches[1]["record_id"] == ["", ""]
    assert batches[1]["skipped"] == [("bad-corrupt", rec.BAD_IMAGE), ("bad-truncated", rec.BAD_IMAGE)]
    assert ids_of(batches) == sample_ids_in_file_order()
    assert dict(s for b in batches for s in b["skipped"]) == BAD_ROWS
    assert sum(it.skip_counts.values()) == len(BAD_ROWS)


# ---- resume ------------------------------------------------------------------------------

def test_resume_from_state_gives_the_same_batches(tokenizer):
    config = cfg(num_epochs=3, batch_size=3, patch_rows_per_batch=3 * 1024)
    full, _ = run(config, tokenizer)
    assert len(full) == 8
    for k in (0, 2, 3, 5):  # including across epoch boundaries (8 records per epoch, batches of 3)
        it = make_iterator(config, tokenizer)
        for _ in range(k):
            next(it)
        state = json.loads(json.dumps(it.get_state()))  # checkpoints are JSON
        rest = list(make_iterator(config, tokenizer, state=state))
        assert_batches_equal(rest, full[k:])


def test_resume_restores_skip_counters(tokenizer, tmp_path):
    config = dataclasses.replace(bad_config(tmp_path), shuffle=True, num_epochs=2)
    it = make_iterator(config, tokenizer)
    next(it)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    rest_a = list(it)
    it2 = make_iterator(config, tokenizer, state=state)
    assert it2.skip_counts == state["skip_counts"]
    rest_b = list(it2)
    assert_batches_equal(rest_a, rest_b)
    assert it.skip_counts == it2.skip_counts
    assert sum(it.skip_counts.values()) == 2 * len(BAD_ROWS)


def test_worker_processes_match_in_process(tokenizer):
    """worker_count > 0 gives the batches of worker_count = 0; a fresh worker iterator
    restored from a mid-stream state continues with the same batches."""
    config = cfg(num_epochs=2, batch_size=3, patch_rows_per_batch=3 * 1024, read_threads=1)
    ref, _ = run(config, tokenizer)
    wconfig = dataclasses.replace(config, worker_count=2, worker_buffer_size=2)
    it = iter(make_dataset(wconfig))  # workers load the tokenizer themselves, from tokenizer_path
    try:
        first = [next(it) for _ in range(2)]
        state = json.loads(json.dumps(it.get_state()))
        rest = list(it)
    finally:
        it.close()
    assert_batches_equal(first + rest, ref)
    it = make_iterator(wconfig, state=state)
    try:
        assert_batches_equal(list(it), ref[2:])
    finally:
        it.close()


# ---- bad records -------------------------------------------------------------------------

def _png_bytes(w, h):
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (255, 255, 255)).save(buf, format="PNG")
    return buf.getvalue()


BAD_ROWS = {
    "bad-corrupt": rec.BAD_IMAGE,
    "bad-truncated": rec.BAD_IMAGE,
    "bad-missing-file": rec.BAD_IMAGE,
    "bad-no-answer": rec.MISSING_ANSWER,
    "bad-empty-problem": rec.EMPTY_PROBLEM,
    "bad-too-long": rec.PROMPT_TOO_LONG,
    "bad-too-many-patches": rec.TOO_MANY_PATCHES,
    "bad-two-images": rec.TOO_MANY_IMAGES,
    "bad-no-image": rec.MISSING_IMAGE,
    "records:11": rec.INVALID_RECORD,  # a malformed JSON line is reported by file and line
}


def good_rows() -> list[dict]:
    """The sample's JSONL rows, image paths made absolute (so they can be written anywhere)."""
    good = [json.loads(line) for line in Path(sample.SAMPLE_JSONL).read_text().splitlines()]
    for g in good:
        g["image"] = str(Path(sample.SAMPLE_DIR) / g["image"])
    return good


def jsonl_cfg(path, **kw) -> DataConfig:
    return cfg(paths=str(path), image_column="image", annotations_column="annotations", **kw)


def bad_config(tmp_path) -> DataConfig:
    """A JSONL file mixing the sample's good records with one record of each bad kind."""
    good = good_rows()
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    png = _png_bytes(300, 300)
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    (tmp_path / "huge.png").write_bytes(_png_bytes(1400, 1400))
    img = good[0]["image"]
    base = {"problem": "Find x.", "answer": "1", "annotations": ["AB = 1."]}
    rows = [
        good[0], good[1],
        {**base, "id": "bad-corrupt", "image": "corrupt.png"},
        {**base, "id": "bad-truncated", "image": "truncated.png"},
        good[2],
        {**base, "id": "bad-missing-file", "image": "no/such/file.png"},
        {**base, "id": "bad-no-answer", "image": img, "answer": ""},
        {**base, "id": "bad-empty-problem", "image": img, "problem": "   "},
        {**base, "id": "bad-too-long", "image": img, "problem": "Find x. " * 900},
        good[3],
        '{"id": "broken", "problem": "Find x.", ',  # line 11: malformed JSON
        {**base, "id": "bad-too-many-patches", "image": "huge.png"},
        {**base, "id": "bad-two-images", "image": [img, img]},
        {**base, "id": "bad-no-image"},
        *good[4:],
    ]
    path = tmp_path / "records.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return jsonl_cfg(path, shuffle=False, batch_size=2, patch_rows_per_batch=2 * 1024, max_prompt_length=1024)


def test_bad_records_are_skipped_counted_and_logged(tokenizer, tmp_path, caplog):
    config = bad_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pr1_jax.data.pipeline"):
        batches, it = run(config, tokenizer)
    assert ids_of(batches) == sample_ids_in_file_order()
    expected = {}
    for reason in BAD_ROWS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert it.skip_counts == expected
    skipped = [s for b in batches for s in b["skipped"]]
    assert dict(skipped) == BAD_ROWS
    for rid, reason in BAD_ROWS.items():
        assert any(rid in m and reason in m for m in caplog.messages), (rid, reason)
    # the counters are exposed in the checkpoint state as well
    assert it.get_state()["skip_counts"] == expected


def sample_ids_in_file_order():
    return [json.loads(line)["id"] for line in Path(sample.SAMPLE_JSONL).read_text().splitlines()]


def test_strict_mode_raises_naming_the_record(tokenizer, tmp_path):
    config = dataclasses.replace(bad_config(tmp_path), strict=True)
    it = make_iterator(config, tokenizer)
    first = next(it)  # good[0], good[1]
    assert first["record_id"] == sample_ids_in_file_order()[:2]
    with pytest.raises(rec.BadRecordError, match="bad-corrupt") as e:
        next(it)
    assert e.value.reason == rec.BAD_IMAGE and e.value.record_id == "bad-corrupt"


@pytest.mark.parametrize("rid,reason", [(k, v) for k, v in BAD_ROWS.items()])
def test_strict_mode_each_kind(tokenizer, tmp_path, rid, reason):
    config = bad_config(tmp_path)
    rows = [line for line in Path(config.paths).read_text().splitlines()]
    bad_line = rows[10] if rid == "records:11" else next(r for r in rows if f'"id": "{rid}"' in r)
    (tmp_path / "one.jsonl").write_text(rows[0] + "\n" + bad_line + "\n")  # a good record, then the bad one
    one = dataclasses.replace(config, paths=str(tmp_path / "one.jsonl"), strict=True, batch_size=2)
    with pytest.raises(rec.BadRecordError) as e:
        next(make_iterator(one, tokenizer))
    expected_id = "one:2" if rid == "records:11" else rid
    assert e.value.reason == reason and e.value.record_id == expected_id and expected_id in str(e.value)
    assert str(e.value).endswith(f" at {tmp_path / 'one.jsonl'}:2")


@pytest.mark.parametrize("strict", [False, True])
def test_skips_name_file_and_line_after_blank_lines(tokenizer, tmp_path, caplog, strict):
    """Blank and whitespace-only lines hold no record but are lines: a skip names the file and the
    line as an editor shows it (from 1), CRLF line ends included, strict or not; a row without
    an id is called "<file stem>:<line>"."""
    good = good_rows()
    base = {"problem": "Find x.", "answer": "", "image": good[0]["image"]}
    lines = [json.dumps(good[0]), "", "   ", json.dumps({**base, "id": "no-answer"}), "", "\t",
             '{"problem": "Find x.", ', json.dumps(good[1])]
    path = tmp_path / "records.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    expected = [("no-answer", rec.MISSING_ANSWER, 4), ("records:7", rec.INVALID_RECORD, 7)]
    config = jsonl_cfg(path, shuffle=False, batch_size=1, strict=strict)
    if strict:
        for rid, reason, line in expected:
            it = make_iterator(config, tokenizer)
            with pytest.raises(rec.BadRecordError) as e:
                while True:
                    next(it)
            assert (e.value.record_id, e.value.reason, e.value.location) == (rid, reason, f"{path}:{line}")
            assert f" at {path}:{line}" in str(e.value)
            lines[line - 1] = json.dumps(good[2])  # fixed: the next run reaches the next bad line
            path.write_text("\n".join(lines) + "\n")
        return
    with caplog.at_level(logging.WARNING, logger="pr1_jax.data.pipeline"):
        batches, it = run(config, tokenizer)
    assert ids_of(batches) == [good[0]["id"], good[1]["id"]]
    assert [s for b in batches for s in b["skipped"]] == [(rid, reason) for rid, reason, _ in expected]
    for rid, reason, line in expected:
        assert any(f"{rid!r}: {reason}" in m and m.endswith(f" at {path}:{line}") for m in caplog.messages), rid
    _, bad = rec.read_records(config)
    assert [(e.record_id, e.location) for e in bad] == [(rid, f"{path}:{line}") for rid, _, line in expected]


def _write_with_duplicates(tmp_path) -> tuple[Path, list[dict]]:
    """good[0], good[1], a row with good[0]'s id (line 3), good[3], good[1] again (line 5)."""
    good = good_rows()
    rows = [good[0], good[1], {**good[2], "id": good[0]["id"]}, good[3], good[1]]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, good


def test_duplicate_ids_are_skipped_counted_and_named(tokenizer, tmp_path, caplog):
    """A repeated id is a counted `duplicate_id` skip naming both places; the first row holding
    the id (in file order) is delivered, every epoch (epoch 2 repeats a record, not an id)."""
    path, good = _write_with_duplicates(tmp_path)
    config = jsonl_cfg(path, shuffle=True, num_epochs=2, batch_size=1)
    with caplog.at_level(logging.WARNING, logger="pr1_jax.data.pipeline"):
        batches, it = run(config, tokenizer)
    kept = [good[0]["id"], good[1]["id"], good[3]["id"]]
    ids = ids_of(batches)
    assert sorted(ids[:3]) == sorted(ids[3:]) == sorted(kept)
    assert it.skip_counts == {rec.DUPLICATE_ID: 4}
    problem_of = {b["record_id"][0]: b["problem"][0] for b in batches}
    assert problem_of[good[0]["id"]] == good[0]["problem"]  # not the later row's
    for first, again in ((1, 3), (2, 5)):
        assert any(rec.DUPLICATE_ID in m and f"{path}:{first}" in m and m.endswith(f" at {path}:{again}")
                   for m in caplog.messages), (first, again)


def test_duplicate_ids_across_shards_are_delivered_once(tokenizer, tmp_path):
    path, good = _write_with_duplicates(tmp_path)
    shards = [ids_of(run(jsonl_cfg(path, shard_index=k, shard_count=2, batch_size=1), tokenizer)[0])
              for k in range(2)]
    assert sorted(shards[0]) == sorted([good[0]["id"], good[1]["id"]])
    assert shards[1] == [good[3]["id"]]  # its other rows repeat ids of rows in shard 0


def test_duplicate_ids_in_strict_mode_stop_at_start_naming_both_places(tokenizer, tmp_path):
    path, good = _write_with_duplicates(tmp_path)
    with pytest.raises(rec.BadRecordError) as e:
        next(make_iterator(jsonl_cfg(path, strict=True), tokenizer))
    assert e.value.reason == rec.DUPLICATE_ID and e.value.record_id == good[0]["id"]
    assert f"{path}:1" in str(e.value) and str(e.value).endswith(f" at {path}:3")


def test_truncations_are_counted_logged_and_restored(tokenizer, tmp_path, caplog):
    """With data.truncation set, an over-long prompt is delivered shortened, listed in the batch's
    `truncated` (id, tokens removed), logged and counted (per epoch, in the iterator state)."""
    good = good_rows()
    long = {**good[1], "id": "long", "problem": "Find x. " * 900}
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good[0], long, good[2], good[3]]))
    config = jsonl_cfg(path, truncation="right", shuffle=False, num_epochs=2, batch_size=2)
    with caplog.at_level(logging.INFO, logger="pr1_jax.data.pipeline"):
        batches, it = run(config, tokenizer)
    assert ids_of(batches) == 2 * [good[0]["id"], "long", good[2]["id"], good[3]["id"]]
    assert it.skip_counts == {} and it.truncation_count == 2
    truncated = [t for b in batches for t in b["truncated"]]
    assert [rid for rid, _ in truncated] == ["long", "long"] and all(n > 1000 for _, n in truncated)
    assert batches[0]["attention_mask"][1].sum() <= config.max_prompt_length
    assert any("'long'" in m and "right" in m for m in caplog.messages)
    it = make_iterator(config, tokenizer)
    next(it)
    state = json.loads(json.dumps(it.get_state()))
    assert state["truncation_count"] == 1
    assert make_iterator(config, tokenizer, state=state).truncation_count == 1


def test_bad_image_bytes_in_parquet_are_skipped(tokenizer, tmp_path):
    good, _ = rec.read_records(cfg())
    broken = rec.Record("pq-broken", "Find x.", "1", (rec.ImageRef(data=b"\x89PNG garbage"),), ("a",))
    rec.write_parquet([good[0], broken, good[1]], str(tmp_path / "x.parquet"))
    batches, it = run(cfg(paths=str(tmp_path / "x.parquet"), shuffle=False), tokenizer)
    assert ids_of(batches) == [good[0].id, good[1].id]
    assert it.skip_counts == {rec.BAD_IMAGE: 1} and batches[0]["skipped"] == [("pq-broken", rec.BAD_IMAGE)]


def test_config_validation_and_derived_sizes():
    with pytest.raises(ValueError, match="multiple of 4"):
        DataConfig(patch_rows_per_batch=1001)
    with pytest.raises(ValueError):
        DataConfig(length_buckets=(512, 256))
    with pytest.raises(ValueError):
        DataConfig(format_prompt_placement="assistant")
    for bad in (dict(epoch_order="global"), dict(epoch_order="reference", drop_remainder=False),
                dict(image_alpha="black"), dict(unplaced_images="last")):
        with pytest.raises(ValueError):
            DataConfig(**bad)
    c = DataConfig(batch_size=3, patch_rows_per_batch=1000, max_patches_per_record=999)
    assert c.patch_limit_per_record == 332  # min(1000 // 3, 999) rounded down to a multiple of 4
    assert DataConfig(length_buckets=(128, 256), max_prompt_length=300).buckets == (128, 256, 300)
    paper = DataConfig()
    assert (paper.min_pixels, paper.max_pixels, paper.max_prompt_length) == (3136, 1806336, 4096)
    assert paper.max_patches_per_image == 9216  # a 1344x1344 image: 96*96 patches
    # 56*56 both ways: a square image gives 16 patch rows, a 1 x 197 one 116 (28 x 812 pixels)
    tight = DataConfig(min_pixels=3136, max_pixels=3136)
    assert tight.max_patches_per_image == 116 and tight.patch_rows == 8 * 116
    capped = dataclasses.replace(tight, max_patches_per_record=18)  # the buffer shrinks with the cap
    assert capped.patch_rows == 8 * 16 and capped.patch_limit_per_record == 16
    with pytest.raises(ValueError, match="max_patches_per_record"):
        DataConfig(max_patches_per_record=2)
