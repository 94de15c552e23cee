"""The conversion policy: how many layers should run as DSLA, from load alone.

A pure function of (settings, previous state, load sample, time, limits) so that
it is tested on recorded or synthetic load traces without Ray, and the controller
only has to feed it samples and carry its state.

Why this shape:
- Two thresholds per signal (hysteresis band) plus patience counters: one noisy
  poll neither converts nor reverts; a load sitting inside the band holds.
- Convert if ANY signal is high (one saturated resource is enough to hurt
  latency); revert only if ALL are low (reverting under partial load would
  convert again soon after, each swap costing a cache reconfiguration).
- Reverting needs more patience than converting: overload hurts at once,
  while an unneeded DSLA layer only costs a little quality.
- A cooldown between changes lets the last swap show its effect on the signals.
- The cap (ratio and layers the store holds) is applied even during cooldown:
  layers that are not there cannot be served.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Iterable, Optional


@dataclass(frozen=True)
class Load:
    """One load sample (the busiest replica's view, see `aggregate`)."""
    queue: float = 0.0  # requests waiting for admission
    waiting_tokens: float = 0.0  # prompt tokens of those requests
    cache_usage: float = 0.0  # fraction of the cache budget in use
    tpot_s: Optional[float] = None  # recent time per output token
    running: float = 0.0


@dataclass(frozen=True)
class PolicyState:
    layers: int = 0
    high_streak: int = 0
    low_streak: int = 0
    last_change_t: float = -math.inf


@dataclass(frozen=True)
class Decision:
    layers: int  # the target number of DSLA layers
    action: str  # "convert" | "revert" | "hold" | "cap"
    reason: str
    state: PolicyState

    @property
    def changed(self) -> bool:
        return self.action in ("convert", "revert", "cap")


def aggregate(loads: Iterable[Load]) -> Load:
    """Worst replica per signal: Serve balances load, so one hot replica means the
    fleet is near its limit; averaging would hide it until every replica is hot."""
    loads = list(loads)
    if not loads:
        return Load()
    tpots = [x.tpot_s for x in loads if x.tpot_s is not None]
    return Load(queue=max(x.queue for x in loads),
                waiting_tokens=max(x.waiting_tokens for x in loads),
                cache_usage=max(x.cache_usage for x in loads),
                tpot_s=max(tpots) if tpots else None,
                running=max(x.running for x in loads))


def max_layers(policy, num_layers: int, available_layers: int) -> int:
    """The most layers the policy may convert: the ratio cap and the store's contents."""
    return max(0, min(int(math.floor(policy.max_ratio * num_layers + 1e-9)), available_layers))


def classify(policy, load: Load) -> tuple[str, str]:
    """("high" | "low" | "mid", which signals decided it)."""
    high = []
    if load.queue >= policy.queue_high and load.queue > 0:
        high.append(f"queue {load.queue:g}>={policy.queue_high:g}")
    if load.waiting_tokens >= policy.waiting_tokens_high and load.waiting_tokens > 0:
        high.append(f"waiting_tokens {load.waiting_tokens:g}>={policy.waiting_tokens_high:g}")
    if load.cache_usage >= policy.cache_high and load.cache_usage > 0:
        high.append(f"cache {load.cache_usage:.2f}>={policy.cache_high:.2f}")
    tpot_on = policy.tpot_high_s is not None and load.tpot_s is not None
    if tpot_on and load.tpot_s >= policy.tpot_high_s:
        high.append(f"tpot {load.tpot_s * 1e3:.1f}ms>={policy.tpot_high_s * 1e3:.1f}ms")
    if high:
        return "high", ", ".join(high)
    low = (load.queue <= policy.queue_low and load.waiting_tokens <= policy.waiting_tokens_low
           and load.cache_usage <= policy.cache_low and (not tpot_on or load.tpot_s <= policy.tpot_low_s))
    return ("low", "all signals low") if low else ("mid", "inside the hysteresis band")


def decide(policy, state: PolicyState, load: Load, now: float, num_layers: int,
           available_layers: int) -> Decision:
    """The next target layer count. `policy` is a PolicySettings (or anything with its fields)."""
    cap = max_layers(policy, num_layers, available_layers)
    floor = min(policy.min_layers, cap)
    if state.layers > cap or state.layers < floor:
        layers = min(max(state.layers, floor), cap)
        new = PolicyState(layers, 0, 0, now)
        return Decision(layers, "cap", f"limits are [{floor}, {cap}]", new)

    level, why = classify(policy, load)
    high = state.high_streak + 1 if level == "high" else 0
    low = state.low_streak + 1 if level == "low" else 0
    held = replace(state, high_streak=high, low_streak=low)
    cooling = now - state.last_change_t < policy.cooldown_s

    if level == "high" and high >= policy.up_patience:
        if state.layers >= cap:
            return Decision(state.layers, "hold", f"{why}; at the cap ({cap})", held)
        if cooling:
            return Decision(state.layers, "hold", f"{why}; cooling down", held)
        layers = min(cap, state.layers + policy.step_layers)
        return Decision(layers, "convert", why, PolicyState(layers, 0, 0, now))
    if level == "low" and low >= policy.down_patience and state.layers > floor:
        if cooling:
            return Decision(state.layers, "hold", f"{why}; cooling down", held)
        layers = max(floor, state.layers - policy.step_layers)
        return Decision(layers, "revert", why, PolicyState(layers, 0, 0, now))
    return Decision(state.layers, "hold", why, held)


def run_trace(policy, trace: Iterable[tuple[float, Load]], num_layers: int, available_layers,
              state: PolicyState = PolicyState()) -> list[Decision]:
    """Replay (time, load) samples; `available_layers` is an int or a function of time."""
    out = []
    for t, load in trace:
        avail = available_layers(t) if callable(available_layers) else available_layers
        d = decide(policy, state, load, t, num_layers, avail)
        out.append(d)
        state = d.state
    return out
