"""Partitioning, seeding and the analytic activation count: pure, no MPI."""
import itertools

import pytest
import torch

from harness import config
from harness.models import mlp as model


def brute_force_best(costs, p):
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), p - 1):
        edges = (0, *cuts, n)
        worst = max(sum(costs[a:b]) for a, b in zip(edges, edges[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("costs, p", [
    ([5, 1, 1, 1, 1, 5], 2), ([1] * 7, 3), ([9, 1, 1, 1], 2), ([3, 3, 3, 3, 3], 5),
    ([1, 2, 3, 4, 5, 6, 7, 8], 3), ([100, 1, 1, 1, 1, 1, 1, 100], 4),
])
def test_partition_is_contiguous_complete_and_optimal(costs, p):
    bounds = model.partition(costs, p)
    assert len(bounds) == p and bounds[0][0] == 0 and bounds[-1][1] == len(costs)
    assert all(a < b for a, b in bounds)
    assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:]))
    assert max(sum(costs[a:b]) for a, b in bounds) == brute_force_best(costs, p)


def test_default_mlp_splits_evenly_by_parameters():
    m = config.load([], world_size=2).model
    assert model.partition(model.layer_params(m), 2) == [(0, 8), (8, 16)]


def test_explicit_split_sizes_become_bounds():
    assert model.split_from_sizes([3, 2, 1]) == [(0, 3), (3, 5), (5, 6)]


def test_a_stage_holds_exactly_the_weights_of_the_whole_model():
    m = config.load(["model.layers=6", "model.width=16", "model.in_features=8"], 1).model
    whole = model.build_stage(m, (0, 6), seed=3)
    part = model.build_stage(m, (2, 5), seed=3)
    for i, blk in zip(range(2, 5), part):
        assert torch.equal(blk.linear.weight, whole[i].linear.weight)
        assert torch.equal(blk.linear.bias, whole[i].linear.bias)
    other = model.build_stage(m, (2, 5), seed=4)
    assert not torch.equal(other[0].linear.weight, part[0].linear.weight)


def test_data_depends_only_on_seed_and_step_and_y_does_not_need_x():
    m = config.load([], 1).model
    d1, d2 = model.Data(m, 8, 1.0, seed=0), model.Data(m, 8, 1.0, seed=0)
    x1, y1 = d1.batch(5)
    x2, y2 = d2.batch(5)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(d1.batch(5, need_x=False)[1], y1)
    assert not torch.equal(d1.batch(6)[1], y1)
