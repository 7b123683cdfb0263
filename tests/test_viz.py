"""Token maps: greyed, merged and kept patches at the right places; one panel per stage."""

from __future__ import annotations

import numpy as np
import torch
from conftest import make_vit

import tokenreduce as tr
from tokenreduce.viz import GREY, patch_owner, render_token_map, visualize


def test_known_token_map_is_painted_at_the_right_patches():
    # 2×2 grid of 4×4-pixel patches; class token + 4 patches.
    # Token 0 = class, token 1 = patch 0 alone, token 2 = patches 1 and 3 merged; patch 2 pruned.
    source = torch.tensor(
        [[1, 0, 0, 0, 0],
         [0, 1, 0, 0, 0],
         [0, 0, 1, 0, 1]], dtype=torch.float32
    )
    owner, size = patch_owner(source, num_prefix=1)
    assert owner.tolist() == [1, 2, -1, 2]
    assert size.tolist() == [1, 2, 0, 2]
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    panel = render_token_map(image, owner, size, (2, 2))
    assert panel.shape == image.shape
    assert np.array_equal(panel[:4, :4], image[:4, :4])  # kept alone: untouched
    assert (panel[4:, :4] == GREY.astype(np.uint8)).all()  # pruned: grey
    merged = panel[:, 4:][[1, 2, 5, 6]][:, 1:3]  # inside of the merged cells (away from outlines)
    assert (merged == merged[0, 0]).all()  # one colour for the whole group
    assert not np.array_equal(merged[0, 0], GREY.astype(np.uint8))
    assert (panel[0, 4:8] == 0).all()  # top outline of the merged group


def test_visualize_has_one_panel_per_stage_and_greys_pruned_patches():
    model = make_vit()
    x = torch.randn(1, 3, 64, 64)
    img = visualize(model, x, "random", keep_rate=0.5)
    # input + 3 reduction blocks; panels are 64 px upscaled ×3 = 192 px, 4 px gaps, 14 px labels
    assert img.size == (4 * 192 + 3 * 4, 192 + 14)
    arr = np.asarray(img)[14:]
    last = arr[:, 3 * 196 : 3 * 196 + 192]
    grey_cells = sum(
        (last[gy * 24 + 2 : gy * 24 + 22, gx * 24 + 2 : gx * 24 + 22] == 128).all()
        for gy in range(8) for gx in range(8)
    )
    kept = tr.stats(model).blocks[-1].tokens_out - 1
    assert grey_cells == 64 - kept
    # the model keeps the method, with source tracing on
    assert tr.last_forward(model).source is not None


def test_visualize_tome_shows_merged_groups_and_reuses_applied_method():
    model = make_vit()
    tr.apply(model, "tome", r=8)
    img = visualize(model, torch.randn(3, 64, 64))
    assert img.size[0] == 13 * 192 + 12 * 4  # input + 12 merging blocks
    assert tr.reducer(model).config()["r"] == 8
