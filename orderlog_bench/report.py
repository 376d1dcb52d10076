"""The report: runs summarized into medians and ratios to the baselines, as tables or JSON."""

from __future__ import annotations

import argparse
import statistics

# Per scenario: (key, column label, format, which way is better: +1 higher, -1 lower).
METRICS: dict[str, list[tuple[str, str, str, int]]] = {
    "commands": [("acks_per_s", "acks/s", "{:,.0f}", 1), ("p50_ms", "p50 ms", "{:.2f}", -1),
                 ("p99_ms", "p99 ms", "{:.2f}", -1), ("p999_ms", "p99.9 ms", "{:.2f}", -1),
                 ("cpu_us_per_ack", "cpu µs/ack", "{:.1f}", -1)],
    "fanout": [("deliveries_per_s", "deliveries/s", "{:,.0f}", 1), ("commands_per_s", "commands/s", "{:,.1f}", 1),
               ("p50_ms", "p50 ms", "{:.2f}", -1), ("p99_ms", "p99 ms", "{:.2f}", -1),
               ("p999_ms", "p99.9 ms", "{:.2f}", -1), ("max_ms", "max ms", "{:.1f}", -1),
               ("cpu_us_per_delivery", "cpu µs/delivery", "{:.2f}", -1)],
    "replay": [("events", "events", "{:,.0f}", 0), ("seconds", "seconds", "{:.2f}", -1),
               ("events_per_s", "events/s", "{:,.0f}", 1), ("cpu_us_per_event", "cpu µs/event", "{:.2f}", -1)],
    "connections": [("connections", "connections", "{:,.0f}", 0), ("open_seconds", "open s", "{:.1f}", -1),
                    ("rss_per_conn_kb", "RSS KB/conn", "{:.1f}", -1), ("all_received_ms", "all got it ms", "{:.0f}", -1),
                    ("all_received_max_ms", "worst ms", "{:.0f}", -1)],
    "stall": [("events", "events", "{:,.0f}", 0), ("append_seconds", "append s", "{:.1f}", 0),
              ("rss_before_mb", "RSS before MB", "{:.1f}", 0), ("rss_peak_mb", "RSS peak MB", "{:.1f}", -1),
              ("rss_growth_mb", "growth MB", "{:.1f}", -1), ("catchup_seconds", "catch-up s", "{:.1f}", -1),
              ("catchup_events_per_s", "catch-up ev/s", "{:,.0f}", 1)],
}
TARGETS_NOTE = {
    "commands": "target: orderlog acks/s >= 0.6x the trio-websocket echo baseline",
    "fanout": "compare deliveries/s and cpu µs/delivery with the websockets broadcast baseline",
    "replay": "target: >= 200,000 events/s to one client",
    "connections": "targets: RSS growth <= 30 KB per connection; every connection receives a new event within 1 s",
    "stall": "target: the server's memory stays bounded while the subscriber does not read",
}


def summarize(scenario: str, runs: dict[str, list[dict]]) -> dict:
    targets: dict[str, dict] = {}
    for name, results in runs.items():
        median: dict[str, float | None] = {}
        for key, *_ in METRICS[scenario]:
            values = [r[key] for r in results if r.get(key) is not None and r.get("ok")]
            median[key] = statistics.median(values) if values else None
        targets[name] = {"ok": all(r.get("ok") for r in results) and bool(results), "median": median,
                         "runs": [{k: v for k, v in r.items() if k != "rounds" or True} for r in results]}
    ratios: dict[str, dict] = {}
    paired: dict[str, dict] = {}
    for name in runs:
        base, _, client = name.partition("@")
        if base == "orderlog":
            continue
        mine = "orderlog" + ("@" + client if client else "")  # the same client against orderlog
        ours = targets.get(mine, {}).get("median", {})
        our_runs = runs.get(mine, [])
        theirs = targets[name]["median"]
        ratios[f"{mine}/{base}"] = {
            key: (ours[key] / theirs[key] if ours.get(key) is not None and theirs.get(key) else None)
            for key, _, _, better in METRICS[scenario] if better
        }
        # The median of per-repeat ratios: each pair ran minutes apart, so it cancels slow drifts.
        pairs: dict[str, float | None] = {}
        for key, _, _, better in METRICS[scenario]:
            if not better:
                continue
            values = [a[key] / b[key] for a, b in zip(our_runs, runs[name])
                      if a.get("ok") and b.get("ok") and a.get(key) is not None and b.get(key)]
            pairs[key] = statistics.median(values) if values else None
        paired[f"{mine}/{base}"] = pairs
    return {"ok": all(t["ok"] for t in targets.values()), "targets": targets, "ratios": ratios,
            "paired_ratios": paired}


def render(scenario: str, summary: dict, o: argparse.Namespace) -> str:
    columns = METRICS[scenario]
    header = ["target"] + [label for _, label, _, _ in columns] + ["check"]
    rows = []
    for name, data in summary["targets"].items():
        row = [name]
        for key, _, fmt, _ in columns:
            value = data["median"].get(key)
            row.append("-" if value is None else fmt.format(value))
        row.append("ok" if data["ok"] else "FAILED")
        rows.append(row)
    for label, ratios in (("", summary["ratios"]), (" paired", summary.get("paired_ratios", {}))):
        if label and o.repeat < 2:
            continue
        for name, ratio in ratios.items():
            row = [name + label]
            for key, _, _, better in columns:
                value = ratio.get(key)
                row.append("" if not better else ("-" if value is None else f"{value:.2f}x"))
            row.append("")
            rows.append(row)
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    lines = [f"== {scenario}: {describe(scenario, o)} (medians of {o.repeat} run(s))"]
    for r in [header] + rows:
        lines.append("  " + "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in
                                       enumerate(zip(r, widths))))
    for name, data in summary["targets"].items():
        for i, run in enumerate(data["runs"]):
            if not run.get("ok"):
                lines.append(f"  FAILED {name} run {i + 1}: {'; '.join(run.get('problems') or [])[:800]}")
    if o.repeat > 1 and summary["ratios"]:
        lines.append("  (ratios: of the medians; 'paired': the median of the per-repeat ratios)")
    lines.append(f"  ({TARGETS_NOTE[scenario]})")
    return "\n".join(lines)


def describe(scenario: str, o: argparse.Namespace) -> str:
    if scenario == "commands":
        return (f"{o.clients} closed-loop clients (customer places, staff approves and ships or cancels), "
                f"synchronous={o.synchronous}, {o.duration:g} s")
    if scenario == "fanout":
        staff = round(o.subscribers * o.staff_share)
        pace = f"{o.rate:g} commands/s" if o.rate else f"flat out (<= {o.window} commands ahead of delivery)"
        return (f"{o.subscribers} subscribers ({staff} staff on orders, {o.subscribers - staff} customers on "
                f"their own orders), {pace}, {o.duration:g} s; latency = driver send -> subscriber receipt (Python "
                f"workers) or event `at` -> receipt (@node: one Node.js `ws` process)")
    if scenario == "replay":
        return f"one staff client subscribes to orders + inventory from since 0 on a {o.events:,}-event log"
    if scenario == "connections":
        return f"{o.connections:,} idle subscribed connections, then {o.rounds} new events 1 s apart"
    return (f"one subscriber stops reading while ~{o.stall_events:,} events are appended (>= {o.stall_seconds:g} s), "
            "then catches up")
