"""JSON or Perfetto's protobuf for trace.json? `python -m benchmarks.trace_format [--steps N]`

Needs `pip install perfetto protobuf` (not a dependency of the harness: this benchmark decides
whether it should become one). Writes a synthetic 4-rank 1F1B run (harness/synthetic.py, 632
events and 288 pebbles a step), takes `--steps` of its steps (default 40, ~25,000 events: the
order of analysis.pebble's default window on a large model), and writes the same slices and
counters both ways:

- JSON: analysis.chrome's writer (what trace.json is), read back with `json.loads`;
- protobuf: the `perfetto` package's TraceProtoBuilder, Perfetto's native trace format with
  interned event names (TrackEvent slices begin/end on one track per rank and lane, counter
  tracks), read back with its generated message classes (`perfetto_trace_pb2.Trace`).

Prints, for each: seconds to write (median of 5), bytes, bytes per event, and the events read
back. Both readers are not the writers.
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from analysis import chrome, load_run
from analysis.measure.live import live_bytes
from harness.synthetic import MS, make_run


def write_json(ev, peb, mem) -> bytes:
    buf = io.BytesIO()
    chrome.write_chrome(buf, ev, peb, mem)
    return buf.getvalue()


def write_proto(ev, peb, mem) -> tuple[bytes, int]:
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import TrackEvent
    from perfetto.trace_builder.proto_builder import TraceProtoBuilder
    b = TraceProtoBuilder()
    seq = 1
    tracks, names = {}, {}

    def track(key, name, counter=False):
        if key not in tracks:
            uuid = len(tracks) + 1
            tracks[key] = uuid
            p = b.add_packet()
            p.track_descriptor.uuid = uuid
            p.track_descriptor.name = name
            if counter:
                p.track_descriptor.counter.SetInParent()
        return tracks[key]
    n = 0

    def event(t, kind, tu, flags=2):   # 2: SEQ_NEEDS_INCREMENTAL_STATE (the interned names)
        p = b.add_packet()
        p.timestamp = t
        p.trusted_packet_sequence_id = seq
        p.sequence_flags = flags
        p.track_event.type = kind
        p.track_event.track_uuid = tu
        return p
    starts = np.rint(ev["start"].to_numpy() * 1e9).astype(np.int64)
    ends = np.rint(ev["end"].to_numpy() * 1e9).astype(np.int64)
    for rank, lane, kind, layer, mb, t0, t1 in zip(
            ev["rank"].tolist(), ev["lane"].astype(str).tolist(), ev["kind"].astype(str).tolist(),
            ev["layer"].tolist(), ev["mb"].tolist(), starts.tolist(), ends.tolist()):
        tu = track((rank, lane), f"rank {rank} {lane}")
        name = f"{kind} L{layer} mb{mb}"
        # 1 on the first: SEQ_INCREMENTAL_STATE_CLEARED
        p = event(t0, TrackEvent.TYPE_SLICE_BEGIN, tu, 2 if n else 1)
        if name not in names:
            names[name] = len(names) + 1
            en = p.interned_data.event_names.add()
            en.iid, en.name = names[name], name
        p.track_event.name_iid = names[name]
        event(t1, TrackEvent.TYPE_SLICE_END, tu)
        n += 1
    lb = live_bytes(peb)
    for rank, t, v in zip(lb["rank"].tolist(), np.rint(lb["time"].to_numpy() * 1e9).astype(
            np.int64).tolist(), lb["bytes"].tolist()):
        tu = track(("act", rank), f"rank {rank} activations (pebbles)", counter=True)
        event(t, TrackEvent.TYPE_COUNTER, tu).track_event.counter_value = int(v)
        n += 1
    return b.serialize(), n


def read_proto(data: bytes) -> int:
    from perfetto.protos.perfetto.trace.perfetto_trace_pb2 import Trace, TrackEvent
    t = Trace.FromString(data)
    return sum(1 for p in t.packet if p.HasField("track_event")
               and p.track_event.type in (TrackEvent.TYPE_SLICE_BEGIN, TrackEvent.TYPE_COUNTER))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        d = make_run(Path(tmp) / "run", p=4, m=8, schedule="1f1b", steps=a.steps,
                     layers_per_stage=8, sample_ns=10 * MS)
        run = load_run(d)
        ev, peb = run.events, run.pebbles
        mem = run.memory.iloc[:0]      # counters of activation bytes only, in both
        lb = len(live_bytes(peb))
        res = {}
        for name, fn in (("json", lambda: write_json(ev, peb, mem)),
                         ("protobuf", lambda: write_proto(ev, peb, mem)[0])):
            times, data = [], None
            for _ in range(5):
                t = time.perf_counter()
                data = fn()
                times.append(time.perf_counter() - t)
            if name == "json":
                back = [e for e in json.loads(data)["traceEvents"] if e.get("ph") in "XC"]
                got = len(back)
            else:
                got = read_proto(data)
            res[name] = (statistics.median(times), len(data), got)
        n = len(ev) + lb
        print(f"{len(ev):,} slices and {lb:,} counter values ({a.steps} steps, 4 ranks)")
        for name, (t, size, got) in res.items():
            print(f"  {name:<9} write {t:6.3f} s   {size / 1e6:7.2f} MB   {size / n:6.1f} B per "
                  f"event   read back {got:,} events")


if __name__ == "__main__":
    main()
