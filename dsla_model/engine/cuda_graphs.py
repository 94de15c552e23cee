"""CUDA graphs of the decode step, one per (layer configuration, batch bucket).

Eager decode of a 7B model spends most of its time launching kernels (see
BASELINES.md); replaying a captured graph launches the whole step at once.
Inputs live in static buffers: a batch of B rows runs the graph of the
smallest bucket >= B, and the padding rows point at the pool's scratch block
and scratch state pair (position 0), so they read and write only scratch and
cannot change the real rows (every op of the step is row-wise).

Block tables and state slots of a running request never change (the cache is
allocated whole at admission), so they are copied into the static buffers only
when the batch's membership changes; a plain decode step copies just the
token ids and positions.

Each graph also ends by writing its greedy tokens and the next positions into
its own input buffers. A pipelined engine (engine.py) then replays the next step
with no host copy at all ("chained"), before it has read this step's tokens,
which travel to the host through a pinned buffer while the next step runs.
With capture=False (tests on the CPU) the same step runs eagerly over the same
static buffers, so the pipelined engine can be checked without a GPU.
"""
from __future__ import annotations

import math

import torch

from kernels.decode_io import greedy_next

BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_model_len: int, capture: bool = True):
        self.runner = runner
        self.capture = capture
        # two pinned buffers for the tokens of the step in flight: step k+1 copies into one while
        # the host still reads step k's from the other
        pin = runner.device.type == "cuda"
        self._host = [torch.empty(max_batch, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._flip = 0
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.num_layers = len(runner.inner.layers)
        self.nb = math.ceil(max_model_len / runner.pool.block_size)
        self.graphs: dict = {}  # (conf id, bucket) -> (graph, static buffers)
        self.mempools: dict = {}  # conf id -> memory pool shared by that configuration's graphs
        # (conf id, bucket) -> the requests whose tables are loaded: the objects, not their ids (an id
        # can come back on a new request with another cache)
        self._members: dict = {}
        self.captures = 0

    def bucket(self, batch: int) -> int:
        return next(b for b in self.buckets if b >= batch)

    def _capture(self, conf, bucket):
        dev = self.runner.device
        st = {
            "ids": torch.zeros(bucket, dtype=torch.int64, device=dev),
            "pos": torch.zeros(bucket, dtype=torch.int64, device=dev),
            "tables": torch.zeros(self.num_layers, bucket, self.nb, dtype=torch.int64, device=dev),
            "slots": torch.zeros(self.num_layers, bucket, dtype=torch.int64, device=dev),
            "live": torch.zeros(bucket, dtype=torch.int64, device=dev),  # 1 for real rows, 0 for padding
        }
        # splits sized for the longest context: short contexts just leave some splits empty
        from kernels.triton_paged_attention import default_splits

        splits = default_splits(bucket, self.runner.Hkv, self.nb * self.runner.pool.block_size)

        def run():
            logits = self.runner.forward_decode(conf, st["ids"], st["pos"], st["tables"], st["slots"], splits)
            # the next step's inputs, on the device (padding rows stay at token 0, position 0)
            return logits, greedy_next(logits, st["live"], st["ids"], st["pos"])

        if not self.capture:
            return run, st
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # compile Triton kernels and settle allocations outside the capture
                run()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        # One pool per configuration, never reused once its graphs are dropped (re-capturing
        # into a pool whose graphs were all freed trips an allocator assert).
        pool = self.mempools.setdefault(conf.id, torch.cuda.graph_pool_handle())
        with torch.cuda.graph(g, pool=pool):
            st["out"] = run()
        self.captures += 1
        return g.replay, st

    @torch.no_grad()
    def run(self, conf, items, chained: bool = False):
        """Replays the step for `items` (one decode token each); returns (logits [B,V], greedy
        tokens [B]) on the device. chained: the items are the previous replay's rows, one position
        on, so their ids and positions are already in place."""
        B = len(items)
        bucket = self.bucket(B)
        key = (conf.id, bucket)
        if key not in self.graphs:
            self.graphs[key] = self._capture(conf, bucket)
        replay, st = self.graphs[key]
        members = tuple(it.req for it in items)
        if self._members.get(key) != members:
            assert not chained, "a chained step must keep the batch"
            tables = torch.zeros(self.num_layers, bucket, self.nb, dtype=torch.int64)
            slots = torch.zeros(self.num_layers, bucket, dtype=torch.int64)
            for i, it in enumerate(items):
                t = it.req.cache.table
                tables[:, i, :t.shape[1]] = t
                slots[:, i] = it.req.cache.slots
            st["tables"].copy_(tables, non_blocking=False)
            st["slots"].copy_(slots)
            live = torch.zeros(bucket, dtype=torch.int64)
            live[:B] = 1
            st["live"].copy_(live)
            self._members[key] = members
        if not chained:
            ids = torch.zeros(bucket, dtype=torch.int64)
            pos = torch.zeros(bucket, dtype=torch.int64)
            ids[:B] = torch.tensor([it.req.tokens[it.start] for it in items])
            pos[:B] = torch.tensor([it.start for it in items])
            st["ids"].copy_(ids)
            st["pos"].copy_(pos)
        out = replay()
        logits, nxt = st["out"] if self.capture else out
        return logits[:B], nxt[:B]

    def fetch(self, tokens):
        """Start copying a step's tokens [B] to the host; returns a function that waits for them
        and gives them as a list."""
        buf = self._host[self._flip][:tokens.shape[0]]
        self._flip ^= 1
        buf.copy_(tokens, non_blocking=True)
        if not tokens.is_cuda:
            return buf.tolist
        ev = torch.cuda.Event()
        ev.record()

        def get():
            ev.synchronize()
            return buf.tolist()
        return get

    def drop(self, conf_id):
        """Forget the graphs of a configuration no request uses any more."""
        if self.capture:
            torch.cuda.current_stream().synchronize()  # a pipelined step of them may still be running
        for key in [k for k in self.graphs if k[0] == conf_id]:
            del self.graphs[key]
            self._members.pop(key, None)
        self.mempools.pop(conf_id, None)
