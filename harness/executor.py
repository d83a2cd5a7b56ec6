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
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import hang
from . import schedule as S
from .trace import ranges


@dataclass
class StepState:
    """Everything one step holds per microbatch; a fresh one each step, so nothing leaks across."""
    step: int
    x_mb: list | None                                 # stage 0: its input microbatches
    y_mb: list | None                                 # last stage: its target microbatches
    inputs: dict = field(default_factory=dict)        # mb -> received activation (requires_grad)
    outputs: dict = field(default_factory=dict)       # mb -> attached output (or loss), until bwd
    grads: dict = field(default_factory=dict)         # mb -> received gradient of the output
    in_grads: dict = field(default_factory=dict)      # mb -> gradient of the input, to send
    holds: dict = field(default_factory=dict)         # (what, mb) -> pebble token
    pending: dict = field(default_factory=dict)       # (stream, side, mb) -> comm.Pending
    losses: list = field(default_factory=list)        # last stage: each microbatch's loss
    stats: dict = field(default_factory=dict)         # grad_norm, update_norm (from opt)


class StageExecutor:
    """One rank's stage: its layers, its optimizer, and a handler per kind of action.

    Communication has one handler per operation (send, recv, isend, irecv, wait); what moves is
    decided by the action: its stream (activation or gradient) picks the tensor, and its peer,
    tag and pair id come from `schedule.message`, so a new schedule needs no new handler.
    """

    def __init__(self, *, rank, size, layers, bounds, n_layers, loss, data, recv, p2p, tracer,
                 tracker, optimizer, device, pipeline, train, trace, debug, names=None):
        """layers: this stage's blocks (global indices `bounds`, end exclusive) of a model of
        `n_layers` blocks; loss(output, targets) -> mean loss (used on the last stage);
        data(step) -> (inputs, targets) of the full batch; recv: {"act": (shape, dtype),
        "grad": (shape, dtype)}, what a microbatch's activation and output gradient look like
        when they arrive here. pipeline, train, trace, debug: the config sections. names: one
        per block of the model (pebbles name the sub-module that saved them, blocks.3.attn)."""
        self.rank, self.size = rank, size
        self.first, self.last = rank == 0, rank == size - 1
        self.layers, self.layer_ids = layers, list(range(*bounds))
        self.n_layers, self.m, self.data = n_layers, pipeline.microbatches, data
        self.loss_fn, self.recv_spec = loss, recv
        self.names = names or [str(i) for i in range(n_layers)]
        for gi, blk in zip(self.layer_ids, layers):
            tracker.watch(self.names[gi], blk)
        self.p2p, self.tracer, self.tracker = p2p, tracer, tracker
        self.opt, self.lr, self.momentum = optimizer, train.lr, train.momentum
        self.params = list(layers.parameters())
        self.device = device
        self.fail_step = debug.fail_step if debug.fail_rank == rank else None
        self.stall_step = debug.stall_step if debug.stall_rank == rank else None
        self.recv_requires_grad, self.detach = pipeline.recv_requires_grad, pipeline.detach
        self.kept = []  # detach=false only: every step's attached outputs, never let go
        self.hook_bwd = tracer.enabled and trace.per_layer
        self.per_stage = tracer.enabled and not trace.per_layer
        comm = {"send": self.send, "recv": self.recv, "isend": self.isend, "irecv": self.irecv,
                "wait_send": self.wait, "wait_recv": self.wait}
        self.dispatch = {S.FWD: self.forward, S.BWD: self.backward, S.OPT: self.optimize,
                         **{k: comm[role] for k, (_, role) in S.COMM.items()}}
        self.st = None  # StepState of the running step
        self.bwd_marks = []  # (layer, start) marks of the running backward call

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, step: int, actions: list) -> dict:
        """Run `actions` for `step`; returns {loss, grad_norm, update_norm} (loss: last stage)."""
        if self.fail_step == step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step} "
                               f"(debug.fail_rank / debug.fail_step)")
        if self.stall_step == step:  # a hung peer: the others' receives must not wait forever
            while True:
                time.sleep(3600)
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
        # and NVTX on CUDA), and the hang report's "where" (harness.hang)
        rng = self.__dict__.get("_ranges") or self.__dict__.setdefault(
            "_ranges", ranges.labeler(self.rank, self.device))
        where = self.p2p.where if hasattr(self.p2p, "where") else hang.Where()
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
    def forward(self, a):
        st, tr, trk, mb = self.st, self.tracer, self.tracker, a.mb
        step = st.step
        if self.first:
            x, st.x_mb[mb] = st.x_mb[mb], None
        else:
            x = st.inputs[mb]
        trk.step, trk.mb = step, mb
        m_stage = tr.mark()
        with trk.hooks():
            for gi, blk in zip(self.layer_ids, self.layers):
                trk.layer = gi
                m0 = tr.mark()
                x = blk(x)
                if self.hook_bwd:
                    tr.span(step, mb, gi, "fwd", m0, tr.mark())
                    self._mark_backward(x, gi)
            if self.last:
                trk.layer = self.n_layers
                m0 = tr.mark()
                y, st.y_mb[mb] = st.y_mb[mb], None
                # / m: each microbatch's mean loss is 1/m of the batch mean loss's share
                loss = self.loss_fn(x, y) / self.m
                tr.span(step, mb, self.n_layers, "loss", m0, tr.mark())
                if self.hook_bwd:
                    self._mark_backward(loss, self.n_layers)
                st.outputs[mb] = loss
            else:
                st.outputs[mb] = x
                # the output kept for backward(grad) is a pebble too
                st.holds[("out", mb)] = trk.hold(x, "out", self.layer_ids[-1], step, mb,
                                                 self.names[self.layer_ids[-1]])
        if self.per_stage:
            tr.span(step, mb, -1, "fwd", m_stage, tr.mark())

    def _mark_backward(self, out, layer):
        """A block's backward starts when the gradient of its output exists: a tensor hook on
        the output marks that moment (works for any module). The marks go to `self.bwd_marks`;
        `backward` turns them into spans that tile the whole call."""
        if out.requires_grad:
            tr = self.tracer
            out.register_hook(lambda g: self.bwd_marks.append((layer, tr.mark())))
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
        st, mb = self.st, a.mb
        out = st.outputs.pop(mb)
        m0 = self.tracer.mark()
        # detach=false (the ablation): the attached output is kept past its step and the graph
        # behind it is retained (retain_graph=True, what code that keeps attached tensors across
        # steps needs to silence "backward through the graph a second time"), so every step's
        # saved activations stay reachable. docs/lessons.md says exactly what changes.
        retain = not self.detach
        if retain:
            self.kept.append(out)
        if self.last:
            st.losses.append(out.detach())
            out.backward(retain_graph=retain)
        else:
            out.backward(st.grads.pop(mb), retain_graph=retain)
        m1 = self.tracer.mark()
        if self.per_stage:
            self.tracer.span(st.step, mb, -1, "bwd", m0, m1)
        elif self.hook_bwd:
            self._tile_backward(mb, m0, m1)
        self._release(("out", mb))
        if not self.first:
            inp = st.inputs.pop(mb)
            # recv_requires_grad=false: autograd never computed a gradient for the input, so
            # there is none to send; zeros keep the protocol going (what a `grad or zeros`
            # fallback in naive code does) and the upstream stages get exactly zero gradient.
            g = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            st.in_grads[mb] = g
            if retain:  # the retained graph keeps the input, and with it this .grad, for good:
                # a pebble of its own kind, never released (with detach=true the gradient is a
                # message buffer, gone once sent)
                self.tracker.hold(g, "in_grad", self.layer_ids[0], st.step, mb,
                                  self.names[self.layer_ids[0]])
            self._release(("recv", mb))

    def optimize(self, _a):
        tr = self.tracer
        m0 = tr.mark()
        self.opt.step()
        m1 = tr.mark()
        tr.span(self.st.step, -1, -1, "opt", m0, m1)
        # the run's statistics are the harness's work, not the optimizer's: their own span.
        # SGD's step leaves .grad as it was, so the gradient norm is the same after it.
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        if self.momentum > 0:  # SGD applies lr * momentum buffer (no dampening, no decay)
            bufs = [self.opt.state[p]["momentum_buffer"] for p in self.params if p in self.opt.state]
            unorm = self.lr * float(torch.nn.utils.get_total_norm(bufs)) if bufs else 0.0
        else:
            unorm = self.lr * gnorm
        tr.span(self.st.step, -1, -1, "norms", m1, tr.mark())
        self.opt.zero_grad(set_to_none=True)
        self.st.stats = {"grad_norm": gnorm, "update_norm": unorm}

    # -- communication: one handler per operation, the action says what and with whom ---------
    def _outgoing(self, stream, mb):
        """The tensor a send of `stream` moves: the attached output (kept for backward, sent
        detached by comm) or the input gradient (sent once, then dropped)."""
        return self.st.outputs[mb] if stream == "act" else self.st.in_grads.pop(mb)

    def _incoming(self, stream, mb, buf):
        st = self.st
        if stream == "grad":
            st.grads[mb] = buf
            return
        # the seed's first lesson: without requires_grad the chain breaks here
        buf.requires_grad_(self.recv_requires_grad)
        st.inputs[mb] = buf
        st.holds[("recv", mb)] = self.tracker.hold(buf, "recv", self.layer_ids[0], st.step, mb,
                                                   self.names[self.layer_ids[0]])

    def _release(self, key):
        tok = self.st.holds.pop(key, None)  # stage 0 holds no received tensor, the last no output
        if tok is not None:
            self.tracker.release(tok)

    def send(self, a):
        q, tag, pair = S.message(a.kind, self.rank, self.st.step, a.mb)
        self.p2p.send(self._outgoing(S.COMM[a.kind][0], a.mb), q, tag, self.st.step, a.mb, pair)

    def recv(self, a):
        stream = S.COMM[a.kind][0]
        q, tag, pair = S.message(a.kind, self.rank, self.st.step, a.mb)
        buf = self.p2p.recv(*self.recv_spec[stream], q, tag, self.st.step, a.mb, pair)
        self._incoming(stream, a.mb, buf)

    def isend(self, a):
        stream = S.COMM[a.kind][0]
        q, tag, pair = S.message(a.kind, self.rank, self.st.step, a.mb)
        self.st.pending[stream, "send", a.mb] = self.p2p.isend(
            self._outgoing(stream, a.mb), q, tag, self.st.step, a.mb, pair)

    def irecv(self, a):
        stream = S.COMM[a.kind][0]
        q, tag, pair = S.message(a.kind, self.rank, self.st.step, a.mb)
        self.st.pending[stream, "recv", a.mb] = self.p2p.irecv(
            *self.recv_spec[stream], q, tag, self.st.step, a.mb, pair)

    def wait(self, a):
        stream = S.COMM[a.kind][0]
        side = "send" if S.sending(a.kind) else "recv"
        got = self.p2p.wait(self.st.pending.pop((stream, side, a.mb)))
        if side == "recv":
            self._incoming(stream, a.mb, got)
