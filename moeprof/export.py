"""Export a trace as a long table for pandas, Polars and DuckDB: one row per token x MoE layer.

Columns: ``request_id``, ``position``, ``step``, ``phase`` ("prefill" / "decode"), ``token_id``
(null where the trace does not record them), ``layer`` (dense MoE layer index), ``model_layer``
(the layer's index in the model), ``expert_0`` .. ``expert_{K-1}`` (null where a slot holds no
expert) and ``weight_0`` .. ``weight_{K-1}`` when the trace has gate weights. Rows are in the
trace's order (request, position), layers in order within a token.

Parquet files carry the trace metadata as JSON under the schema metadata key ``moeprof``. Rows are
written in chunks of tokens, so memory stays bounded whatever the trace size; the output appears
only when complete (temporary file + rename).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from moeprof import _io
from moeprof.errors import MoeprofError
from moeprof.trace import PHASE_DECODE, Trace

EXPORT_FORMATS = ("parquet", "csv")
_ROWS_PER_CHUNK = 1 << 20  # token x layer rows converted at a time


def export_schema(trace: Trace) -> pa.Schema:
    """Arrow schema of the exported table (with the trace metadata on parquet)."""
    id_type = pa.uint8() if trace.expert_ids.dtype == np.uint8 else pa.uint16()
    fields = [
        pa.field("request_id", pa.int32(), nullable=False),
        pa.field("position", pa.int32(), nullable=False),
        pa.field("step", pa.int32()),
        pa.field("phase", pa.string()),
        pa.field("token_id", pa.int32()),
        pa.field("layer", pa.int32(), nullable=False),
        pa.field("model_layer", pa.int32(), nullable=False),
    ]
    fields += [pa.field(f"expert_{k}", id_type) for k in range(trace.top_k)]
    if trace.gate_weights is not None:
        fields += [pa.field(f"weight_{k}", pa.float32()) for k in range(trace.top_k)]
    return pa.schema(fields)


def _chunk_table(trace: Trace, lo: int, hi: int, schema: pa.Schema) -> pa.Table:
    """Rows of tokens [lo, hi) as an Arrow table."""
    n_layers, n_tok = trace.n_layers, hi - lo
    layer_dense = np.tile(np.arange(n_layers, dtype=np.int32), n_tok)
    model_layer = np.asarray(trace.moe_layer_indices, dtype=np.int32)[layer_dense]

    def per_token(values: np.ndarray | None) -> np.ndarray | None:
        return None if values is None else np.repeat(values[lo:hi], n_layers)

    null_ints = pa.nulls(n_tok * n_layers, pa.int32())
    steps = per_token(trace.steps)
    tokens = per_token(trace.token_ids)
    phase = per_token(trace.phase)
    columns: list[pa.Array] = [
        pa.array(per_token(trace.request_ids)),
        pa.array(per_token(trace.positions)),
        null_ints if steps is None else pa.array(steps, pa.int32()),
        pa.nulls(n_tok * n_layers, pa.string())
        if phase is None
        else pa.DictionaryArray.from_arrays(
            pa.array((phase == PHASE_DECODE).astype(np.int8)), pa.array(["prefill", "decode"])
        ).cast(pa.string()),
        null_ints if tokens is None else pa.array(tokens, pa.int32()),
        pa.array(layer_dense),
        pa.array(model_layer),
    ]
    ids = trace.expert_ids[lo:hi].reshape(n_tok * n_layers, trace.top_k)
    sentinel = np.tile(trace.n_experts.astype(ids.dtype), n_tok)
    id_type = schema.field("expert_0").type
    for k in range(trace.top_k):
        col = ids[:, k]
        columns.append(pa.array(col, id_type, mask=col == sentinel))
    if trace.gate_weights is not None:
        weights = trace.gate_weights[lo:hi].reshape(n_tok * n_layers, trace.top_k)
        for k in range(trace.top_k):
            columns.append(pa.array(weights[:, k].astype(np.float32), pa.float32()))
    return pa.Table.from_arrays(columns, schema=schema)


def export_trace(
    trace: Trace,
    path: str | os.PathLike[str],
    format: str = "parquet",
    *,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Write `trace` as a long table; returns the number of rows written (tokens x layers)."""
    if format not in EXPORT_FORMATS:
        raise MoeprofError(
            f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}"
        )
    schema = export_schema(trace)
    meta = json.dumps(trace.metadata(), sort_keys=True)
    tokens_per_chunk = max(1, _ROWS_PER_CHUNK // max(1, trace.n_layers))
    n = trace.n_tokens
    with _io.atomic_path(path) as tmp:
        if format == "parquet":
            import pyarrow.parquet as pq

            writer: pq.ParquetWriter | None = pq.ParquetWriter(
                tmp, schema.with_metadata({"moeprof": meta}), compression="zstd"
            )
        else:
            import pyarrow.csv as pcsv

            writer = None
            csv_writer = pcsv.CSVWriter(tmp, schema)
        try:
            for lo in range(0, n, tokens_per_chunk):
                hi = min(n, lo + tokens_per_chunk)
                table = _chunk_table(trace, lo, hi, schema)
                if writer is not None:
                    writer.write_table(table.replace_schema_metadata({"moeprof": meta}))
                else:
                    csv_writer.write_table(table)
                if progress is not None:
                    progress(hi, n)
        finally:
            if writer is not None:
                writer.close()
            else:
                csv_writer.close()
    return n * trace.n_layers
