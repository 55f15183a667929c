"""Options: a bad value is one line naming the option, the value and what it must be."""

from __future__ import annotations

import pytest

from conftest import caltech, one_error, options


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("bad", "says"),
    [
        (["--data.batch_size", "0"], "data.batch_size 0"),
        (["--data.feature_batch_size", "0"], "data.feature_batch_size 0"),
        (["--data.num_workers", "-1"], "data.num_workers -1"),
        (["--data.split", "[70, -10, 40]"], "data.split [70.0, -10.0, 40.0]"),
        (["--model.image_size", "0"], "model.image_size 0"),
        (["--data.crop_scale", "[1.0, 0.5]"], "data.crop_scale [1.0, 0.5]"),
        (["--optimizer.lr", "-0.001"], "optimizer.lr -0.001"),
        (["--data.cache_views", "-1"], "data.cache_views -1"),
        (["--data.batch_size", "many"], "--data.batch_size many: expected int"),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs x: expected int"),
        (["--data.batch_sise", "8"], "--data.batch_sise is not an option"),
        (["--model.weights", "IMAGENET9K"], "IMAGENET1K_V1"),
        (["--data.split", "[100, 0, 0]"], "leaves no images for val, test"),
    ],
    ids=[
        "batch_size",
        "feature_batch_size",
        "num_workers",
        "split",
        "image_size",
        "crop_scale",
        "lr",
        "cache_views",
        "not-a-number",
        "trainer-type",
        "typo",
        "weights",
        "empty-split",
    ],
)
def test_a_bad_value_is_one_line(image_folder, tmp_path, capsys, bad, says):
    line = one_error(*caltech("fit", *options(tmp_path, image_folder, *bad), capsys=capsys))
    assert says in line
    assert not (tmp_path / "runs" / "checkpoints").exists(), "nothing was trained"
