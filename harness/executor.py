"""Runs one rank's part of a pipeline schedule (harness.schedule) through a dispatch table.

The boundary-tensor rules of naive model parallelism live here, once:
- the receiver marks what it received `requires_grad=True`, or autograd stops at the stage
  boundary and the earlier stages never get a gradient;
- the sender sends a detached copy of its output and keeps the attached output (and with it
  its graph) until the gradient comes back, then calls `output.backward(grad)`.
With microbatches the loss of each is divided by m, so the accumulated gradient equals the
full-batch gradient (the classic pipeline bug, FIELD.md).

Tensor shapes: stage s receives [B/m, widths[first_s]] and sends [B/m, widths[end_s]].
"""
from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F

from . import schedule as S


class StageExecutor:
    def __init__(self, *, rank, size, layers, bounds, n_layers, widths, data, m, p2p, tracer,
                 tracker, optimizer, lr, momentum, per_layer, device, fail_step=None,
                 stall_step=None, recv_requires_grad=True, detach=True):
        self.rank, self.size = rank, size
        self.first, self.last = rank == 0, rank == size - 1
        self.layers, self.layer_ids = layers, list(range(*bounds))
        self.n_layers, self.m, self.data = n_layers, m, data
        self.p2p, self.tracer, self.tracker = p2p, tracer, tracker
        self.opt, self.lr, self.momentum = optimizer, lr, momentum
        self.params = list(layers.parameters())
        self.device, self.fail_step, self.stall_step = device, fail_step, stall_step
        self.recv_requires_grad, self.detach = recv_requires_grad, detach
        self.kept = []  # detach=false only: every step's attached outputs, never let go
        self.hook_bwd = tracer.enabled and per_layer
        self.per_stage = tracer.enabled and not per_layer
        mb_rows = data.batch_size // m
        self.in_shape = (mb_rows, widths[bounds[0]])
        self.out_shape = (mb_rows, widths[bounds[1]])
        self.dispatch = {
            S.FWD: self.forward, S.BWD: self.backward, S.OPT: self.optimize,
            S.SEND_ACT: self.send_act, S.RECV_ACT: self.recv_act,
            S.SEND_GRAD: self.send_grad, S.RECV_GRAD: self.recv_grad,
            S.ISEND_ACT: self.isend_act, S.IRECV_ACT: self.irecv_act,
            S.ISEND_GRAD: self.isend_grad, S.IRECV_GRAD: self.irecv_grad,
            S.WAIT_SEND_ACT: lambda mb: self._wait_send("send_act", mb),
            S.WAIT_SEND_GRAD: lambda mb: self._wait_send("send_grad", mb),
            S.WAIT_RECV_ACT: self.wait_recv_act, S.WAIT_RECV_GRAD: self.wait_recv_grad,
        }

    # -- one step ------------------------------------------------------------------------------
    def run_step(self, step: int, actions: list) -> dict:
        """Run `actions` for `step`; returns {loss, grad_norm, update_norm} (loss: last stage)."""
        if self.fail_step == step:
            raise RuntimeError(f"injected failure on rank {self.rank} at step {step} "
                               f"(debug.fail_rank / debug.fail_step)")
        if self.stall_step == step:  # a hung peer: the others' receives must not wait forever
            while True:
                time.sleep(3600)
        self.step = step
        self.tracer.begin_step()
        m0 = self.tracer.mark()
        x, y = self.data.batch(step, need_x=self.first)
        self.x_mb = list(x.to(self.device).chunk(self.m)) if self.first else None
        self.y_mb = list(y.to(self.device).chunk(self.m)) if self.last else None
        # per-microbatch state; everything is dropped by the time the step ends
        self.inputs, self.outputs, self.grads, self.in_grads = {}, {}, {}, {}
        self.holds, self.pending, self.losses = {}, {}, []
        self.stats = {}
        for a in actions:
            self.dispatch[a.kind](a.mb)
        self.tracer.span(step, -1, -1, "step", m0, self.tracer.mark())
        # one host sync for the step's loss, not one per microbatch
        loss = float(torch.stack(self.losses).double().sum()) if self.last else None
        return {"loss": loss, **self.stats}

    # -- compute ---------------------------------------------------------------------------------
    def forward(self, mb):
        tr, step = self.tracer, self.step
        x = self.x_mb[mb] if self.first else self.inputs[mb]
        trk = self.tracker
        if trk is not None:
            trk.step, trk.mb = step, mb
        m_stage = tr.mark()
        with trk.hooks() if trk is not None else contextlib.nullcontext():
            for gi, blk in zip(self.layer_ids, self.layers):
                if trk is not None:
                    trk.layer = gi
                m0 = tr.mark()
                h = blk.linear(x)
                out = blk.act(h) if blk.act is not None else h
                if self.hook_bwd:
                    tr.span(step, mb, gi, "fwd", m0, tr.mark())
                    self._time_backward(h.grad_fn, out.grad_fn, gi, mb)
                x = out
            if self.last:
                if trk is not None:
                    trk.layer = self.n_layers
                m0 = tr.mark()
                lsm = F.log_softmax(x, dim=1)
                # / m: each microbatch's mean loss is 1/m of the batch mean loss's share
                loss = F.nll_loss(lsm, self.y_mb[mb]) / self.m
                tr.span(step, mb, self.n_layers, "loss", m0, tr.mark())
                if self.hook_bwd:
                    self._time_backward(lsm.grad_fn, loss.grad_fn, self.n_layers, mb)
                self.outputs[mb] = loss
            else:
                self.outputs[mb] = x
                if trk is not None:  # the output kept for backward(grad) is a pebble too
                    self.holds[("out", mb)] = trk.hold(x, "out", self.layer_ids[-1], step, mb)
        if self.per_stage:
            tr.span(step, mb, -1, "fwd", m_stage, tr.mark())

    def _time_backward(self, first_node, last_node, layer, mb):
        """Time one layer's backward with autograd node hooks: it starts when the layer's last
        node (ReLU) is about to run and ends when its first node (addmm) has run."""
        if first_node is None or last_node is None:
            return
        tr, step, box = self.tracer, self.step, []
        last_node.register_prehook(lambda grad_out: box.append(tr.mark()))
        first_node.register_hook(
            lambda grad_in, grad_out: tr.span(step, mb, layer, "bwd", box[0], tr.mark()))

    def backward(self, mb):
        out = self.outputs.pop(mb)
        m0 = self.tracer.mark()
        # detach=false (the ablation): the attached output is kept past its step and the graph
        # behind it is retained (retain_graph=True, what code that keeps attached tensors across
        # steps needs to silence "backward through the graph a second time"), so every step's
        # saved activations stay reachable. docs/lessons.md says exactly what changes.
        retain = not self.detach
        if retain:
            self.kept.append(out)
        if self.last:
            self.losses.append(out.detach())
            out.backward(retain_graph=retain)
        else:
            out.backward(self.grads.pop(mb), retain_graph=retain)
        if self.per_stage:
            self.tracer.span(self.step, mb, -1, "bwd", m0, self.tracer.mark())
        self._release(("out", mb))
        if not self.first:
            inp = self.inputs.pop(mb)
            # recv_requires_grad=false: autograd never computed a gradient for the input, so
            # there is none to send; zeros keep the protocol going (what a `grad or zeros`
            # fallback in naive code does) and the upstream stages get exactly zero gradient.
            self.in_grads[mb] = inp.grad if inp.grad is not None else torch.zeros_like(inp)
            self._release(("recv", mb))

    def optimize(self, _mb):
        tr = self.tracer
        m0 = tr.mark()
        grads = [p.grad for p in self.params if p.grad is not None]
        gnorm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.opt.step()
        if self.momentum > 0:  # SGD applies lr * momentum buffer (no dampening, no decay)
            bufs = [self.opt.state[p]["momentum_buffer"] for p in self.params if p in self.opt.state]
            unorm = self.lr * float(torch.nn.utils.get_total_norm(bufs)) if bufs else 0.0
        else:
            unorm = self.lr * gnorm
        self.opt.zero_grad(set_to_none=True)
        tr.span(self.step, -1, -1, "opt", m0, tr.mark())
        self.stats = {"grad_norm": gnorm, "update_norm": unorm}

    # -- communication -------------------------------------------------------------------------
    def _pair(self, what, mb, src, dst):
        return f"{what}{self.step}.{mb}.{src}>{dst}"

    def _received_act(self, mb, buf):
        # the seed's first lesson: without requires_grad the chain breaks here
        buf.requires_grad_(self.recv_requires_grad)
        self.inputs[mb] = buf
        if self.tracker is not None:
            self.holds[("recv", mb)] = self.tracker.hold(buf, "recv", self.layer_ids[0], self.step, mb)

    def _release(self, key):
        tok = self.holds.pop(key, None)
        if tok is not None:
            self.tracker.release(tok)

    def send_act(self, mb):
        r = self.rank
        self.p2p.send(self.outputs[mb], r + 1, 2 * mb, self.step, mb, self._pair("A", mb, r, r + 1))

    def recv_act(self, mb):
        r = self.rank
        buf = self.p2p.recv(self.in_shape, torch.float32, r - 1, 2 * mb, self.step, mb,
                            self._pair("A", mb, r - 1, r))
        self._received_act(mb, buf)

    def send_grad(self, mb):
        r = self.rank
        self.p2p.send(self.in_grads.pop(mb), r - 1, 2 * mb + 1, self.step, mb,
                      self._pair("G", mb, r, r - 1))

    def recv_grad(self, mb):
        r = self.rank
        self.grads[mb] = self.p2p.recv(self.out_shape, torch.float32, r + 1, 2 * mb + 1,
                                       self.step, mb, self._pair("G", mb, r + 1, r))

    def isend_act(self, mb):
        r = self.rank
        self.pending[("send_act", mb)] = self.p2p.isend(
            self.outputs[mb], r + 1, 2 * mb, self.step, mb, self._pair("A", mb, r, r + 1))

    def isend_grad(self, mb):
        r = self.rank
        self.pending[("send_grad", mb)] = self.p2p.isend(
            self.in_grads.pop(mb), r - 1, 2 * mb + 1, self.step, mb, self._pair("G", mb, r, r - 1))

    def irecv_act(self, mb):
        r = self.rank
        self.pending[("recv_act", mb)] = self.p2p.irecv(
            self.in_shape, torch.float32, r - 1, 2 * mb, self.step, mb, self._pair("A", mb, r - 1, r))

    def irecv_grad(self, mb):
        r = self.rank
        self.pending[("recv_grad", mb)] = self.p2p.irecv(
            self.out_shape, torch.float32, r + 1, 2 * mb + 1, self.step, mb,
            self._pair("G", mb, r + 1, r))

    def _wait_send(self, what, mb):
        self.p2p.wait(self.pending.pop((what, mb)))

    def wait_recv_act(self, mb):
        self._received_act(mb, self.p2p.wait(self.pending.pop(("recv_act", mb))))

    def wait_recv_grad(self, mb):
        self.grads[mb] = self.p2p.wait(self.pending.pop(("recv_grad", mb)))

