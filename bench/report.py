"""The results of a run as a markdown table (one row per figure, each a ratio
against a baseline measured in the same run, absolute numbers alongside) and as
JSON."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    number: str
    figure: str
    measured: str
    baseline: str
    ratio: float | None
    ideal: str
    # whether the figure is far from its ideal (see the thresholds)
    far: bool
    # what makes it far, when that is not the ratio itself
    why: str = ""


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _latencies(stats: dict[str, float]) -> str:
    return f"p50 {_ms(stats['p50'])}, p95 {_ms(stats['p95'])}, max {_ms(stats['max'])}"


def _rate(load: dict[str, Any], unit: str = "/s") -> str:
    text = (
        f"{load['per_second']:.0f}{unit}, p50 {load['latency_p50_ms']:.0f} ms,"
        f" p99 {load['latency_p99_ms']:.0f} ms"
    )
    errors = sum(load["errors"].values())
    if errors:
        kinds = ", ".join(f"{n} x {kind}" for kind, n in load["errors"].items())
        text += f"; **{errors} failed ({kinds})**"
    return text


def _fallback_rows(result: dict[str, Any]) -> list[Row]:
    direct = result["direct"]
    rows = []
    for key, number, what in (
        ("refused", "1a", "B refuses connections"),
        ("silent", "1b", "B accepts TCP, never answers"),
    ):
        stats = result[key]
        rows.append(
            Row(
                number,
                f"Fallback latency A -> deposit on R, {what} ({stats['n']} messages)",
                _latencies(stats),
                f"direct A -> B, B up: {_latencies(direct)}",
                stats["p50"] / direct["p50"],
                "max <= 2 s",
                stats["max"] > 2,
                f"max {_ms(stats['max'])}",
            )
        )
    silent, refused = result["latencies"]["silent"], result["latencies"]["refused"]
    rows.append(
        Row(
            "1c",
            "First message of an outage, A -> deposit on R, B accepts TCP and never"
            " answers",
            _ms(silent[0]),
            f"first message while B refuses connections: {_ms(refused[0])}",
            silent[0] / refused[0],
            "< 2 s",
            silent[0] >= 2,
            f"{_ms(silent[0])}",
        )
    )
    return rows


def _backends(results: dict[str, Any]) -> list[tuple[str, Any]]:
    """Per-backend results, SQLite first (JSON files keep keys sorted)."""
    order = {"sqlite": 0, "postgres": 1}
    return sorted(results.items(), key=lambda item: order.get(item[0], 2))


def _deposit_rows(results: dict[str, Any]) -> list[Row]:
    rows = []
    for backend, result in _backends(results):
        baseline = result["public_rooms"]
        deposit = result["deposit"]
        rows.append(
            Row(
                "2",
                f"Deposit throughput on R, {backend} ({result['transaction_bytes']} B"
                f" transactions, {result['concurrency']} in flight)",
                _rate(deposit, " deposits/s"),
                f"signed GET publicRooms: {_rate(baseline, ' req/s')}",
                deposit["ratio"],
                ">= 0.8",
                (deposit["ratio"] or 0) < 0.8,
            )
        )
        body = result.get("public_rooms_body")
        if body is not None:
            rows.append(
                Row(
                    "2+",
                    "(context) the baseline's request carrying a deposit's body"
                    f" (signed POST publicRooms, refused after authentication),"
                    f" {backend}",
                    _rate(body, " req/s"),
                    "same baseline",
                    body["ratio"],
                    "",
                    False,
                )
            )
            rows.append(
                Row(
                    "2+",
                    f"(context) what storing adds to receiving the body: deposits"
                    f" against that POST, {backend}",
                    f"{deposit['per_second']:.0f} deposits/s",
                    f"{body['per_second']:.0f} req/s",
                    deposit["per_second"] / body["per_second"],
                    "",
                    False,
                )
            )
        collect = result["empty_collect"]
        rows.append(
            Row(
                "2+",
                f"(context) the owner collecting its empty mailbox (signed GET,"
                f" one DB read), {backend}",
                _rate(collect, " req/s"),
                "same baseline",
                collect["ratio"],
                "",
                False,
            )
        )
        spread = result["deposit_spread"]
        rows.append(
            Row(
                "2+",
                f"(context) deposits spread over 64 destinations, {backend}",
                _rate(spread, " deposits/s"),
                "same baseline",
                spread["ratio"],
                "",
                False,
            )
        )
    return rows


def _delivery_rows(result: dict[str, Any]) -> list[Row]:
    relayed, direct, collect = result["relayed"], result["direct"], result["collect"]
    count = result["transactions"]
    return [
        Row(
            "3",
            f"B ingests {count} transactions ({result['messages']} messages from A):"
            " collected from R vs sent to B's /send",
            f"relayed {relayed['seconds']:.1f} s"
            f" ({1000 * relayed['seconds'] / count:.1f} ms/txn)",
            f"direct {direct['seconds']:.1f} s"
            f" ({1000 * direct['seconds'] / count:.1f} ms/txn)",
            result["ratio"],
            "<= 1.0",
            result["ratio"] > 1.0,
        ),
        Row(
            "3+",
            f"Pure collect cost: the same {count} transactions fetched from R,"
            " no processing",
            f"{collect['per_second']:.0f} txn/s ({collect['seconds']:.2f} s)",
            f"B's direct ingestion {direct['seconds']:.1f} s",
            collect["seconds"] / direct["seconds"],
            "",
            False,
        ),
        Row(
            "3+",
            f"Pure collect cost with batch collect (as B's collector): the same"
            f" {count} transactions fetched from R, no processing",
            f"{collect['batch_per_second']:.0f} txn/s"
            f" ({collect['batch_seconds']:.2f} s)",
            f"relay_txn: {collect['per_second']:.0f} txn/s"
            f" ({collect['seconds']:.2f} s)",
            collect["batch_seconds"] / collect["seconds"],
            "",
            False,
        ),
    ]


def _backlog_rows(results: dict[str, Any]) -> list[Row]:
    rows = []
    for backend, result in _backends(results):
        backlog = result["backlog"]
        queued = f"{backlog['entries']:,} entries queued for others"
        for kind, key in (("deposit", "deposit_ratio"), ("collect", "collect_ratio")):
            full, empty = result["full"][kind], result["empty"][kind]
            unit = " deposits/s" if kind == "deposit" else " entries/s"
            rows.append(
                Row(
                    "4",
                    f"Backlog: {kind} rate with {queued}, {backend}",
                    _rate(full, unit)
                    if kind == "deposit"
                    else f"{full['per_second']:.0f}{unit}",
                    "empty relay: "
                    + (
                        _rate(empty, unit)
                        if kind == "deposit"
                        else f"{empty['per_second']:.0f}{unit}"
                    ),
                    result[key],
                    ">= 0.9",
                    result[key] < 0.9,
                )
            )
        rows.append(
            Row(
                "4+",
                f"Database size per queued byte of transaction JSON, {backend}",
                f"{backlog['database_bytes'] / 2**20:,.0f} MiB for"
                f" {backlog['transaction_bytes'] / 2**20:,.0f} MiB of JSON"
                f" (seeded in {backlog['seconds']:.0f} s)",
                "1 byte per byte",
                backlog["database_bytes_per_queued_byte"],
                "",
                False,
            )
        )
    return rows


BUILDERS = {
    "1": _fallback_rows,
    "2": _deposit_rows,
    "3": _delivery_rows,
    "4": _backlog_rows,
}


def rows(results: dict[str, Any]) -> list[Row]:
    table: list[Row] = []
    for figure, builder in BUILDERS.items():
        result = results.get(figure)
        if result is None:
            continue
        if "error" in result:
            table.append(
                Row(
                    figure,
                    f"figure {figure} failed",
                    result["error"],
                    "",
                    None,
                    "",
                    True,
                )
            )
            continue
        table.extend(builder(result))
    return table


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "| # | figure | measured | baseline (same run) | ratio | ideal |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows(results):
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}"
        if row.far:
            why = f"far: {row.why}" if row.why else "far"
            ratio = f"**{ratio}** ({why})" if ratio else f"**{why}**"
        cells = [row.number, row.figure, row.measured, row.baseline, ratio, row.ideal]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
