"""``report.html``: curves that pair each metric with its own validation counterpart on
whole-number epochs, class legends on segmentation masks, a summary table a reader scans
(nested entries as rows, numbers formatted), checked on the figure objects and on the
parsed page of a real segmentation run."""

from __future__ import annotations

from html.parser import HTMLParser

import matplotlib
import pytest
import torch

from cnnkit.run.report import curve_figure, curve_panels
from cnnkit.tasks.figures import flat_rows, fmt
from cnnkit.tasks.segment import mask_figure

matplotlib.use("Agg")

SEGMENT = [{"epoch": e, "train_loss": 1.0 / e, "train_pixel_accuracy": 0.5 + 0.1 * e,
            "samples_per_s": 50.0, "epoch_time_s": 3.0, "val_loss": 1.2 / e,
            "val_miou": 0.2 + 0.05 * e, "lr": 0.05} for e in range(1, 4)]
CLASSIFY = [{"epoch": e, "train_loss": 1.0 / e, "train_accuracy": 0.6 + 0.1 * e,
             "val_loss": 1.1 / e, "val_accuracy": 0.55 + 0.1 * e, "lr": 0.1} for e in (1, 2)]


def _lines(ax) -> dict[str, list[float]]:
    return {line.get_label(): list(line.get_ydata()) for line in ax.get_lines()}


@pytest.fixture(autouse=True)
def _close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def test_a_training_statistic_unlike_the_validation_metric_gets_its_own_panel():
    assert curve_panels(SEGMENT) == [("loss", "train_loss", "val_loss"),
                                     ("pixel_accuracy", "train_pixel_accuracy", None),
                                     ("miou", None, "val_miou")]
    loss, pix, miou = curve_figure(SEGMENT).axes
    assert (loss.get_xlabel(), loss.get_ylabel()) == ("epoch", "loss")
    assert _lines(loss) == {"train loss": pytest.approx([1.0, 0.5, 1 / 3]),
                            "validation loss": pytest.approx([1.2, 0.6, 0.4])}
    assert pix.get_ylabel() == "pixel accuracy" and list(_lines(pix)) == ["train pixel accuracy"]
    assert miou.get_ylabel() == "mIoU" and list(_lines(miou)) == ["validation mIoU"]
    assert [t.get_text() for t in loss.get_legend().get_texts()] == ["train loss",
                                                                     "validation loss"]


def test_a_metric_recorded_on_both_splits_pairs_them_on_one_axis():
    loss, acc = curve_figure(CLASSIFY).axes
    assert acc.get_ylabel() == "accuracy" and acc.get_title() == "accuracy"
    assert _lines(acc) == {"train accuracy": pytest.approx([0.7, 0.8]),
                           "validation accuracy": pytest.approx([0.65, 0.75])}


@pytest.mark.parametrize("history", [SEGMENT, CLASSIFY, SEGMENT[:1]])
def test_epochs_sit_on_whole_number_ticks(history):
    fig = curve_figure(history)
    fig.canvas.draw()
    for ax in fig.axes:
        lo, hi = ax.get_xlim()
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_mask_legend_names_every_class_in_its_palette_colour():
    from cnnkit.tasks.segment import palette

    classes = ["background", "circle", "square", "triangle", "star"]
    masks = torch.randint(0, 5, (2, 16, 16))
    masks[0, 0] = 255  # ignored pixels get their own entry
    fig = mask_figure(torch.zeros(2, 3, 16, 16, dtype=torch.uint8), masks,
                      torch.randint(0, 5, (2, 16, 16)), classes)
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [*classes, "ignored"]
    colours = [[round(255 * v) for v in p.get_facecolor()[:3]] for p in legend.get_patches()]
    assert colours[:5] == [palette(5)[3 * i:3 * i + 3] for i in range(5)]


def test_summary_rows_flatten_nested_entries_and_format_numbers():
    summary = {"test_miou": 0.912345, "num_samples": {"train": 2400, "val": 300},
               "params": 1942645, "input_size": [3, 32, 32], "stopped_early": False,
               "skipped_files": [], "resumes": [{"epochs": 4}], "classes": ["a", "b"]}
    rows = dict(flat_rows(summary, skip=("classes",)))
    assert rows == {"test_miou": "0.9123", "num_samples / train": "2,400",
                    "num_samples / val": "300", "params": "1,942,645",
                    "input_size": "3, 32, 32", "stopped_early": "no", "skipped_files": "none",
                    "resumes / 1 / epochs": "4"}
    assert fmt(3.2e-7) == "3.200e-07" and fmt(12345.678) == "12,345.7"


class _Page(HTMLParser):
    """The summary table's rows and the figure headings of a report page."""

    def __init__(self):
        super().__init__()
        self.rows, self.headings, self.images, self._cell, self._tag = [], [], 0, None, None
        self._in_summary = False

    def handle_starttag(self, tag, attrs):
        self._tag = tag
        if tag == "table":
            self._in_summary = ("class", "summary") in attrs
        if tag == "tr" and self._in_summary:
            self.rows.append([])
        if tag in ("th", "td") and self._in_summary:
            self._cell = ""
        if tag == "img":
            self.images += 1

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self._cell is not None:
            self.rows[-1].append(self._cell)
            self._cell = None
        if tag == "table":
            self._in_summary = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        elif self._tag == "h2":
            self.headings.append(data)


def test_a_segmentation_report_reads_as_promised(tmp_path):
    import cnnkit

    summary = cnnkit.train(task="segment", model="unet_small", data="shapes", epochs=2,
                           data_options={"n": 40, "size": 16}, batch_size=8,
                           runs_dir=str(tmp_path), name="seg", progress=False)
    page = _Page()
    page.feed((tmp_path / "seg" / "report.html").read_text(encoding="utf-8"))
    rows = dict(page.rows)
    assert rows["num_samples / train"] == str(summary["num_samples"]["train"])
    assert rows["test_miou"] == f"{summary['test_miou']:.4f}"
    assert not any("{" in v or "[" in v for v in rows.values()), rows
    assert page.headings[:2] == ["Training curves", "Sample predictions"]
    assert page.images == 2
