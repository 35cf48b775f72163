"""Loss curves: a run's CSV versions joined by step (a resumed run's later version wins), and the figure."""
from PIL import Image

from fcdiffusion.train.loss_curves import plot_losses, read_losses, smooth


def write_csv(path, rows):
    path.parent.mkdir(parents=True)
    path.write_text("epoch,step,train/loss,lr\n" + "".join(f"0,{s},{v},\n" for s, v in rows))


def test_read_losses_joins_versions_in_numeric_order(tmp_path):
    write_csv(tmp_path / "run" / "version_2" / "metrics.csv", [(2, 0.5), (3, 0.4)])  # resumed from step 2
    write_csv(tmp_path / "run" / "version_10" / "metrics.csv", [(3, 0.3), (4, 0.2)])  # resumed again
    write_csv(tmp_path / "run" / "version_1" / "metrics.csv", [(0, 1.0), (1, 0.9), (2, 0.8)])
    assert read_losses(tmp_path / "run") == {0: 1.0, 1: 0.9, 2: 0.5, 3: 0.3, 4: 0.2}
    assert read_losses(tmp_path / "missing") == {}


def test_smooth_is_a_trailing_mean():
    assert smooth([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_plot_losses_draws_a_panel_per_run(tmp_path):
    plot_losses({"a": {0: 1.0, 1: 0.5}, "b": {0: 2.0, 5: 1.0}, "empty": {}}, tmp_path / "losses.png")
    with Image.open(tmp_path / "losses.png") as image:
        assert image.size[0] > image.size[1] > 100
