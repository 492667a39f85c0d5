"""Metrics: known inputs give known values, class and functional twins agree, states merge like sums."""

from __future__ import annotations

import doctest

import pytest
import torch
from torchmetrics.utilities.data import dim_zero_sum

import m2ib_lightning.evaluation.metrics as metrics_module
from m2ib_lightning.evaluation.metrics import (
    ConfidenceDrop,
    ConfidenceIncrease,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    MaskAUROC,
    PointingGame,
    confidence_drop,
    confidence_increase,
    curve_auc,
    energy_pointing_game,
    mask_auroc,
    pointing_game,
    rankdata,
    spearman,
)


def square_masks(b: int = 3, size: int = 8) -> torch.Tensor:
    masks = torch.zeros(b, size, size, dtype=torch.bool)
    masks[:, 2:4, 2:4] = True
    return masks


def test_docstring_examples_run():
    result = doctest.testmod(metrics_module)
    assert result.attempted >= 15 and result.failed == 0


def test_confidence_known_values():
    s = torch.tensor([0.30, 0.30, 0.30, 0.30])
    s_masked = torch.tensor([0.10, 0.30, 0.35, 0.25])
    # drops: 0.20, 0, 0 (rises are not negative drops), 0.05 -> mean 0.0625 -> 6.25 %
    assert confidence_drop(s, s_masked).item() == pytest.approx(6.25)
    # only the third rises (an equal score is not an increase)
    assert confidence_increase(s, s_masked).item() == pytest.approx(25.0)


def test_auc_known_values():
    # Trapezoid on [0, 1]: a straight line from 1 to 0 has area 1/2, a constant c has area c.
    curves = torch.tensor([[1.0, 0.75, 0.5, 0.25, 0.0], [0.4, 0.4, 0.4, 0.4, 0.4]])
    assert curve_auc(curves).item() == pytest.approx(0.45)
    assert curve_auc(torch.tensor([[0.0, 1.0]])).item() == pytest.approx(0.5)


def test_pointing_game_tolerance():
    masks = square_masks(1)
    maps = torch.zeros(1, 8, 8)
    maps[0, 2, 6] = 1.0  # two pixels right of the region (column 3 is its last)
    assert pointing_game(maps, masks, tolerance=0).item() == 0
    assert pointing_game(maps, masks, tolerance=1.9).item() == 0
    assert pointing_game(maps, masks, tolerance=3).item() == 1
    maps[0, 3, 3] = 2.0  # now the maximum is inside
    assert pointing_game(maps, masks, tolerance=0).item() == 1


def test_pointing_game_ties_take_first_maximum():
    masks = square_masks(1)
    flat = torch.zeros(1, 8, 8)  # a constant map "points" at (0, 0), outside the region
    assert pointing_game(flat, masks, tolerance=0).item() == 0


def test_energy_pointing_game_known_values():
    masks = square_masks(2)
    maps = torch.zeros(2, 8, 8)
    maps[0, 2:4, 2:4] = 1.0  # all mass inside
    maps[1] = 1.0  # uniform: 4 of 64 pixels inside
    values = torch.stack([energy_pointing_game(maps[i : i + 1], masks[i : i + 1]) for i in range(2)])
    torch.testing.assert_close(values, torch.tensor([1.0, 4 / 64]))
    assert energy_pointing_game(torch.zeros(1, 8, 8), masks[:1]).item() == 0  # no NaN for an empty map


def test_mask_auroc_known_values():
    masks = square_masks(1)
    perfect = masks.float()
    assert mask_auroc(perfect, masks).item() == pytest.approx(1.0)
    assert mask_auroc(1 - perfect, masks).item() == pytest.approx(0.0)
    assert mask_auroc(torch.ones(1, 8, 8), masks).item() == pytest.approx(0.5)  # all ties: chance
    # Agrees with the pairwise definition P(pos > neg) + 0.5 P(pos == neg) on random values.
    gen = torch.Generator().manual_seed(0)
    maps = torch.randint(0, 5, (2, 8, 8), generator=gen).float()
    masks = torch.rand(2, 8, 8, generator=gen) < 0.3
    expected = []
    for m, gt in zip(maps, masks):
        pos, neg = m[gt], m[~gt]
        diff = pos[:, None] - neg[None, :]
        expected.append(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert mask_auroc(maps, masks).item() == pytest.approx(torch.stack(expected).mean().item())


def test_mask_auroc_skips_undefined_samples():
    metric = MaskAUROC()
    masks = square_masks(2)
    masks[1] = False  # no positive pixel: AUROC undefined, not counted
    metric.update(masks.float(), masks)
    assert metric.count == 1 and metric.compute().item() == pytest.approx(1.0)


def test_rankdata_and_spearman():
    torch.testing.assert_close(rankdata(torch.tensor([3.0, 1.0, 2.0, 2.0])),
                               torch.tensor([4.0, 1.0, 2.5, 2.5], dtype=torch.float64))
    a = torch.randn(50, generator=torch.Generator().manual_seed(1))
    assert spearman(a, a.exp()).item() == pytest.approx(1.0)  # monotone: rank correlation 1
    assert spearman(a, -a).item() == pytest.approx(-1.0)
    assert spearman(a, torch.zeros(50)).item() == 0


def _random_inputs(seed: int, b: int = 5):
    gen = torch.Generator().manual_seed(seed)
    maps = torch.rand(b, 8, 8, generator=gen)
    masks = torch.rand(b, 8, 8, generator=gen) < 0.3
    masks[:, 0, 0] = True  # never empty
    s = torch.rand(b, generator=gen)
    s_masked = torch.rand(b, generator=gen)
    curves = torch.rand(b, 9, generator=gen)
    return maps, masks, s, s_masked, curves


CASES = [
    (ConfidenceDrop, confidence_drop, "pair"),
    (ConfidenceIncrease, confidence_increase, "pair"),
    (DeletionAUC, curve_auc, "curve"),
    (InsertionAUC, curve_auc, "curve"),
    (lambda: PointingGame(tolerance=1.5), lambda m, g: pointing_game(m, g, tolerance=1.5), "map"),
    (EnergyPointingGame, energy_pointing_game, "map"),
    (MaskAUROC, mask_auroc, "map"),
]


@pytest.mark.parametrize("factory, functional, kind", CASES, ids=[c[0].__name__ if isinstance(c[0], type)
                                                                   else "PointingGame" for c in CASES])
def test_class_accumulates_like_functional_on_all_data(factory, functional, kind):
    batches = [_random_inputs(seed) for seed in range(3)]
    metric = factory()
    for maps, masks, s, s_masked, curves in batches:
        args = {"pair": (s, s_masked), "curve": (curves,), "map": (maps, masks)}[kind]
        metric.update(*args)
    cat = [torch.cat(parts) for parts in zip(*batches)]
    maps, masks, s, s_masked, curves = cat
    args = {"pair": (s, s_masked), "curve": (curves,), "map": (maps, masks)}[kind]
    assert metric.compute().item() == pytest.approx(functional(*args).item(), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("factory", [c[0] for c in CASES])
def test_states_are_sums_and_counts_that_merge(factory):
    metric = factory()
    assert set(metric._defaults) == {"total", "count"}
    assert metric._reductions["total"] is dim_zero_sum and metric._reductions["count"] is dim_zero_sum
    assert metric.higher_is_better in (True, False)
    # Two "ranks" merged (what the distributed sync does with sum reductions) == one rank on all data.
    maps, masks, s, s_masked, curves = _random_inputs(0, b=6)
    kind = next(k for f, _, k in CASES if f is factory)
    pick = {"pair": lambda sl: (s[sl], s_masked[sl]), "curve": lambda sl: (curves[sl],),
            "map": lambda sl: (maps[sl], masks[sl])}[kind]
    a, b, whole = factory(), factory(), factory()
    a.update(*pick(slice(0, 2)))
    b.update(*pick(slice(2, 6)))
    whole.update(*pick(slice(0, 6)))
    a.merge_state(b)
    assert a.compute().item() == pytest.approx(whole.compute().item())


def test_higher_is_better_flags():
    assert not ConfidenceDrop.higher_is_better and ConfidenceIncrease.higher_is_better
    assert not DeletionAUC.higher_is_better and InsertionAUC.higher_is_better
    assert PointingGame.higher_is_better and EnergyPointingGame.higher_is_better and MaskAUROC.higher_is_better


def test_bad_inputs_say_expected_and_received():
    with pytest.raises(ValueError, match=r"expected similarities of shape \(B,\) and \(B,\), got \(2,\) and \(3,\)"):
        confidence_drop(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match=r"expected maps \(B, H, W\).*got \(2, 4\)"):
        pointing_game(torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="masks must be bool, got torch.float32"):
        energy_pointing_game(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r"steps >= 1, got \(2, 1\)"):
        curve_auc(torch.zeros(2, 1))
    with pytest.raises(ValueError, match="tolerance must be >= 0 pixels, got -1"):
        PointingGame(tolerance=-1)


def test_compute_before_update_is_nan():
    with pytest.warns(UserWarning):
        assert ConfidenceDrop().compute().isnan()


def test_totals_are_the_states_when_not_distributed():
    metric = ConfidenceDrop()
    metric.update(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.7]))
    total, count = metric.totals()
    assert count.item() == 2 and total.item() == pytest.approx(0.1)
    assert metric.count == 2  # unchanged afterwards
