"""Live streams at real time through one engine: ``python -m voxtral_wgpu.bench --streams 1 8 32 64``.

For each N, N streams are fed 80 ms chunks on the wall clock (each stream starting at a random
offset within the first chunk) for ``seconds`` of audio; then every stream finishes. Reported per N:
the scheduler's host time per batched decoder step and per tick, rows per step, the scheduler's busy
fraction (host time in ticks / wall time; the GPU runs while the host records, so this is an upper
bound of neither, a sign of saturation when it nears 1), per-token latency from the arrival of the
audio that completed a token's position to the token being available (p50 / p90 / p99, live phase),
whether every stream kept up (no stream more than ``KEEP_UP_POSITIONS`` positions behind its audio at
the end of the live phase, p90 <= 160 ms), and GPU bytes per stream. Random weights emit random ids,
so EOS is ignored and every position is decoded.
"""

from __future__ import annotations

import threading
import time

import numpy as np

CHUNK = 1280  # samples: 80 ms, one decoder position
KEEP_UP_POSITIONS = 3  # positions a stream may lag its audio at the end of the live phase
P90_BOUND_MS = 160.0


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs), q)) if len(xs) else None


def measure_streams(model, ns, seconds: float = 30.0, *, max_streams: int | None = None, seed: int = 0,
                    log=print) -> dict:
    from . import Engine

    gpu = model.gpu
    rng = np.random.default_rng(seed)
    audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
    out = {"per_n": []}
    for n in ns:
        base = gpu.bytes_allocated
        gpu.reset_peak()
        with Engine(model, max_streams=max_streams or max(n, 1)) as engine:
            streams = [engine.create_stream() for _ in range(n)]
            for s in streams:
                s._slot.session.stop_on_eos = False
            offsets = rng.uniform(0.0, CHUNK / 16000, size=n)
            n_chunks = -(-len(audio) // CHUNK)
            t0 = time.perf_counter() + 0.2
            # one feeder: every (stream, chunk) at its wall time, in time order
            schedule = sorted((offsets[i] + k * CHUNK / 16000, i, k) for i in range(n) for k in range(n_chunks))
            late = []
            for when, i, k in schedule:
                now = time.perf_counter() - t0
                if when > now:
                    time.sleep(when - now)
                else:
                    late.append(now - when)
                streams[i].feed(audio[k * CHUNK:(k + 1) * CHUNK])
            t_live = time.perf_counter() - t0
            # tokens each stream's audio allowed by now (token i needs the audio of position
            # L - 1 + i: 1280 (L - 1 + i - n_left_pad + 1) + 40 samples), against those it has
            behind = []
            for s in streams:
                L = len(s._slot.session.prompt_ids)
                allowed = (len(audio) - 40) // CHUNK + s.n_left_pad - (L - 1)
                behind.append(max(0, allowed - len(s._slot.session.generated)))
            lat = [1000 * x for s in streams for x in list(s.latencies)]
            stats = engine.stats()
            peak = gpu.bytes_peak
            finishers = [threading.Thread(target=s.finish) for s in streams]
            for t in finishers:
                t.start()
            for t in finishers:
                t.join()
        steps = max(stats["steps"], 1)
        row = {"streams": n, "audio_s": seconds, "live_s": round(t_live, 2),
               "feeder_late_ms_max": round(1000 * max(late), 1) if late else 0.0,
               "step_host_ms": round(1000 * stats["step_s"] / steps, 2),
               "rows_per_step": round(stats["rows"] / steps, 1),
               "encode_host_ms_per_tick": round(1000 * stats["encode_s"] / max(stats["ticks"], 1), 2),
               "tick_ms": round(1000 * stats["tick_s"] / max(stats["ticks"], 1), 2),
               "ticks": stats["ticks"], "scheduler_busy": round(stats["tick_s"] / max(t_live, 1e-9), 3),
               "lat_ms_p50": _pct(lat, 50), "lat_ms_p90": _pct(lat, 90), "lat_ms_p99": _pct(lat, 99),
               "max_positions_behind": max(behind) if behind else 0,
               "gpu_bytes_per_stream": (peak - base) // max(n, 1)}
        row["kept_up"] = bool(row["max_positions_behind"] <= KEEP_UP_POSITIONS and row["lat_ms_p90"] is not None
                              and row["lat_ms_p90"] <= P90_BOUND_MS)
        out["per_n"].append(row)
        log(f"{n} streams: kept up {row['kept_up']} (max {row['max_positions_behind']} positions behind), latency "
            f"p50/p90/p99 {row['lat_ms_p50']:.0f}/{row['lat_ms_p90']:.0f}/{row['lat_ms_p99']:.0f} ms, "
            f"{row['rows_per_step']} rows/step, step {row['step_host_ms']} ms host, tick {row['tick_ms']} ms, "
            f"encoder {row['encode_host_ms_per_tick']} ms host/tick, scheduler busy {row['scheduler_busy']:.0%}, "
            f"{row['gpu_bytes_per_stream'] / 2**20:.0f} MiB GPU per stream")
    ok = [r["streams"] for r in out["per_n"] if r["kept_up"]]
    out["max_streams_kept_up"] = max(ok) if ok else 0
    log(f"largest N that kept up with p90 <= {P90_BOUND_MS:.0f} ms: {out['max_streams_kept_up']}")
    return out
