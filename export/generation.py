"""Sampling inside the ONNX graph: the step model grows a generation loop, in the same file.

Calling onnxruntime once per character costs more in Python and call overhead than the LSTM math
itself (bench/RESULTS.md, ``call_cost``). So the exported graph can also *sample*: it runs an ONNX
``Loop`` — feed a character through the LSTMs, sample the next one for every row, feed that back —
K times, and returns the K sampled ids. With K = 0 the graph is exactly the step model (same
outputs, bit for bit), which is what parity checks and ``textgen eval`` use.

Inputs added to the step model (B rows, K steps; K may be 0), named in ``textgen.contract``:
    sample_noise (B, K, V) float32   standard Gumbel noise per row, step and character, from the
                                     caller's RNG (zeros for greedy rows)
    temperature  (B,)      float32   <= 0: greedy (the most likely character)
    top_k        (B,)      int64     <= 0: off
    top_p        (B,)      float32   >= 1: off
Output added:
    sampled_ids  (B, K)    int32
State outputs (``h_i_out``/``c_i_out``) are the state after ``char_ids`` and the first K - 1 sampled
ids: the last sampled id is *pending*, the next call's ``char_ids`` (B, 1). A generation is one call
with the prompt, then one call per chunk of K characters with the pending id.

Who computes what, with K > 0: the fp32 step model consumes ``char_ids[:, :-1]`` (it sits in an
``If``: skipped when that is empty, as for a pending id), and the loop consumes the last character
of ``char_ids`` and then each sampled id. So every character a generation feeds after the prompt's
first T - 1 goes through the loop's LSTMs, wherever the calls begin and end: the text does not
depend on the chunk sizes, nor on whether a prompt came in one call or as a K = 0 call of its
first T - 1 characters and its last one. (``logits`` then covers ``char_ids[:, :-1]``.)

Sampling is the Gumbel-max trick: id = argmax(logits / temperature + noise) draws from
softmax(logits / temperature) exactly, in 3 graph nodes per step instead of ~15 for an inverse CDF.
Top-k / top-p first set the logits outside the kept set to -inf: sort descending, keep rank < top_k
and exclusive cumulative probability < top_p (the first always; top_p >= 1 keeps all), keep logits
>= the smallest kept one. When no row of a call asks for top-k or top-p, a loop without that work
runs instead. The serving layer's ``sample_rows`` is the same rule in numpy (the tests compare them).

The loop's LSTMs use int8 weights by default (onnxruntime's DynamicQuantizeLSTM, per-tensor, made by
``quantize_dynamic`` on the same LSTM ops): a quarter of the fp32 weights' bytes, small enough for a
core's L2 cache, and so faster per character, with a next-character distribution close to fp32's
(export checks its total variation). DynamicQuantizeLSTM quantizes its inputs with one scale per
tensor, taken from the whole batch; two sentinel units per LSTM pin that scale (see
``_with_sentinels``), so that every row is computed exactly as if it were alone. ``precision="fp32"``
keeps fp32 weights (then the loop's numbers equal the step model's).

The graph is built by ``GraphBuilder`` (a node list and initializers) in named pieces, in graph
order: the step model moved into an ``If`` (``_run_step_model``), the loop's start and initial state,
the per-row settings (``_settings``), the two loops (``_loop``: embedding, ``_lstm_node`` per layer,
Dense, ``_sample``) and the outputs (``_outputs``).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from textgen.contract import CHAR_IDS, GREEDY_TEMPERATURE, LOGITS, NOISE, SAMPLED_IDS, TEMPERATURE, TOP_K, TOP_P

PRECISIONS = ("int8", "fp32")
OPSET = 17  # of the exported graph: tf2onnx converts at it, and the LSTMs handed to quantize_dynamic use it


class GraphError(ValueError):
    pass


# ---------------------------------------------------------------------------------------------
# Building blocks


class GraphBuilder:
    """The nodes of one graph being built, and the initializers of the whole model: a subgraph's
    builder (``sub``) has its own nodes and adds its constants to the main graph, whose
    initializers every subgraph (If branch, Loop body) sees."""

    def __init__(self, initializers: list | None = None) -> None:
        self.nodes: list = []
        self.initializers = [] if initializers is None else initializers

    def sub(self) -> GraphBuilder:
        return GraphBuilder(self.initializers)

    def const(self, name: str, value) -> str:
        """An initializer holding ``value``; returns its name."""
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def copy(self, tensor, name: str) -> str:
        """An initializer copied from ``tensor`` under ``name``, once (a second copy is skipped)."""
        import onnx

        if all(i.name != name for i in self.initializers):
            t = onnx.TensorProto()
            t.CopyFrom(tensor)
            t.name = name
            self.initializers.append(t)
        return name

    def node(self, op: str, ins: list[str], outs: str | list[str], **attrs) -> str:
        """Append a node; returns its (first) output."""
        from onnx import helper

        outs = outs if isinstance(outs, list) else [outs]
        self.nodes.append(helper.make_node(op, ins, outs, **attrs))
        return outs[0]


def _value(name: str, elem_type: int, shape=None):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, shape)


def _attributes(node) -> dict:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _initializers(graph):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _types():
    from onnx import TensorProto

    return TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL


# ---------------------------------------------------------------------------------------------
# What the loop takes from tf2onnx's step model


@dataclass
class StepModel:
    """The weights and names of tf2onnx's step graph that the loop reuses."""

    emb: str  # embedding table (V, E)
    kernel: str  # Dense kernel (H_last, V)
    bias: str  # Dense bias (V,)
    lstms: list  # the LSTM nodes, one per layer
    vocab_size: int
    hidden: list[int]  # hidden size per layer
    state_in: list[str]  # h_0, c_0, ...
    state_out: list[str]  # h_0_out, c_0_out, ...


def _find_step_model(graph, n_layers: int, state_outputs: list[str]) -> StepModel:
    """The embedding table, the LSTM ops and the Dense kernel/bias in tf2onnx's step graph."""
    inits = _initializers(graph)
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    if len(lstms) != n_layers:
        raise GraphError(f"expected {n_layers} LSTM ops, found {len(lstms)}")
    emb = [n.input[0] for n in graph.node
           if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].ndim == 2]
    kernels = [n.input[1] for n in graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].ndim == 2]
    logits_add = [n for n in graph.node if n.op_type == "Add" and LOGITS in n.output]
    bias = [i for n in logits_add for i in n.input if i in inits and inits[i].ndim == 1]
    if len(emb) != 1 or len(kernels) != 1 or len(bias) != 1:
        raise GraphError("could not find the embedding, Dense kernel and bias in the converted graph")
    return StepModel(
        emb=emb[0], kernel=kernels[0], bias=bias[0], lstms=lstms, vocab_size=int(inits[bias[0]].shape[0]),
        hidden=[int(_attributes(lstm)["hidden_size"]) for lstm in lstms],
        state_in=[i.name for i in graph.input if i.name != CHAR_IDS][: len(state_outputs)],
        state_out=list(state_outputs),
    )


# ---------------------------------------------------------------------------------------------
# int8: sentinels and quantize_dynamic

SENTINELS = 2  # extra hidden units (and embedding columns) per int8 LSTM, see _with_sentinels
SENTINEL_H = np.array([1.0, -1.0], np.float32)  # their h: every real h is in [-1, 1]
SENTINEL_C = np.array([30.0, -30.0], np.float32)  # their c: tanh(±30) is ±1 in float32
SENTINEL_GATE_BIAS = 100.0  # saturates their gates: i = 0, o = f = 1 (exactly, in float32)


def _with_sentinels(w: np.ndarray, r: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An LSTM's W (1, 4H, I), R (1, 4H, H), B (1, 8H) -> the same LSTM with SENTINELS more inputs
    and hidden units: W (1, 4(H+2), I+2), R (1, 4(H+2), H+2), B (1, 8(H+2)).

    Why: DynamicQuantizeLSTM quantizes X and h with ONE scale and zero point per tensor, from the
    min and max over the whole batch, so a row's characters would depend on the other rows of its
    batch. Two hidden units whose h is always +1 and -1 (every real h = o * tanh(c) lies in
    [-1, 1]) and two input columns of ±max|X| make that range the same for every batch: each row is
    then computed exactly as if it were alone. The new weights are 0 (the real units never see
    the sentinels, and int8 keeps 0 exact); the sentinels' gates are saturated by their biases
    (i = 0, o = f = 1), so h = tanh(c) = ±1 for their c = ±30 at every step. Adding zeros leaves
    max|W| and so the weights' per-tensor scale unchanged."""
    h4, n_in = w.shape[1], w.shape[2]
    h = h4 // 4
    s = SENTINELS

    def gates(a: np.ndarray, cols: int) -> np.ndarray:  # (4H, cols) -> (4(H+2), cols + 2), zeros added
        out = np.zeros((4, h + s, cols + s), a.dtype)
        out[:, :h, :cols] = a.reshape(4, h, cols)
        return out.reshape(4 * (h + s), cols + s)

    bias = np.zeros((2, 4, h + s), b.dtype)  # (Wb, Rb) x gates i, o, f, c
    bias[:, :, :h] = b.reshape(2, 4, h)
    bias[0, :3, h:] = np.array([-1.0, 1.0, 1.0])[:, None] * SENTINEL_GATE_BIAS  # i, o, f
    return gates(w[0], n_in)[None], gates(r[0], h)[None], bias.reshape(1, -1)


def _lstms_with_sentinels(model, lstms):
    """A model holding just these LSTM ops, with sentinels (``_with_sentinels``): what
    ``quantize_dynamic`` gets."""
    from onnx import helper, numpy_helper

    f32 = _types()[0]
    inits = _initializers(model.graph)
    nodes, inputs, outputs, used = [], [], [], []
    for k, node in enumerate(lstms):
        _, w, r, b = node.input[:4]
        w8, r8, b8 = (f"lstm{k}_{n}" for n in ("W", "R", "B"))
        ws, rs, bs = _with_sentinels(inits[w], inits[r], inits[b])
        attrs = _attributes(node)
        attrs["hidden_size"] = int(attrs["hidden_size"]) + SENTINELS
        xin, h, c = f"q_x{k}", f"q_h{k}", f"q_c{k}"
        nodes.append(helper.make_node("LSTM", [xin, w8, r8, b8, "", h, c], [f"q_y{k}", f"q_yh{k}", f"q_yc{k}"],
                                      name=f"q_lstm{k}", **attrs))
        inputs += [_value(n, f32) for n in (xin, h, c)]
        outputs.append(_value(f"q_y{k}", f32))
        used += [numpy_helper.from_array(ws, w8), numpy_helper.from_array(rs, r8), numpy_helper.from_array(bs, b8)]
    src = helper.make_model(helper.make_graph(nodes, "lstms", inputs, outputs, used),
                            opset_imports=[helper.make_opsetid("", OPSET)])
    src.ir_version = model.ir_version
    return src


def _quantized_lstms(model, lstms) -> list:
    """quantize_dynamic on a graph holding just these LSTM ops, with sentinels
    -> their DynamicQuantizeLSTM nodes and initializers (int8 weights in the quantizer's own layout
    and naming, no guessing; fp32 biases)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(_lstms_with_sentinels(model, lstms), Path(tmp) / "lstm.onnx")
        logging.disable(logging.WARNING)  # its advice to pre-process a graph of LSTMs only is noise
        try:
            quantize_dynamic(Path(tmp) / "lstm.onnx", Path(tmp) / "lstm_q8.onnx", weight_type=QuantType.QInt8,
                             per_channel=False, op_types_to_quantize=["LSTM"])
        finally:
            logging.disable(logging.NOTSET)
        quantized = onnx.load(Path(tmp) / "lstm_q8.onnx")
    q_nodes = [n for n in quantized.graph.node if n.op_type == "DynamicQuantizeLSTM"]
    if len(q_nodes) != len(lstms):
        raise GraphError(f"quantize_dynamic made {len(q_nodes)} DynamicQuantizeLSTM ops for {len(lstms)} LSTMs")
    q_inits = {i.name: i for i in quantized.graph.initializer}
    return [(n, [q_inits[i] for i in n.input if i in q_inits]) for n in q_nodes]


def _sentinel_weights(b: GraphBuilder, inits: dict, step: StepModel) -> tuple[str, str]:
    """The embedding and Dense kernel with the sentinels' columns: ±max|embedding| inputs (V, E + 2),
    zero Dense weights (H + 2, V). Returns their names."""
    table, kernel = inits[step.emb], inits[step.kernel]
    bound = np.float32(np.abs(table).max() or 1.0)
    sentinel_cols = np.tile(np.array([bound, -bound], np.float32), (len(table), 1))
    emb = b.const("gen_q_embedding", np.concatenate([table, sentinel_cols], axis=1))
    kernel = b.const("gen_q_kernel", np.concatenate([kernel, np.zeros((SENTINELS, kernel.shape[1]), np.float32)]))
    return emb, kernel


# ---------------------------------------------------------------------------------------------
# Once per call: the step model, the loop's start, the settings


def _shared_constants(b: GraphBuilder, vocab_size: int) -> None:
    """Constants used in several places of the graph (the loops included)."""
    for i in range(2):
        b.const(f"gen_ax{i}", np.array([i], np.int64))
    b.const("gen_v", np.array([vocab_size], np.int64))
    b.const("gen_inf", np.array(np.inf, np.float32))
    b.const("gen_ninf", np.array(-np.inf, np.float32))
    b.const("gen_zero_i", np.array(0, np.int64))
    b.const("gen_one_1", np.array([1], np.int64))
    b.const("gen_true", np.array(True))
    b.const("gen_zero_1", np.array([0], np.int64))


def _split_char_ids(b: GraphBuilder, vocab_size: int) -> None:
    """K > 0: the step model takes char_ids[:, :-1] (gen_step_ids; all of char_ids when K = 0) and
    runs only if that is not empty (gen_run_step); gen_empty_logits_shape is (B, 0, V)."""
    b.node("Shape", [CHAR_IDS], "gen_b", start=0, end=1)  # [B]
    b.node("Shape", [CHAR_IDS], "gen_t_ids", start=1, end=2)  # [T]
    b.node("Shape", [NOISE], "gen_k_1", start=1, end=2)  # [K]
    b.node("Min", ["gen_k_1", "gen_one_1"], "gen_sampling")  # [1] if K > 0 else [0]
    b.node("Sub", ["gen_t_ids", "gen_sampling"], "gen_t_step")
    b.node("Slice", [CHAR_IDS, b.const("gen_start", np.array([0], np.int64)), "gen_t_step", "gen_ax1"],
           "gen_step_ids")
    b.node("Greater", ["gen_t_step", "gen_zero_1"], "gen_run_step")
    b.node("Concat", ["gen_b", b.const("gen_0v", np.array([0, vocab_size], np.int64))], "gen_empty_logits_shape",
           axis=0)


def _run_step_model(b: GraphBuilder, graph, step: StepModel) -> list[str]:
    """Move tf2onnx's step model (every node of ``graph``) into an If on gen_run_step: it runs on
    gen_step_ids, its outputs become the If's (logits and step_<state output>); else the logits are
    empty and the state passes through. Returns the step state outputs."""
    from onnx import helper, numpy_helper

    f32 = _types()[0]
    step_out = [f"step_{n}" for n in step.state_out]
    then_out = {n: f"then_{n}" for n in [LOGITS, *step.state_out]}
    step_nodes = list(graph.node)
    for n in step_nodes:
        n.input[:] = ["gen_step_ids" if i == CHAR_IDS else i for i in n.input]
        n.output[:] = [then_out.get(o, o) for o in n.output]
    del graph.node[:]
    for o in list(graph.output):
        if o.name in step.state_out:
            graph.output.remove(o)
    then_branch = helper.make_graph(step_nodes, "step_model", [], [_value(o, f32) for o in then_out.values()],
                                    value_info=list(graph.value_info))
    del graph.value_info[:]
    no_step = b.sub()
    no_step.node("ConstantOfShape", ["gen_empty_logits_shape"], "else_logits",
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))
    for i, n in zip(step.state_in, step.state_out):
        no_step.node("Identity", [i], f"else_{n}")
    else_branch = helper.make_graph(no_step.nodes, "no_step", [],
                                    [_value(n, f32) for n in ["else_logits", *(f"else_{n}" for n in step.state_out)]])
    b.node("If", ["gen_run_step"], [LOGITS, *step_out], then_branch=then_branch, else_branch=else_branch)
    return step_out


def _loop_start(b: GraphBuilder) -> None:
    """The loop's first input id, char_ids[:, -1] (gen_prev0, (1, B) int64), and its empty list of
    sampled ids (gen_ids0, (0, B))."""
    from onnx import numpy_helper

    i64 = _types()[1]
    b.node("Slice", [CHAR_IDS, b.const("gen_minus1", np.array([-1], np.int64)),
                     b.const("gen_end", np.array([np.iinfo(np.int64).max], np.int64)), "gen_ax1"], "gen_last_b1")
    b.node("Transpose", ["gen_last_b1"], "gen_last_1b", perm=[1, 0])
    b.node("Cast", ["gen_last_1b"], "gen_prev0", to=i64)  # (1, B)
    b.node("Concat", ["gen_zero_1", "gen_b"], "gen_ids0_shape", axis=0)
    b.node("ConstantOfShape", ["gen_ids0_shape"], "gen_ids0", value=numpy_helper.from_array(np.zeros(1, np.int64)))


def _initial_state(b: GraphBuilder, step: StepModel, step_state: list[str], sentinels: bool) -> list[str]:
    """The loop's initial state, the step model's state in the ONNX LSTM state layout (1, B, H); with
    sentinels (1, B, H + 2), their h and c appended (h, c alternate in the state). Returns its names."""
    state0 = [f"gen_{n}_0" for n in step.state_out]
    if not sentinels:
        for s, s0 in zip(step_state, state0):
            b.node("Unsqueeze", [s, "gen_ax0"], s0)
        return state0
    b.node("Concat", ["gen_ax1", "gen_b", b.const("gen_two", np.array([SENTINELS], np.int64))], "gen_sentinel_shape",
           axis=0)
    b.node("Expand", [b.const("gen_sentinel_h", SENTINEL_H[None, None]), "gen_sentinel_shape"], "gen_sentinel_h_b")
    b.node("Expand", [b.const("gen_sentinel_c", SENTINEL_C[None, None]), "gen_sentinel_shape"], "gen_sentinel_c_b")
    for i, (s, s0) in enumerate(zip(step_state, state0)):
        real = b.node("Unsqueeze", [s, "gen_ax0"], f"{s0}_real")
        b.node("Concat", [real, "gen_sentinel_c_b" if i % 2 else "gen_sentinel_h_b"], s0, axis=2)
    return state0


def _settings(b: GraphBuilder, vocab_size: int) -> None:
    """Per-row settings, (1, B, 1) and (1, B, V): gen_inv_t = 1 / max(temperature, GREEDY_TEMPERATURE),
    gen_in_k (rank < top_k, or top-k off), gen_p (top_p, +inf when off) and gen_any_filters (does any
    row of the call ask for top-k or top-p?)."""
    _, i64, _, bool_ = _types()
    b.const("gen_shape_1b1", np.array([1, -1, 1], np.int64))
    b.node("Reshape", [TEMPERATURE, "gen_shape_1b1"], "gen_temp")
    b.node("Max", ["gen_temp", b.const("gen_tmin", np.array(GREEDY_TEMPERATURE, np.float32))], "gen_temp_safe")
    b.node("Reciprocal", ["gen_temp_safe"], "gen_inv_t")
    b.node("Reshape", [TOP_P, "gen_shape_1b1"], "gen_p_row")
    b.node("Reshape", [TOP_K, "gen_shape_1b1"], "gen_k_row")
    b.node("Less", [b.const("gen_rank", np.arange(vocab_size, dtype=np.int64)[None, None]), "gen_k_row"], "gen_k_in")
    b.node("LessOrEqual", ["gen_k_row", "gen_zero_i"], "gen_k_off")
    b.node("Or", ["gen_k_in", "gen_k_off"], "gen_in_k")
    # Does any row filter? (top_k > 0 or top_p < 1) -> the loop with filters, else the lean one.
    b.node("Not", ["gen_k_off"], "gen_k_on")
    b.node("Less", ["gen_p_row", b.const("gen_one_f", np.array(1, np.float32))], "gen_p_on")
    # top_p >= 1 keeps every character, also those after a cumulative probability that
    # rounds to 1 (rows without filters then sample as in the lean loop, bit for bit).
    b.node("Where", ["gen_p_on", "gen_p_row", "gen_inf"], "gen_p")
    b.node("Or", ["gen_k_on", "gen_p_on"], "gen_row_filters")
    b.node("Cast", ["gen_row_filters"], "gen_row_filters_i", to=i64)
    b.node("ReduceMax", ["gen_row_filters_i"], "gen_any_i", keepdims=0)
    b.node("Cast", ["gen_any_i"], "gen_any_filters", to=bool_)


def _noise_and_trips(b: GraphBuilder) -> None:
    """The noise made time-major (K, 1, B, V), and the trip counts of the two loops."""
    b.node("Transpose", [NOISE], "gen_noise_kbv", perm=[1, 0, 2])
    b.node("Unsqueeze", ["gen_noise_kbv", "gen_ax1"], "gen_noise4")
    b.node("Squeeze", ["gen_k_1", "gen_ax0"], "gen_k")
    # Two loops, one runs: an If around them would slow every step (onnxruntime runs a Loop
    # nested in an If much slower), so the unused one gets 0 trips.
    b.node("Where", ["gen_any_filters", "gen_k", "gen_zero_i"], "f_trips")
    b.node("Where", ["gen_any_filters", "gen_zero_i", "gen_k"], "n_trips")


# ---------------------------------------------------------------------------------------------
# The loop body: sampling and the LSTMs


def _sample(body: GraphBuilder, logits: str, noise: str, filters: bool) -> str:
    """Nodes sampling one id per row: logits and noise (1, B, V) -> ids (1, B) int64. Temperature,
    then (with filters) top-k / top-p, then Gumbel-max: argmax(logits / temperature + noise)."""
    scaled = body.node("Mul", [logits, "gen_inv_t"], "scaled")
    if filters:
        scaled = _top_k_top_p(body, scaled)
    perturbed = body.node("Add", [scaled, noise], "perturbed")
    return body.node("ArgMax", [perturbed], "id", axis=2, keepdims=0)  # (1, B)


def _top_k_top_p(body: GraphBuilder, scaled: str) -> str:
    """The logits outside each row's kept set -> -inf: sort descending, keep rank < top_k (gen_in_k)
    and exclusive cumulative probability < top_p (gen_p), keep logits >= the smallest kept one."""
    body.node("TopK", [scaled, "gen_v"], ["sorted", "order"], axis=-1, largest=1, sorted=1)
    body.node("Softmax", ["sorted"], "probs", axis=-1)
    body.node("CumSum", ["probs", body.const("axis", np.array(2, np.int64))], "excl", exclusive=1)
    body.node("Less", ["excl", "gen_p"], "in_p")  # top-p: keeps the first always
    body.node("And", ["in_p", "gen_in_k"], "keep")
    body.node("Where", ["keep", "sorted", "gen_inf"], "kept")
    body.node("ReduceMin", ["kept"], "cut", axes=[2], keepdims=1)  # opset 17: attribute
    body.node("GreaterOrEqual", [scaled, "cut"], "allowed")
    return body.node("Where", ["allowed", scaled, "gen_ninf"], "filtered")


@dataclass
class LoopWeights:
    """What the loop body multiplies by: the embedding and Dense kernel (with the sentinels' columns
    for int8), and per layer the DynamicQuantizeLSTM node and its initializers (None: fp32)."""

    emb: str
    kernel: str
    quantized: list | None = None


def _lstm_node(body: GraphBuilder, k: int, lstm, weights: LoopWeights, x: str, h_in: str, c_in: str,
               outs: list[str]) -> None:
    """Layer k of the loop body: the step model's own LSTM op (fp32), or its DynamicQuantizeLSTM with
    sentinels (int8), whose initializers join the model once (both loops use them)."""
    if weights.quantized is None:
        body.node("LSTM", [x, *lstm.input[1:4], "", h_in, c_in], outs, **_attributes(lstm))
        return
    qnode, qinits = weights.quantized[k]
    rename = {i.name: f"gen_q{k}_{i.name}" for i in qinits}
    ins = [rename.get(i, i) for i in qnode.input]
    ins[0], ins[5], ins[6] = x, h_in, c_in
    for i in qinits:
        if rename[i.name] in ins:
            body.copy(i, rename[i.name])
    body.node("DynamicQuantizeLSTM", ins, outs, domain="com.microsoft", **_attributes(qnode))


def _loop_body_signature(n_state: int) -> tuple[list, list]:
    """The Loop body's inputs (iter, cond, prev id, state..., ids so far) and outputs (the same but iter)."""
    f32, i64, _, bool_ = _types()

    def carried(io: str) -> list:
        return [_value(f"cond_{io}", bool_, []), _value(f"prev_{io}", i64, [1, "batch"]),
                *[_value(f"s{i}_{io}", f32, [1, "batch", None]) for i in range(n_state)],
                _value(f"ids_{io}", i64, [None, "batch"])]

    return [_value("iter", i64, []), *carried("in")], carried("out")


def _loop(b: GraphBuilder, step: StepModel, weights: LoopWeights, state0: list[str], filters: bool) -> list[str]:
    """A Loop of f_trips (with filters) or n_trips samples: embed the previous id (char_ids[:, -1]
    first) -> LSTMs (T = 1: each Y_h is the next layer's X) -> logits -> sample -> append the id.
    Values are time-major (1, B, ...) like the ONNX LSTM op's, so nothing is reshaped.
    Returns [ids (K, B), state...]."""
    from onnx import helper

    p = "f_" if filters else "n_"
    body = b.sub()
    body.node("Identity", ["cond_in"], "cond_out")
    noise = body.node("Gather", ["gen_noise4", "iter"], "noise_t", axis=0)  # (1, B, V)
    x = body.node("Gather", [weights.emb, "prev_in"], "x0", axis=0)  # (1, B, E)
    for k, lstm in enumerate(step.lstms):
        _lstm_node(body, k, lstm, weights, x, f"s{2 * k}_in", f"s{2 * k + 1}_in",
                   [f"y{k}", f"s{2 * k}_out", f"s{2 * k + 1}_out"])
        x = f"s{2 * k}_out"  # Y_h (1, B, H) is the next layer's input for T = 1
    body.node("MatMul", [x, weights.kernel], "z")
    sampled = _sample(body, body.node("Add", ["z", step.bias], "logits_t"), noise, filters)
    body.node("Identity", [sampled], "prev_out")
    body.node("Concat", ["ids_in", sampled], "ids_out", axis=0)  # (t + 1, B)
    loop_body = helper.make_graph(body.nodes, f"{p}generate_step", *_loop_body_signature(len(state0)))
    outs = [f"{p}ids", *[f"{p}s{i}" for i in range(len(state0))]]
    b.node("Loop", [f"{p}trips", "gen_true", "gen_prev0", *state0, "gen_ids0"], [f"{p}prev_last", *outs[1:], outs[0]],
           body=loop_body)
    return outs


# ---------------------------------------------------------------------------------------------
# The outputs, and the whole


def _outputs(b: GraphBuilder, step: StepModel, f_outs: list[str], n_outs: list[str], sentinels: bool) -> None:
    """sampled_ids (B, K) int32 and the state outputs (the state before the pending, last sampled id;
    without the sentinels) from the loop that ran. The other returns its initial values: no ids
    (0, B), the state it was given."""
    b.node("Concat", [f_outs[0], n_outs[0]], "gen_ids_kb", axis=0)
    for i, (f, n) in enumerate(zip(f_outs[1:], n_outs[1:])):
        b.node("Where", ["gen_any_filters", f, n], f"gen_s{i}")
    b.node("Transpose", ["gen_ids_kb"], "gen_ids_bk", perm=[1, 0])  # (K, B) -> (B, K)
    b.node("Cast", ["gen_ids_bk"], SAMPLED_IDS, to=_types()[2])
    for i, name in enumerate(step.state_out):
        final = f"gen_s{i}"
        if sentinels:
            final = b.node("Slice", [final, b.const(f"gen_s{i}_from", np.array([0], np.int64)),
                                     b.const(f"gen_s{i}_to", np.array([step.hidden[i // 2]], np.int64)),
                                     b.const(f"gen_s{i}_axis", np.array([2], np.int64))], f"gen_s{i}_real")
        b.node("Squeeze", [final, "gen_ax0"], name)


def _declare_io(graph, step: StepModel) -> None:
    """The sampling inputs and the outputs (the state outputs again, now the loop's, and sampled_ids)."""
    f32, i64, i32, _ = _types()
    graph.input.extend([_value(NOISE, f32, ["batch", "steps", step.vocab_size]), _value(TEMPERATURE, f32, ["batch"]),
                        _value(TOP_K, i64, ["batch"]), _value(TOP_P, f32, ["batch"])])
    graph.output.extend([_value(n, f32, ["batch", None]) for n in step.state_out])
    graph.output.append(_value(SAMPLED_IDS, i32, ["batch", "steps"]))


def add_generation_loop(model, n_layers: int, state_outputs: list[str], precision: str = "int8"):
    """Append the sampling loop to tf2onnx's step model (in place); see the module docstring.

    Layout, kept lean (every node of the loop costs time at every step):
      once per call: the step model, inside an ``If``, on char_ids[:, :-1] (all of char_ids when
      K = 0; skipped when that is empty); 1/temperature, the top-k/top-p masks, the noise made
      time-major;
      Loop, K times: embed the previous id (char_ids[:, -1] first) -> LSTMs -> logits -> sample
      -> append the id.
    So every character after the prompt's first T - 1, the prompt's last one included, goes
    through the loop's LSTMs whatever the chunk sizes: a text does not depend on where the calls
    begin and end (with int8 weights the step model's fp32 LSTMs would give other numbers)."""
    from onnx import helper

    if precision not in PRECISIONS:
        raise GraphError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    g = model.graph
    step = _find_step_model(g, n_layers, state_outputs)
    b = GraphBuilder()
    _shared_constants(b, step.vocab_size)
    weights = LoopWeights(step.emb, step.kernel)
    if precision == "int8":
        weights = LoopWeights(*_sentinel_weights(b, _initializers(g), step), _quantized_lstms(model, step.lstms))
    _split_char_ids(b, step.vocab_size)
    step_state = _run_step_model(b, g, step)
    _loop_start(b)
    state0 = _initial_state(b, step, step_state, sentinels=weights.quantized is not None)
    _settings(b, step.vocab_size)
    _noise_and_trips(b)
    with_filters = _loop(b, step, weights, state0, filters=True)
    lean = _loop(b, step, weights, state0, filters=False)
    _outputs(b, step, with_filters, lean, sentinels=weights.quantized is not None)
    g.node.extend(b.nodes)
    g.initializer.extend(b.initializers)
    _declare_io(g, step)
    if precision == "int8" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model
