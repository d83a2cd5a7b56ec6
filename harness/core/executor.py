"""Runs one rank's part of a pipeline schedule (harness.schedule) through a dispatch table.

The boundary-tensor rules of naive model parallelism live here, once:
- the receiver marks what it received `requires_grad=True`, or autograd stops at the stage
  boundary and the earlier stages never get a gradient;
- the sender sends a detached copy of its output and keeps the attached output (and with it
  its graph) until the gradient comes back, then calls `output.backward(grad)`.
With microbatches the loss of each is divided by m, so the accumulated gradient equals the
full-batch gradient (the classic pipeline bug, FIELD.md).

The model is any list of blocks (harness.models.BlockModel: one tensor in, one out); the shapes
and dtypes of what crosses each stage boundary come from probing the model once at set-up
(`recv`), e.g. [B/m, width] for the MLP, [B/m, seq, d] hidden states for the GPT.

The test knobs (debug.*) are not here: they wrap the executor from outside
(harness.ops.debug_knobs).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .. import schedule as S
from ..models.base import set_recompute_observer
from ..trace import ranges
from .splitgrad import Split


@dataclass
class StepState:
    """Everything one step holds per microbatch; a fresh one each step, so nothing leaks across."""
    step: int
    x_mb: list | None                                 # stage 0: its input microbatches
    y_mb: list | None                                 # last stage: its target microbatches
    # keys: (chunk, mb), the rank's model chunk (0 unless pipeline.virtual > 1) and microbatch
    inputs: dict = field(default_factory=dict)        # key -> received activation (requires_grad)
    outputs: dict = field(default_factory=dict)       # key -> attached output (or loss), until bwd
    grads: dict = field(default_factory=dict)         # key -> received gradient of the output
    in_grads: dict = field(default_factory=dict)      # key -> gradient of the input, to send
    holds: dict = field(default_factory=dict)         # (what, key) -> pebble token
    pending: dict = field(default_factory=dict)       # (stream, side, key) -> comm.Pending
    splits: dict = field(default_factory=dict)        # key -> splitgrad.Split between B and W
    losses: list = field(default_factory=list)        # last stage: each microbatch's loss
    stats: dict = field(default_factory=dict)         # grad_norm, update_norm (from opt)


def step_norms(params, opt, lr: float, momentum: float) -> tuple[float, float]:
    """(gradient norm, update norm) after an SGD step, what stats.csv records. SGD's step leaves
    .grad as it was, so the gradient norm is the same after it; the update is lr x the momentum
    buffer (no dampening, no decay), or lr x the gradient without momentum."""
    grads = [p.grad for p in params if p.grad is not None]
    gnorm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    if momentum > 0:
        bufs = [opt.state[p]["momentum_buffer"] for p in params if p in opt.state]
        return gnorm, (lr * float(torch.nn.utils.get_total_norm(bufs)) if bufs else 0.0)
    return gnorm, lr * gnorm


class _Nowhere:
    """A `where` nobody reads (no watchdog: one rank, tests, benchmarks)."""

    def at(self, step, action):
        pass


class StageExecutor:
    """One rank's stage: its layers, its optimizer, and a handler per kind of action.

    Communication has one handler per operation (send, recv, isend, irecv, wait); what moves is
    decided by the action: its stream (activation or gradient) picks the tensor, and its peer,
    tag and pair id come from `schedule.message`, so a new schedule needs no new handler.
    """

    def __init__(self, stage, schedule, rank: int, *, p2p, tracer, tracker, optimizer, device,
                 pipeline, train, trace, where=None, autocast=contextlib.nullcontext):
        """stage: this rank's harness.core.stage.Stage (its chunks' blocks on `device`, their
        global indices, loss, data and what arrives at each chunk); schedule: the run's
        harness.schedule.Schedule (this rank's actions, and the placement of every chunk).
        p2p: the transport (harness.core.comm.P2P; None with one rank); tracer, tracker: the
        trace (harness.trace); pipeline, train, trace: the config sections. where: told each
        action as it starts (harness.ops.watchdog.Where: the hang report's "where").
        autocast: () -> the context each forward runs in (precision=bf16: torch.autocast)."""
        self.rank, self.size = rank, len(schedule)
        self.placement = pl = schedule.placement
        self.actions = schedule[rank]
        chunks, self.chunk_recv = stage.chunks, stage.chunk_recv
        self.stage_of = [pl.stage(rank, c) for c in range(len(chunks))]
        # first: this rank feeds the model's input (stage 0); last: it computes the loss
        self.first, self.last = 0 in self.stage_of, pl.stages - 1 in self.stage_of
        layers = stage.layers
        self.layers, self.layer_ids = layers, [i for b in chunks for i in range(*b)]
        blocks, k = [], 0
        for first, end in chunks:
            blocks.append(list(zip(range(first, end), layers[k:k + end - first])))
            k += end - first
        self.chunk_blocks = blocks
        self.chunk_params = [[p for _, b in blks for p in b.parameters()] for blks in blocks]
        self.n_layers, self.m, self.data = stage.n_blocks, pipeline.microbatches, stage.data
        self.loss_fn, self.autocast = stage.loss, autocast
        # one name per block of the model (pebbles name the sub-module that saved them)
        self.names = stage.names
        for gi, blk in zip(self.layer_ids, layers):
            tracker.watch(self.names[gi], blk)
        if tracer.enabled:  # time what checkpointed blocks recompute in backward (models.base)
            set_recompute_observer(self._recomputing)
        self.bwd_mb = None  # the microbatch whose backward runs (recomputations belong to it)
        self.p2p, self.tracer, self.tracker = p2p, tracer, tracker
        self.opt, self.lr, self.momentum = optimizer, train.lr, train.momentum
        self.params = list(layers.parameters())
        self.device = device
        self.where = where or _Nowhere()
        self.recv_requires_grad, self.detach = pipeline.recv_requires_grad, pipeline.detach
        self.kept = []  # detach=false only: every step's attached outputs, never let go
        self.hook_bwd = tracer.enabled and trace.per_layer
        self.per_stage = tracer.enabled and not trace.per_layer
        comm = {"send": self.send, "recv": self.recv, "isend": self.isend, "irecv": self.irecv,
                "wait_send": self.wait, "wait_recv": self.wait}
        self.dispatch = {S.FWD: self.forward, S.BWD: self.backward, S.OPT: self.optimize,
                         S.BWD_IN: self.backward_input, S.BWD_W: self.backward_weight,
                         **{k: comm[role] for k, (_, role) in S.COMM.items()}}
        self.st = None  # StepState of the running step
        # each action's profiler range, named by the global stage of its chunk (trace.ranges)
        self.ranges = ranges.labeler(lambda a: self.stage_of[a.chunk], device)
        self.bwd_marks = []  # (layer, start) marks of the running backward call

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, step: int, actions: list | None = None) -> dict:
        """Run this rank's actions (or `actions`) for `step`; returns {loss, grad_norm,
        update_norm} (loss: last stage)."""
        actions = self.actions if actions is None else actions
        self.tracer.begin_step()
        m0 = self.tracer.mark()
        x, y = self.data(step)
        # each microbatch its own tensor (a chunk view would keep the whole batch's storage
        # alive), dropped from here once used: autograd's saved copy is then the only
        # reference, and the pebble's free time is when the memory is really released
        self.st = st = StepState(
            step, [c.clone() for c in x.to(self.device).chunk(self.m)] if self.first else None,
            [c.clone() for c in y.to(self.device).chunk(self.m)] if self.last else None)
        del x, y
        # each action a profiler range named as torch.distributed.pipelining names it (Kineto,
        # and NVTX on CUDA), and the hang report's "where" (harness.ops.hang)
        rng, where = self.ranges, self.where
        for a in actions:
            where.at(step, a)
            with rng(a):
                self.dispatch[a.kind](a)
        where.at(step, None)
        self.tracer.span(step, -1, -1, "step", m0, self.tracer.mark())
        # one host sync for the step's loss, not one per microbatch
        loss = float(torch.stack(st.losses).double().sum()) if self.last else None
        self.st = None
        return {"loss": loss, **st.stats}

    # -- compute ---------------------------------------------------------------------------------
    def _stage_flags(self, c):
        """(feeds the model input, computes the loss) for chunk c."""
        g = self.stage_of[c]
        return g == 0, g == self.placement.stages - 1

    def _local(self, c, d):
        """The (rank, chunk) of the stage d (-1 upstream, +1 downstream) of chunk c's stage, if
        it is on this rank (ZB-V's turn): that boundary moves no message."""
        g = self.stage_of[c] + d
        if not 0 <= g < self.placement.stages:
            return None
        r, qc = self.placement.where(g)
        return qc if r == self.rank else None

    def forward(self, a):
        st, tr, trk, mb, c = self.st, self.tracer, self.tracker, a.mb, a.chunk
        step, key = st.step, (a.chunk, a.mb)
        first, last = self._stage_flags(c)
        blocks = self.chunk_blocks[c]
        if first:
            x, st.x_mb[mb] = st.x_mb[mb], None
        else:
            up = self._local(c, -1)
            if up is not None:   # a copy, as a message would be: each side holds its own tensor
                self._incoming("act", key, st.outputs[up, mb].detach().clone())
            x = st.inputs[key]
        trk.step, trk.mb = step, mb
        m_stage = tr.mark()
        with trk.hooks(), self.autocast():
            for gi, blk in blocks:
                trk.layer = gi
                m0 = tr.mark()
                x = blk(x)
                if self.hook_bwd:
                    tr.span(step, mb, gi, "fwd", m0, tr.mark())
                    self._mark_backward(x, gi)
            if last:
                trk.layer = self.n_layers
                m0 = tr.mark()
                y, st.y_mb[mb] = st.y_mb[mb], None
                # / m: each microbatch's mean loss is 1/m of the batch mean loss's share
                loss = self.loss_fn(x, y) / self.m
                tr.span(step, mb, self.n_layers, "loss", m0, tr.mark())
                if self.hook_bwd:
                    self._mark_backward(loss, self.n_layers)
                st.outputs[key] = loss
            else:
                st.outputs[key] = x
                # the output kept for backward(grad) is a pebble too
                lid = blocks[-1][0]
                st.holds[("out", key)] = trk.hold(x, "out", lid, step, mb, self.names[lid])
        if self.per_stage:
            tr.span(step, mb, -1, "fwd", m_stage, tr.mark())

    def _mark_backward(self, out, layer):
        """A block's backward starts when the gradient of its output exists: a tensor hook on
        the output marks that moment (works for any module). The marks go to `self.bwd_marks`;
        `backward` turns them into spans that tile the whole call."""
        if out.requires_grad:
            tr = self.tracer
            out.register_hook(lambda g: self.bwd_marks.append((layer, tr.mark())))
    @contextlib.contextmanager
    def _recomputing(self, name):
        """One recomputation of a checkpointed module (blocks.3, blocks.3.attn) inside a
        backward call: a `recompute` span on its own lane, within the bwd spans (it is part of
        backward's compute, shown so a reader sees what recomputation costs)."""
        tr = self.tracer
        m0 = tr.mark()
        try:
            yield
        finally:  # torch stops a recomputation early by raising once it has what it needs
            if self.bwd_mb is not None:
                block = max((i for i, n in enumerate(self.names)
                             if name == n or name.startswith(n + ".")), default=-1,
                            key=lambda i: len(self.names[i]))
                tr.span(self.st.step, self.bwd_mb, block, "recompute", m0, tr.mark())

    def _tile_backward(self, mb, m0, m1):
        """Per-layer bwd spans covering the backward call [m0, m1] without gaps.

        Autograd also works between the layers' nodes: accumulating each weight's gradient
        into `.grad` (AccumulateGrad, from the second microbatch on an add), freeing saved
        tensors. That work follows the layer whose nodes produced the gradient, so each layer's
        span runs from its own start (the call's start, for the first) to the next layer's start
        (the call's end, for the last): all of backward() is compute, nothing is lost as idle.
        """
        marks, self.bwd_marks = self.bwd_marks, []
        for k, (layer, s) in enumerate(marks):
            end = marks[k + 1][1] if k + 1 < len(marks) else m1
            self.tracer.span(self.st.step, mb, layer, "bwd", m0 if k == 0 else s, end)

    def backward(self, a):
        st, mb, key = self.st, a.mb, (a.chunk, a.mb)
        first, last = self._stage_flags(a.chunk)
        out = st.outputs.pop(key)
        m0 = self.tracer.mark()
        # detach=false (the ablation): the attached output is kept past its step and the graph
        # behind it is retained (retain_graph=True, what code that keeps attached tensors across
        # steps needs to silence "backward through the graph a second time"), so every step's
        # saved activations stay reachable. docs/lessons.md says exactly what changes.
        retain = not self.detach
        if retain:
            self.kept.append(out)
        self.bwd_mb = mb
        if last:
            st.losses.append(out.detach())
            out.backward(retain_graph=retain)
        else:
            out.backward(st.grads.pop(key), retain_graph=retain)
        self.bwd_mb = None
        m1 = self.tracer.mark()
        if self.per_stage:
            self.tracer.span(st.step, mb, -1, "bwd", m0, m1)
        elif self.hook_bwd:
            self._tile_backward(mb, m0, m1)
        self._release(("out", key))
        if not first:
            inp = st.inputs.pop(key)
            # recv_requires_grad=false: autograd never computed a gradient for the input, so
            # there is none to send; zeros keep the protocol going (what a `grad or zeros`
            # fallback in naive code does) and the upstream stages get exactly zero gradient.
            g = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            self._input_grad(a.chunk, key, g)
            if retain:  # the retained graph keeps the input, and with it this .grad, for good:
                # a pebble of its own kind, never released (with detach=true the gradient is a
                # message buffer, gone once sent)
                lid = self.chunk_blocks[a.chunk][0][0]
                self.tracker.hold(g, "in_grad", lid, st.step, mb, self.names[lid])
            self._release(("recv", key))

    def _input_grad(self, c, key, g):
        """The gradient of chunk c's input: a message upstream, or, when the upstream stage is
        on this rank, straight into its received gradients."""
        up = self._local(c, -1)
        if up is not None:
            self.st.grads[up, key[1]] = g
        else:
            self.st.in_grads[key] = g

    # -- split backward (harness/core/splitgrad.py): B now, W later ------------------------------
    def backward_input(self, a):
        """B: the gradient of the chunk's input, sent upstream at once; the graph stays for W."""
        st, key = self.st, (a.chunk, a.mb)
        first, last = self._stage_flags(a.chunk)
        out = st.outputs.pop(key)
        if last:
            st.losses.append(out.detach())
        inp = st.inputs.get(key) if not first and self.recv_requires_grad else None
        split = st.splits[key] = Split(out, None if last else st.grads.pop(key), inp,
                                       self.chunk_params[a.chunk])
        m0 = self.tracer.mark()
        g = split.input_grad()
        m1 = self.tracer.mark()
        self._split_span(a, "bwd_in", m0, m1)
        if not first:
            self._input_grad(a.chunk, key, g if g is not None else torch.zeros_like(st.inputs[key]))

    def backward_weight(self, a):
        """W: the weights' gradient; then the chunk-microbatch's activations are released."""
        st, key = self.st, (a.chunk, a.mb)
        m0 = self.tracer.mark()
        st.splits.pop(key).weight_grad()
        m1 = self.tracer.mark()
        self._split_span(a, "bwd_w", m0, m1)
        st.inputs.pop(key, None)
        self._release(("out", key))
        self._release(("recv", key))

    def _split_span(self, a, kind, m0, m1):
        """B is traced per layer when the block hooks saw it (its own kind); W, and a B with
        nothing to compute, as one span of the chunk (layer = its first block)."""
        marks, self.bwd_marks = self.bwd_marks, []
        if not self.tracer.enabled:
            return
        if kind == "bwd_in" and marks and not self.per_stage:
            for k, (layer, s) in enumerate(marks):
                end = marks[k + 1][1] if k + 1 < len(marks) else m1
                self.tracer.span(self.st.step, a.mb, layer, kind, m0 if k == 0 else s, end)
        else:
            lid = self.chunk_blocks[a.chunk][0][0] if self.hook_bwd else -1
            self.tracer.span(self.st.step, a.mb, lid, kind, m0, m1)

    def optimize(self, _a):
        tr = self.tracer
        m0 = tr.mark()
        self.opt.step()
        m1 = tr.mark()
        tr.span(self.st.step, -1, -1, "opt", m0, m1)
        # the run's statistics are the harness's work, not the optimizer's: their own span
        gnorm, unorm = step_norms(self.params, self.opt, self.lr, self.momentum)
        tr.span(self.st.step, -1, -1, "norms", m1, tr.mark())
        self.opt.zero_grad(set_to_none=True)
        self.st.stats = {"grad_norm": gnorm, "update_norm": unorm}

    # -- communication: one handler per operation, the action says what and with whom ---------
    def _outgoing(self, stream, key):
        """The tensor a send of `stream` moves: the attached output (kept for backward, sent
        detached by comm) or the input gradient (sent once, then dropped)."""
        return self.st.outputs[key] if stream == "act" else self.st.in_grads.pop(key)

    def _incoming(self, stream, key, buf):
        st = self.st
        if stream == "grad":
            st.grads[key] = buf
            return
        # the seed's first lesson: without requires_grad the chain breaks here
        buf.requires_grad_(self.recv_requires_grad)
        st.inputs[key] = buf
        lid = self.chunk_blocks[key[0]][0][0]
        st.holds[("recv", key)] = self.tracker.hold(buf, "recv", lid, st.step, key[1],
                                                    self.names[lid])

    def _message(self, a):
        return S.message(a.kind, self.rank, self.st.step, a.mb, a.chunk, self.placement)

    def _release(self, key):
        tok = self.st.holds.pop(key, None)  # stage 0 holds no received tensor, the last no output
        if tok is not None:
            self.tracker.release(tok)

    def send(self, a):
        q, tag, pair = self._message(a)
        self.p2p.send(self._outgoing(S.COMM[a.kind][0], (a.chunk, a.mb)), q, tag, self.st.step,
                      a.mb, pair)

    def recv(self, a):
        stream = S.COMM[a.kind][0]
        q, tag, pair = self._message(a)
        buf = self.p2p.recv(*self.chunk_recv[a.chunk][stream], q, tag, self.st.step, a.mb, pair)
        self._incoming(stream, (a.chunk, a.mb), buf)

    def isend(self, a):
        stream = S.COMM[a.kind][0]
        q, tag, pair = self._message(a)
        self.st.pending[stream, "send", (a.chunk, a.mb)] = self.p2p.isend(
            self._outgoing(stream, (a.chunk, a.mb)), q, tag, self.st.step, a.mb, pair)

    def irecv(self, a):
        stream = S.COMM[a.kind][0]
        q, tag, pair = self._message(a)
        self.st.pending[stream, "recv", (a.chunk, a.mb)] = self.p2p.irecv(
            *self.chunk_recv[a.chunk][stream], q, tag, self.st.step, a.mb, pair)

    def wait(self, a):
        stream = S.COMM[a.kind][0]
        side = "send" if S.sending(a.kind) else "recv"
        got = self.p2p.wait(self.st.pending.pop((stream, side, (a.chunk, a.mb))))
        if side == "recv":
            self._incoming(stream, (a.chunk, a.mb), got)
