"""The mechanism behind the toy effect, trained on the fly: the MR-Adapters learn to read the patch.

A :class:`benchmarks.probe.Probe` (encoder + mean of its tokens + linear head) on the MRA preset
*without* its final fusion, so whatever the CNN tells the ViT goes through the three
MR-Adapters, trains for a fixed number of steps on the hatch task (which way do the 3-4 px
lines run?). The ViT alone reads 16 px, where the lines are gone (``test_low_res_view_...``).
Checked with :mod:`mixres.explain`'s hooks:

- at init the adapters add exactly nothing (``f_h``'s last conv is zero-initialised);
- after training they add something, their gates are off zero, and their high-res term
  ``|g f_h|`` is larger at the patch's cells than at empty cells of the same images;
- the probe reads the answer, far above the 25 % of chance.
"""

import json

import pytest
import torch
import torch.nn.functional as F

from benchmarks.probe import hatch_tensors, train_probe
from mixres.explain import explain

STEPS, BATCH = 120, 16


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: on a shared 2-core machine two threads spin-wait on each other
    try:
        return _train()
    finally:
        torch.set_num_threads(threads)


def _train():
    torch.manual_seed(0)
    train, test = hatch_tensors(480, seed=0), hatch_tensors(96, seed=1)
    with torch.no_grad():
        import mixres

        fresh = mixres.create_encoder("llava-hr-tiny-128", final_fusion=None).eval()
        at_init = explain(fresh, test[0][:8])
    result = train_probe("llava-hr-tiny-128", train, test, steps=STEPS, batch_size=BATCH, seed=0, final_fusion=None)
    return result, explain(result["model"].encoder.eval(), test[0]), test, at_init


def _cell_masks(boxes: torch.Tensor, grid: tuple[int, int], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and cell: fully inside the patch / fully outside it (``BoolTensor[B, h, w]`` each)."""
    h, w = grid
    ys, xs = torch.arange(h) * side // h, torch.arange(w) * side // w
    y0, y1 = ys[None, :, None], ys[None, :, None] + side // h
    x0, x1 = xs[None, None, :], xs[None, None, :] + side // w
    bx0, by0, bx1, by1 = (boxes[:, i, None, None] for i in range(4))
    inside = (x0 >= bx0) & (x1 <= bx1) & (y0 >= by0) & (y1 <= by1)
    outside = (x1 <= bx0) | (x0 >= bx1) | (y1 <= by0) | (y0 >= by1)
    return inside, outside


def test_adapters_add_nothing_at_init(trained):
    *_, at_init = trained
    assert sorted(at_init.high_res) == ["adapters.0", "adapters.1", "adapters.2"]
    assert float(at_init.total.abs().max()) == 0.0  # zero-init f_h: exactly the identity


def test_probe_reads_the_lines(trained):
    result, *_ = trained
    assert result["accuracy"] >= 0.6, result["accuracy"]  # chance 0.25; seed 0 measured well above 0.6


def test_gates_move_off_zero_and_high_res_term_is_large_at_the_patch(trained):
    _, exp, test, _ = trained
    images, _, boxes = test
    gates = torch.stack([g.abs().mean() for g in exp.gates.values()])
    assert (gates > 0.05).all(), gates  # tanh gates of a trained adapter, not ~0
    inside, outside = _cell_masks(boxes, tuple(exp.total.shape[-2:]), images.shape[-1])
    keep = inside.any((1, 2)) & outside.any((1, 2))  # images with both kinds of cell
    assert keep.sum() >= 20, int(keep.sum())
    total = exp.total[keep]
    at_patch = (total * inside[keep]).sum((1, 2)) / inside[keep].sum((1, 2))
    empty = (total * outside[keep]).sum((1, 2)) / outside[keep].sum((1, 2))
    assert float(empty.mean()) > 0.0  # the term exists everywhere; the question is where it is larger
    # per image, not only on average: the patch's cells get more from the CNN than the empty cells.
    # A map unrelated to the patch wins about half the images; measured after the round's merges:
    # 82 % of images, with the median patch/empty ratio far above 1 (the bound leaves room for
    # run-to-run float differences in 120 steps of training, not for a map that ignores the patch)
    assert float((at_patch > empty).float().mean()) >= 0.75, (at_patch, empty)
    assert float((at_patch / empty).median()) >= 3.0, (at_patch / empty)


def test_low_res_view_loses_the_lines():
    """At the ViT's 16 px horizontal and vertical hatchings look alike; at 128 px they do not.

    The statistic: log of horizontal over vertical gradient energy per image; its class-mean gap
    in units of its std (measured with these seeds: 1.97 at 128 px, 0.34 at 32 px, 0.04 at 16 px)."""
    images, labels, _ = hatch_tensors(128, seed=2)
    low = F.interpolate(images, size=16, mode="bilinear", align_corners=True)

    def separability(x):
        gx = (x[..., :, 1:] - x[..., :, :-1]).pow(2).mean((1, 2, 3))
        gy = (x[..., 1:, :] - x[..., :-1, :]).pow(2).mean((1, 2, 3))
        ratio = (gx / gy).log()
        h, v = ratio[labels == 0], ratio[labels == 1]
        return float((h.mean() - v.mean()).abs() / torch.cat([h, v]).std())

    assert separability(images) > 1.5  # two well-separated classes
    assert separability(low) < 0.2  # inside the noise: 10x less than at 128 px


def test_demo_quick_writes_results_and_figures(tmp_path):
    from mixres.integrations.llava import demo

    threads = torch.get_num_threads()
    try:
        results = demo.main(["--quick", "--output_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # the demo sets its own
    saved = json.loads((tmp_path / "results.json").read_text())
    assert list(saved["runs"]) == list(results["runs"]) == ["low-res", "MRA", "ViT 4x"]
    tokens = {name: run["image_tokens"] for name, run in saved["runs"].items()}
    assert tokens == {"low-res": 16, "MRA": 16, "ViT 4x": 64}  # MRA at the low-res count, the ViT at 4x
    for run in saved["runs"].values():
        assert set(run["accuracy"]) == {"all", "horizontal", "vertical", "rising", "falling"}
        assert 0.0 <= run["accuracy"]["all"] <= 1.0 and run["train_time_s"] > 0
    for name in ("effect.png", "sample.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
