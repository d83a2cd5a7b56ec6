"""Our instrument on torch.distributed.pipelining, from outside: one rank's spans, messages and
pebbles in our trace format, without a patch to PyTorch.

`Probe(schedule, ...)` replaces methods on the *instances* of the rank's stages and schedule
(the classes and every other run are untouched) and hooks the stage's blocks:

- compute: `forward_one_chunk` (a `fwd` span per block from forward hooks on the blocks),
  `backward_one_chunk` (`bwd`, or `bwd_in` for PyTorch's I; per block, tiled from tensor hooks
  on the blocks' outputs as our executor does), `backward_weight_one_chunk` (`bwd_w`), the
  schedule's `_compute_loss` (`loss`), `perform_reduce_grad` (the gradients ÷ m: an `opt` span
  whose layer is the stage's first block);
- messages: `get_{fwd,bwd}_{send,recv}_ops` return the P2P operations the schedule posts right
  after (`isend`/`irecv`): their return is the post time, their tensors the bytes and peer. A
  receive completes when PyTorch's wait returns, which is the entry into the compute that
  consumes it (nothing runs between them), so that entry is the receive's end. Where the rank
  began to block (`tb`): GPipe and 1F1B wait right after posting (tb = post); the runtime
  classes wait at the start of the consuming action, which `_assert_unsharded` (the first call
  of every compute action) marks. A send is recorded at its post with no duration: its
  completion is waited for inside `step()` on a Work object no wrapper sees;
- pebbles: the PebbleTracker's saved_tensors_hooks around each forward and loss (parameters
  skipped, shared storage counted once, as in our runs), with the received activation and
  the output kept for backward held as `recv` and `out` pebbles until the microbatch's
  backward (or W) is done, as our executor holds them.

Everything is recorded only between `begin(step)` and `end()`: PyTorch's first step also runs
the stages' metadata inference (a forward on meta tensors), which must not count.
"""
from __future__ import annotations

import time

import torch

from .. import schedule as S
from . import names as N
from .plan import placement, stages_of

STREAM_OF = {"F": "act", "B": "grad", "I": "grad"}     # the message a compute action waits for


def _nbytes(ops) -> int:
    return sum(op.tensor.numel() * op.tensor.element_size() for op in ops)


class Probe:
    """Rank-local recorder of a PyTorch schedule `sched` built on this rank.

    blocks: {stage index: [(global block index, module), ...]}, the blocks of each of this
    rank's stages in order (their hooks give per-block spans and the pebbles' layers);
    n_layers: the model's block count (the loss is layer n_layers); names: one name per global
    block. tracer, tracker: harness.trace's (or the Null ones); now: the host clock (ns);
    watchdog: harness.ops.watchdog.Watchdog told what a blocked receive waits for (or None)."""

    def __init__(self, sched, tracer, tracker, now, blocks: dict, n_layers: int, names: list,
                 watchdog=None, timeout_s: float = 0.0):
        N.check()
        self.sched, self.tracer, self.tracker, self.now = sched, tracer, tracker, now
        self.mark, self.names, self.n_layers = tracer.mark, names, n_layers
        self.watchdog, self.timeout_s = watchdog, timeout_s
        stages = stages_of(sched)
        self.rank = stages[0].group_rank
        self.pl = placement(stages[0].stage_index_to_group_rank, stages[0].group_size)
        self.runtime = hasattr(sched, "pipeline_order_with_comms")
        self.step, self.mb, self.stepping = -1, -1, False
        self.fwd = None          # stage index while its forward_one_chunk runs
        self.pending = {}        # (stage, stream, mb) -> (t0, peer, tag, bytes, pair): posted
        self.block_from = {}     # stage -> when its running compute action began (runtime)
        self.holds = {}          # (stage, mb) -> pebble tokens (recv, out) until its backward
        self.bwd_marks = []      # (layer, mark) as the blocks' gradients appear
        self.m_block = None
        for st in stages:
            self._wrap_stage(st, blocks[st.stage_index])
        sched._compute_loss = self._loss(sched._compute_loss)
        if self.runtime:   # this rank's compute actions, in the order the runtime runs them
            self.plan = [(x.stage_index, x.computation_type.value, x.microbatch_index)
                         for a in sched.pipeline_order_with_comms[self.rank] if a is not None
                         for x in (a.sub_actions or (a,))
                         if x.computation_type.value in ("F", "B", "I", "W")]
            sched._assert_unsharded = self._action_begins(sched._assert_unsharded)
        self.k = 0               # the runtime's next compute action (index into plan)

    # -- the step ---------------------------------------------------------------------------
    def begin(self, step: int) -> None:
        self.step, self.stepping, self.k = step, True, 0
        self.pending.clear()
        self.tracker.step = step

    def end(self) -> None:
        self.stepping = False
        self._unblock()

    # -- wrapping ---------------------------------------------------------------------------
    def _wrap_stage(self, st, blocks: list) -> None:
        sid = st.stage_index
        chunk = self.pl.where(sid)[1]
        first, last = blocks[0][0], blocks[-1][0]
        st.get_fwd_recv_ops = self._posted(st.get_fwd_recv_ops, sid, chunk, S.RECV_ACT)
        st.get_bwd_recv_ops = self._posted(st.get_bwd_recv_ops, sid, chunk, S.RECV_GRAD)
        st.get_fwd_send_ops = self._posted(st.get_fwd_send_ops, sid, chunk, S.SEND_ACT)
        st.get_bwd_send_ops = self._posted(st.get_bwd_send_ops, sid, chunk, S.SEND_GRAD)
        st.forward_one_chunk = self._forward(st.forward_one_chunk, sid, st.is_last, last)
        st.backward_one_chunk = self._backward(st.backward_one_chunk, sid, first)
        st.backward_weight_one_chunk = self._weight(st.backward_weight_one_chunk, sid, first)
        st.perform_reduce_grad = self._reduce(st.perform_reduce_grad, first)
        if not st.is_first:   # the received activation is held from its forward on
            st.submod.register_forward_pre_hook(
                lambda mod, args: self._held_inputs(sid, args, first))
        for gi, blk in blocks:
            self.tracker.watch(self.names[gi], blk)
            blk.register_forward_pre_hook(lambda mod, args, gi=gi: self._block_in(gi))
            blk.register_forward_hook(lambda mod, args, out, gi=gi: self._block_out(gi, out))

    def _posted(self, orig, sid: int, chunk: int, kind: str):
        """get_*_ops: the schedule posts what they return at once; -> a send row, or the
        receive's post until the compute that consumes it begins."""
        stream, role = S.COMM[kind]

        def get_ops(mb):
            ops = orig(mb)
            if ops and self.stepping:
                t = self.now()
                _, _, pair = S.message(kind, self.rank, self.step, mb, chunk, self.pl)
                peer, tag, nbytes = ops[0].peer, ops[0].tag, _nbytes(ops)
                if role == "send":
                    self.tracer.comm(self.step, mb, "send", t, t, t, peer, tag, nbytes, pair)
                else:
                    self.pending[sid, stream, mb] = info = (t, peer, tag, nbytes, pair)
                    if not self.runtime:   # GPipe and 1F1B wait right after posting
                        self._block(info, mb)
            return ops
        return get_ops

    def _arrived(self, sid: int, stream: str, mb: int) -> None:
        """The compute of (stage, mb) begins: its receive, if one was posted, has completed."""
        info = self.pending.pop((sid, stream, mb), None)
        if info is None:
            return
        t1 = self.now()
        self._unblock()
        t0, peer, tag, nbytes, pair = info
        tb = max(t0, self.block_from.get(sid, t0)) if self.runtime else t0
        self.tracer.comm(self.step, mb, "recv", t0, t1, tb, peer, tag, nbytes, pair)

    def _action_begins(self, orig):
        """_PipelineScheduleRuntime._assert_unsharded(stage): the first call of each compute
        action, before it waits for its message. The plan says which action it is."""
        def assert_unsharded(stage):
            if self.stepping:
                sid = stage.stage_index
                self.block_from[sid] = self.now()
                if self.k < len(self.plan):
                    g, t, mb = self.plan[self.k]
                    self.k += 1
                    info = self.pending.get((g, STREAM_OF.get(t), mb)) if g == sid else None
                    if info is not None:
                        self._block(info, mb)
            return orig(stage)
        return assert_unsharded

    def _forward(self, orig, sid: int, is_last: bool, last_block: int):
        def forward_one_chunk(mb, *a, **kw):
            if not self.stepping:
                return orig(mb, *a, **kw)
            self._arrived(sid, "act", mb)
            trk = self.tracker
            trk.step, trk.mb = self.step, mb
            self.fwd, self.mb = sid, mb
            try:
                with trk.hooks():
                    out = orig(mb, *a, **kw)
            finally:
                self.fwd = None
            if not is_last and isinstance(out, torch.Tensor):   # kept for backward(grad)
                self._hold(sid, mb, out, "out", last_block)
            return out
        return forward_one_chunk

    def _held_inputs(self, sid: int, args, first_block: int) -> None:
        if self.fwd == sid:
            for t in args:
                if isinstance(t, torch.Tensor):
                    self._hold(sid, self.mb, t, "recv", first_block)

    def _block_in(self, gi: int) -> None:
        if self.fwd is not None:
            self.tracker.layer = gi
            self.m_block = self.mark()

    def _block_out(self, gi: int, out) -> None:
        if self.fwd is not None:
            self.tracer.span(self.step, self.mb, gi, "fwd", self.m_block, self.mark())
            self._mark_backward(out, gi)

    def _mark_backward(self, out, layer: int) -> None:
        """The block's backward begins when its output's gradient exists (a tensor hook)."""
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda g: self.bwd_marks.append((layer, self.mark())))

    def _loss(self, orig):
        def compute_loss(*a, **kw):
            if not self.stepping:
                return orig(*a, **kw)
            trk, layer = self.tracker, self.n_layers
            trk.step, trk.mb, trk.layer = self.step, self.mb, layer
            m0 = self.mark()
            with trk.hooks():
                loss = orig(*a, **kw)
            self.tracer.span(self.step, self.mb, layer, "loss", m0, self.mark())
            self._mark_backward(loss, layer)
            return loss
        return compute_loss

    def _backward(self, orig, sid: int, first_block: int):
        def backward_one_chunk(mb, *a, **kw):
            if not self.stepping:
                return orig(mb, *a, **kw)
            full = kw.get("full_backward", a[1] if len(a) > 1 else True)
            self._arrived(sid, "grad", mb)
            self.bwd_marks = []
            m0 = self.mark()
            orig(mb, *a, **kw)
            self._tile(mb, "bwd" if full else "bwd_in", m0, self.mark(), first_block)
            if full:
                self._release(sid, mb)
        return backward_one_chunk

    def _weight(self, orig, sid: int, first_block: int):
        def backward_weight_one_chunk(mb, *a, **kw):
            if not self.stepping:
                return orig(mb, *a, **kw)
            self.bwd_marks = []
            m0 = self.mark()
            orig(mb, *a, **kw)
            self._tile(mb, "bwd_w", m0, self.mark(), first_block)
            self._release(sid, mb)
        return backward_weight_one_chunk

    def _reduce(self, orig, first_block: int):
        def perform_reduce_grad(*a, **kw):
            m0 = self.mark()
            orig(*a, **kw)
            if self.stepping:
                self.tracer.span(self.step, -1, first_block, "opt", m0, self.mark())
        return perform_reduce_grad

    def _tile(self, mb: int, kind: str, m0, m1, first_block: int) -> None:
        """Per-block spans covering the backward call [m0, m1] (our executor's tiling: each
        block from its own start to the next one's); W, and a call no block hook saw (the
        first stage's I computes nothing), as one span of the stage's first block."""
        marks, self.bwd_marks = self.bwd_marks, []
        if marks and kind != "bwd_w":
            for k, (layer, s) in enumerate(marks):
                end = marks[k + 1][1] if k + 1 < len(marks) else m1
                self.tracer.span(self.step, mb, layer, kind, m0 if k == 0 else s, end)
        else:
            self.tracer.span(self.step, mb, first_block, kind, m0, m1)

    # -- pebbles held outside autograd --------------------------------------------------------
    def _hold(self, sid: int, mb: int, t, kind: str, layer: int) -> None:
        tok = self.tracker.hold(t, kind, layer, self.step, mb, self.names[layer])
        self.holds.setdefault((sid, mb), []).append(tok)

    def _release(self, sid: int, mb: int) -> None:
        for tok in self.holds.pop((sid, mb), []):
            self.tracker.release(tok)

    # -- the hang report ----------------------------------------------------------------------
    def _block(self, info: tuple, mb: int) -> None:
        if self.watchdog is not None:
            _, peer, tag, _, pair = info
            self.watchdog.blocked = (time.monotonic() + self.timeout_s,
                                     f"wait for receive {pair} from rank {peer} (step "
                                     f"{self.step}, in PyTorch's schedule)", "wait_recv", peer,
                                     tag, pair, self.step, mb)

    def _unblock(self) -> None:
        if self.watchdog is not None:
            self.watchdog.blocked = None


class NoProbe:
    """Tracing off: nothing wrapped, the same calls."""

    def begin(self, step: int) -> None:
        pass

    def end(self) -> None:
        pass
