"""The conversion policy on load traces (pure function, no Ray)."""
import math

import pytest

from deploy.config import PolicySettings
from deploy.policy import Load, PolicyState, aggregate, classify, decide, max_layers, run_trace

P = PolicySettings(queue_high=4, queue_low=0, waiting_tokens_high=4096, waiting_tokens_low=0,
                   cache_high=0.85, cache_low=0.5, up_patience=2, down_patience=4, cooldown_s=3,
                   step_layers=2, max_ratio=0.75)
BUSY = Load(queue=10, waiting_tokens=5000, cache_usage=0.9, running=16)
QUIET = Load()
MID = Load(queue=2, cache_usage=0.6, running=8)  # inside every band


def trace(*segments, dt=1.0):
    """segments: (load, seconds) -> [(t, load)] sampled every dt."""
    out, t = [], 0.0
    for load, secs in segments:
        for _ in range(int(secs / dt)):
            out.append((t, load))
            t += dt
    return out


def layers_of(decisions):
    return [d.layers for d in decisions]


def test_ramp_converts_to_cap_then_quiet_reverts_to_zero():
    ds = run_trace(P, trace((QUIET, 5), (BUSY, 40), (QUIET, 80)), num_layers=30, available_layers=30)
    layers = layers_of(ds)
    assert max(layers) == 22  # floor(0.75 * 30)
    assert layers[-1] == 0
    # monotone up during the ramp, monotone down afterwards
    peak = layers.index(22)
    assert layers[:peak + 1] == sorted(layers[:peak + 1])
    assert layers[peak:] == sorted(layers[peak:], reverse=True)


def test_patience_ignores_a_single_spike():
    ds = run_trace(P, trace((QUIET, 3), (BUSY, 1), (QUIET, 3), (BUSY, 1), (QUIET, 3)), 30, 30)
    assert all(d.layers == 0 for d in ds)


def test_hysteresis_band_holds():
    ds = run_trace(P, trace((BUSY, 4), (MID, 60)), 30, 30)
    converted = ds[3].layers
    assert converted > 0
    assert all(d.layers == converted for d in ds[3:])  # neither more nor back
    assert classify(P, MID)[0] == "mid"


def test_cooldown_spaces_changes():
    ds = run_trace(P, trace((BUSY, 30)), 30, 30, )
    change_times = [t for (t, _), d in zip(trace((BUSY, 30)), ds) if d.action == "convert"]
    gaps = [b - a for a, b in zip(change_times, change_times[1:])]
    assert gaps and min(gaps) >= P.cooldown_s


def test_never_past_the_store():
    ds = run_trace(P, trace((BUSY, 30)), 30, available_layers=5)
    assert max(layers_of(ds)) == 5


def test_store_growing_lets_it_go_further():
    ds = run_trace(P, trace((BUSY, 40)), 30, available_layers=lambda t: 4 if t < 20 else 10)
    assert max(d.layers for d in ds[:20]) == 4
    assert ds[-1].layers == 10


def test_store_shrinking_or_cap_clamps_at_once_even_in_cooldown():
    state = PolicyState(layers=8, last_change_t=99.0)
    d = decide(P, state, BUSY, now=100.0, num_layers=30, available_layers=3)
    assert d.action == "cap" and d.layers == 3


def test_ratio_cap():
    assert max_layers(P, 30, 30) == 22
    assert max_layers(PolicySettings(max_ratio=0.5), 30, 30) == 15
    assert max_layers(PolicySettings(max_ratio=0.0), 30, 30) == 0
    assert max_layers(P, 4, 4) == 3


@pytest.mark.parametrize("signal", [
    Load(queue=4), Load(waiting_tokens=4096), Load(cache_usage=0.85),
])
def test_each_signal_alone_converts(signal):
    ds = run_trace(P, trace((signal, 2)), 30, 30)
    assert ds[-1].action == "convert"


def test_tpot_signal():
    p = PolicySettings(tpot_high_s=0.05, tpot_low_s=0.02, up_patience=1, cooldown_s=0)
    assert decide(p, PolicyState(), Load(tpot_s=0.06), 0, 30, 30).action == "convert"
    assert decide(p, PolicyState(), Load(tpot_s=0.03), 0, 30, 30).action == "hold"
    # without TPOT thresholds the signal is ignored
    assert decide(PolicySettings(up_patience=1), PolicyState(), Load(tpot_s=9.0), 0, 30, 30).action == "hold"


def test_revert_needs_all_signals_low():
    state = PolicyState(layers=6)
    for load in (Load(cache_usage=0.7), Load(queue=1), Load(waiting_tokens=10)):
        ds = run_trace(P, trace((load, 20)), 30, 30, state=state)
        assert all(d.layers == 6 for d in ds)


def test_min_layers_floor():
    p = PolicySettings(min_layers=2, down_patience=1, cooldown_s=0)
    ds = run_trace(p, trace((QUIET, 5)), 30, 30, state=PolicyState(layers=6))
    assert ds[-1].layers == 2
    d = decide(p, PolicyState(layers=0), QUIET, 0, 30, 30)
    assert d.action == "cap" and d.layers == 2


def test_aggregate_takes_the_worst_replica():
    a = aggregate([Load(queue=1, cache_usage=0.9, tpot_s=None), Load(queue=5, cache_usage=0.1, tpot_s=0.02)])
    assert a.queue == 5 and a.cache_usage == 0.9 and a.tpot_s == 0.02
    assert aggregate([]) == Load()


def test_decisions_are_pure():
    s = PolicyState(layers=2, high_streak=1, last_change_t=-math.inf)
    assert decide(P, s, BUSY, 10, 30, 30) == decide(P, s, BUSY, 10, 30, 30)
    assert s.layers == 2 and s.high_streak == 1


def test_bad_bands_are_refused():
    with pytest.raises(ValueError):
        PolicySettings(queue_low=5, queue_high=1)
    with pytest.raises(ValueError):
        PolicySettings(tpot_high_s=0.1)


def test_no_recent_tpot_counts_as_low():
    # a replica with no request finished lately reports no TPOT: that must not block a revert
    p = PolicySettings(tpot_high_s=0.05, tpot_low_s=0.02, down_patience=1, cooldown_s=0)
    d = decide(p, PolicyState(layers=4), Load(tpot_s=None), 0, 30, 30)
    assert d.action == "revert"
