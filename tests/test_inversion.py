"""Edit-friendly DDPM inversion: exact replay, partial inversion, prediction types."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from emerdiff.method.inversion import Schedule, invert, replay
from emerdiff.method.modulation import unet_forward
from emerdiff.sd.components import SD_SCHEDULER_CONFIG


def _setup(model, ptype="epsilon", steps=50):
    sched = DDIMScheduler(**{**SD_SCHEDULER_CONFIG, "prediction_type": ptype})
    schedule = Schedule.from_scheduler(sched, steps)
    x0 = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    return schedule, x0, (lambda x, t: unet_forward(model, x, t))


def test_schedule_is_sd_schedule(tiny_model):
    schedule, _, _ = _setup(tiny_model)
    assert schedule.timesteps[:3] == [981, 961, 941] and schedule.timesteps[-1] == 1
    assert len(schedule.timesteps) == 50 and schedule.previous(1) == -1


@pytest.mark.parametrize("ptype", ["epsilon", "v_prediction"])
def test_full_replay_reproduces_x0_and_every_xt(tiny_model, ptype):
    schedule, x0, fn = _setup(tiny_model, ptype, steps=25)
    inv = invert(fn, schedule, x0, torch.Generator().manual_seed(0))
    out, visited = replay(fn, inv, schedule.timesteps[0], keep=True)
    assert (out - x0).abs().max() < 1e-4
    for t, x in visited.items():
        if t >= 0:
            assert (x - inv.noisy[t]).abs().max() < 1e-4, t


def test_partial_inversion_equals_full(tiny_model):
    schedule, x0, fn = _setup(tiny_model, steps=25)
    full = invert(fn, schedule, x0, torch.Generator().manual_seed(0))
    part = invert(fn, schedule, x0, torch.Generator().manual_seed(0), t_stop=281)
    assert part.inverted_timesteps == [t for t in schedule.timesteps if t <= 281]
    assert len(part.noise_maps) == 8  # 281, 241, ..., 1 (15 of 50 at the paper's 50 steps)
    for t in part.noise_maps:
        assert torch.allclose(part.noise_maps[t], full.noise_maps[t], atol=1e-6)
    # replay from t_m equals the full replay at t_m
    _, visited = replay(fn, full, schedule.timesteps[0], keep=True)
    from_tm = replay(fn, part, 281, x_start=visited[281])
    assert (from_tm - x0).abs().max() < 1e-4


def test_seeded(tiny_model):
    schedule, x0, fn = _setup(tiny_model, steps=10)
    a = invert(fn, schedule, x0, torch.Generator().manual_seed(3), t_stop=201)
    b = invert(fn, schedule, x0, torch.Generator().manual_seed(3), t_stop=201)
    c = invert(fn, schedule, x0, torch.Generator().manual_seed(4), t_stop=201)
    assert all(torch.equal(a.noise_maps[t], b.noise_maps[t]) for t in a.noise_maps)
    assert not torch.equal(a.noisy[201], c.noisy[201])


def test_t_stop_off_schedule(tiny_model):
    schedule, x0, fn = _setup(tiny_model, steps=10)
    with pytest.raises(ValueError, match="not on the schedule"):
        invert(fn, schedule, x0, torch.Generator().manual_seed(0), t_stop=200)
