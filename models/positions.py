"""Host-side (numpy) index computations: 3D M-RoPE positions and the packed-patch layout.

These depend on data (where the images sit, their grids), not on parameters, so they run on the
host once per batch, like transformers does, and enter the jitted model as integer arrays.
Only still images are supported (no video).
"""

from __future__ import annotations

import numpy as np

from models.config import VisionConfig


def text_positions(attention_mask) -> np.ndarray:
    """[B, T] positions counting only real tokens, 0 on left padding (generation semantics)."""
    mask = np.asarray(attention_mask).astype(bool)
    return np.where(mask, np.cumsum(mask, axis=-1) - 1, 0).astype(np.int32)


def rope_index(input_ids, attention_mask, image_grid_thw, *, image_token_id: int, spatial_merge_size: int = 2,
               video_token_id: int | None = None):
    """3D positions of transformers' `get_rope_index` (5.x) for text + image sequences (the same
    for Qwen2-VL, Qwen2.5-VL and Qwen3-VL: they differ on videos only, which are refused: a
    `video_token_id` among the real tokens is an error, not a text token).

    Text tokens advance all three rows together; an image with merged grid (t, h, w) starting at
    position `cur` gets T = cur + frame, H = cur + row, W = cur + col, after which
    cur += max(h, w). Padding gets 0.

    input_ids, attention_mask: [B, T]; image_grid_thw: [n_images, 3] in order of appearance.
    Returns positions [3, B, T] int32 and rope_deltas [B] int32 (max position + 1 - n_valid), so a
    token appended after n real tokens sits at n + delta on every row.
    """
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    grids = iter(np.zeros((0, 3), np.int64) if image_grid_thw is None else np.asarray(image_grid_thw))
    if video_token_id is not None and np.any((ids == video_token_id) & mask):
        raise ValueError("video inputs are not supported: input_ids hold video tokens")
    b, t = ids.shape
    positions = np.zeros((3, b, t), np.int64)
    deltas = np.zeros((b,), np.int64)
    for row in range(b):
        valid = np.flatnonzero(mask[row])
        row_ids = ids[row, valid]
        pos = np.zeros((3, len(valid)), np.int64)
        cur, i = 0, 0
        while i < len(row_ids):
            if row_ids[i] != image_token_id:
                pos[:, i] = cur
                cur, i = cur + 1, i + 1
                continue
            try:
                gt, gh, gw = (int(g) for g in next(grids))
            except StopIteration:
                raise ValueError(f"row {row}: more image token runs than rows in image_grid_thw") from None
            gh, gw = gh // spatial_merge_size, gw // spatial_merge_size
            n = gt * gh * gw
            if i + n > len(row_ids) or np.any(row_ids[i:i + n] != image_token_id):
                raise ValueError(f"row {row}: image at token {i} needs {n} image tokens for grid {gt}x{gh}x{gw}")
            tt, hh, ww = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
            pos[:, i:i + n] = cur + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
            cur, i = cur + max(gh, gw), i + n
        positions[:, row, valid] = pos
        deltas[row] = (pos.max() + 1 if len(valid) else 0) - len(valid)
    if next(grids, None) is not None:
        raise ValueError("image_grid_thw has more rows than there are images in input_ids")
    return positions.astype(np.int32), deltas.astype(np.int32)


def _window_order(gt: int, gh: int, gw: int, window: int):
    """Merge units of one image in window order, and the window id of each (Qwen2.5-VL).

    Windows tile the merged grid in `window x window` blocks; edge windows are partial.
    """
    units = np.arange(gt * gh * gw).reshape(gt, gh, gw)
    nh, nw = -(-gh // window), -(-gw // window)
    order, win = [], []
    wid = 0
    for f in range(gt):
        for a in range(nh):
            for c in range(nw):
                block = units[f, a * window:(a + 1) * window, c * window:(c + 1) * window].ravel()
                order.append(block)
                win.append(np.full(block.shape, wid))
                wid += 1
    return np.concatenate(order), np.concatenate(win), wid


def bilinear_taps(rows, cols, height: int, width: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned `side x side` position grid resampled to a `height x width` patch grid,
    bilinear with aligned corners (torch's `interpolate(align_corners=True)`): for each patch at
    (rows, cols), the flat indices [n, 4] of its four grid taps and their weights [n, 4] fp32,
    computed in fp32 in transformers' order of operations so the weights match bit for bit."""
    def axis(index, size):
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0)
        return taps, weights.astype(np.float32)

    h_taps, h_w = axis(np.asarray(rows), height)
    w_taps, w_w = axis(np.asarray(cols), width)
    index = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    return index, (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)


def vision_layout(image_grid_thw, num_patches: int, cfg: VisionConfig) -> dict[str, np.ndarray]:
    """The integer fields of `VisionInputs` for images with grids `image_grid_thw`, padded to
    `num_patches` rows (a multiple of merge**2). Patches come in HF order: per image, per frame,
    block-major over merge x merge blocks."""
    m = cfg.spatial_merge_size
    unit = m * m
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    real = int(grids.prod(-1).sum())
    if num_patches % unit or num_patches < real:
        raise ValueError(f"num_patches={num_patches} must be a multiple of {unit} and >= {real} (the images' patches)")
    rot, seg_full, unit_order, unit_win, taps = [], [], [], [], []
    side = int(round(cfg.num_position_embeddings**0.5))
    frame, n_units, n_windows = 0, 0, 0
    window = cfg.window_size // m // cfg.patch_size
    for gt, gh, gw in grids:
        hpos, wpos = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
        block = lambda a: a.reshape(gh // m, m, gw // m, m).transpose(0, 2, 1, 3).ravel()  # noqa: E731
        rot.append(np.tile(np.stack([block(hpos), block(wpos)], -1), (gt, 1)))
        if cfg.kind == "qwen3_vl":
            taps.append([np.tile(a, (gt, 1)) for a in bilinear_taps(block(hpos), block(wpos), gh, gw, side)])
        seg_full.append(np.repeat(frame + np.arange(gt), gh * gw))
        frame += gt
        if cfg.kind == "qwen2_5_vl":
            order, win, count = _window_order(gt, gh // m, gw // m, window)
        else:
            order, win, count = np.arange(gt * gh * gw // unit), np.repeat(np.arange(gt), gh * gw // unit), gt
        unit_order.append(order + n_units)
        unit_win.append(win + n_windows)
        n_units += gt * gh * gw // unit
        n_windows += count
    pad_units = num_patches // unit - n_units
    unit_order.append(n_units + np.arange(pad_units))
    unit_win.append(np.full(pad_units, n_windows))
    order = np.concatenate(unit_order).astype(np.int64)
    perm = (order[:, None] * unit + np.arange(unit)).ravel()
    rot_pos = np.concatenate(rot + [np.zeros((num_patches - real, 2), np.int64)])
    seg = np.concatenate(seg_full + [np.full(num_patches - real, frame)])
    extra = {}
    if cfg.kind == "qwen3_vl":
        pad = num_patches - real
        index = np.concatenate([t[0] for t in taps] + [np.zeros((pad, 4), np.int64)])
        extra["pos_index"] = index[perm].astype(np.int32)
        extra["pos_weight"] = np.concatenate([t[1] for t in taps] + [np.zeros((pad, 4), np.float32)])[perm]
    return dict(
        **extra,
        perm=perm.astype(np.int32),
        rot_pos=rot_pos[perm].astype(np.int32),
        seg_full=seg[perm].astype(np.int32),
        seg_window=np.repeat(np.concatenate(unit_win), unit).astype(np.int32),
        unperm=np.argsort(order).astype(np.int32),
    )


def row_images(input_ids, attention_mask, image_grid_thw, *, image_token_id: int, spatial_merge_size: int = 2
               ) -> list[range]:
    """Which rows of `image_grid_thw` (images in order of appearance) belong to each batch row,
    from the rows' image-token counts."""
    ids, mask = np.asarray(input_ids), np.asarray(attention_mask)
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    counts = ((ids == image_token_id) & mask.astype(bool)).sum(-1)
    tokens = grids.prod(-1) // (spatial_merge_size ** 2)
    out, g = [], 0
    for b, want in enumerate(counts):
        start, have = g, 0
        while have < want:
            if g >= len(grids):
                raise ValueError(f"row {b}: {want} image tokens but image_grid_thw runs out")
            have += int(tokens[g])
            g += 1
        if have != want:
            raise ValueError(f"row {b}: {want} image tokens do not match its images' grids")
        out.append(range(start, g))
    if g != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} images, the rows use {g}")
    return out


def row_vision_arrays(input_ids, attention_mask, pixel_values, image_grid_thw, num_patches: int | None,
                      cfg: VisionConfig, *, image_token_id: int) -> dict[str, np.ndarray]:
    """The fields of a per-row `VisionInputs` (leading [B] axis): row b holds its own images'
    patches, padded to `num_patches` rows (default: the largest row's count), so the vision
    tower attends within a row ([B, P, P]) instead of over a whole batch's packed patches
    ([B*P, B*P]), and the rows can be sharded like the batch.

    pixel_values: [patches, patch_dim] of all rows' images packed in order of appearance (the
    data pipeline's layout; rows past the real patches are ignored); image_grid_thw: [images, 3]
    real images only."""
    m = cfg.spatial_merge_size
    grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
    pv = np.asarray(pixel_values, np.float32)
    offsets = np.concatenate([[0], np.cumsum(grids.prod(-1))])
    rows = row_images(input_ids, attention_mask, grids, image_token_id=image_token_id, spatial_merge_size=m)
    per_row = [int(offsets[g.stop] - offsets[g.start]) for g in rows]
    if num_patches is None:
        num_patches = max(max(per_row), m * m)
    if num_patches % (m * m) or num_patches < max(per_row):
        raise ValueError(f"num_patches={num_patches} per row must be a multiple of {m * m} "
                         f"and >= {max(per_row)} (the largest row's patches)")
    fields = []
    for g in rows:
        x = np.zeros((num_patches, pv.shape[1]), np.float32)
        x[:offsets[g.stop] - offsets[g.start]] = pv[offsets[g.start]:offsets[g.stop]]
        fields.append(dict(pixel_values=x, **vision_layout(grids[g.start:g.stop], num_patches, cfg)))
    return {k: np.stack([f[k] for f in fields]) for k in fields[0]}
