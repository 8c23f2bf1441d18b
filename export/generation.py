"""Sampling inside the ONNX graph: the step model grows a generation loop, in the same file.

Calling onnxruntime once per character costs more in Python and call overhead than the LSTM math
itself (FACTS.md: ~110 µs per step, ~9k chars/s at best). So the exported graph can also *sample*:
it runs an ONNX ``Loop`` — feed a character through the LSTMs, sample the next one for every row,
feed that back — K times, and returns the K sampled ids. With K = 0 the graph is exactly the step
model (same outputs, bit for bit), which is what parity checks and ``textgen eval`` use.

Inputs added to the step model (B rows, K steps; K may be 0):
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
runs instead. ``serve.sampling.sample_rows`` is the same rule in numpy (tests compare them).

The loop's LSTMs use int8 weights by default (onnxruntime's DynamicQuantizeLSTM, per-tensor, made by
``quantize_dynamic`` on the same LSTM ops): 0.86 MB of weights instead of 3.4 MB fit in a core's L2
cache, about twice as fast per character, with the next-character distribution within a total
variation of ~0.01 of fp32 (checked at export). DynamicQuantizeLSTM quantizes its inputs with one
scale per tensor, taken from the whole batch; two sentinel units per LSTM pin that scale (see
``_with_sentinels``), so that every row is computed exactly as if it were alone. ``precision="fp32"``
keeps fp32 weights (then the loop's numbers equal the step model's).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from textgen.contract import CHAR_IDS, GREEDY_TEMPERATURE, LOGITS, NOISE, SAMPLED_IDS, TEMPERATURE, TOP_K, TOP_P

PRECISIONS = ("int8", "fp32")


class GraphError(ValueError):
    pass


def _initializers(graph):
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in graph.initializer}


def _find_weights(graph, n_layers: int) -> dict:
    """The embedding table, the LSTM ops and the Dense kernel/bias in tf2onnx's step graph."""
    inits = _initializers(graph)
    lstms = [n for n in graph.node if n.op_type == "LSTM"]
    if len(lstms) != n_layers:
        raise GraphError(f"expected {n_layers} LSTM ops, found {len(lstms)}")
    emb = [n.input[0] for n in graph.node
           if n.op_type == "Gather" and n.input[0] in inits and inits[n.input[0]].ndim == 2]
    kernels = [n.input[1] for n in graph.node
               if n.op_type == "MatMul" and n.input[1] in inits and inits[n.input[1]].ndim == 2]
    logits_add = [n for n in graph.node if n.op_type == "Add" and "logits" in n.output]
    bias = [i for n in logits_add for i in n.input if i in inits and inits[i].ndim == 1]
    if len(emb) != 1 or len(kernels) != 1 or len(bias) != 1:
        raise GraphError("could not find the embedding, Dense kernel and bias in the converted graph")
    return {"emb": emb[0], "kernel": kernels[0], "bias": bias[0], "lstms": lstms}


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


def _quantized_lstms(model, lstms) -> list:
    """quantize_dynamic on a graph holding just these LSTM ops, with sentinels (``_with_sentinels``)
    -> their DynamicQuantizeLSTM nodes and initializers (int8 weights in the quantizer's own layout
    and naming, no guessing; fp32 biases)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization import QuantType, quantize_dynamic

    inits = _initializers(model.graph)
    nodes, inputs, outputs, used = [], [], [], []
    for k, node in enumerate(lstms):
        x, w, r, b = node.input[:4]
        w8, r8, b8 = (f"lstm{k}_{n}" for n in ("W", "R", "B"))
        ws, rs, bs = _with_sentinels(inits[w], inits[r], inits[b])
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs["hidden_size"] = int(attrs["hidden_size"]) + SENTINELS
        xin, h, c = f"q_x{k}", f"q_h{k}", f"q_c{k}"
        nodes.append(helper.make_node("LSTM", [xin, w8, r8, b8, "", h, c], [f"q_y{k}", f"q_yh{k}", f"q_yc{k}"],
                                      name=f"q_lstm{k}", **attrs))
        inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in (xin, h, c)]
        outputs.append(helper.make_tensor_value_info(f"q_y{k}", TensorProto.FLOAT, None))
        used += [numpy_helper.from_array(ws, w8), numpy_helper.from_array(rs, r8), numpy_helper.from_array(bs, b8)]
    graph = helper.make_graph(nodes, "lstms", inputs, outputs, used)
    src = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src.ir_version = model.ir_version
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(src, Path(tmp) / "lstm.onnx")
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


def add_generation_loop(model, n_layers: int, state_outputs: list[str], precision: str = "int8"):
    """Append the sampling loop to tf2onnx's step model (in place); see the module docstring.

    Layout, kept lean (a graph node costs ~1-2 µs per step, as much as the int8 LSTM math):
      once per call: the step model, inside an ``If``, on char_ids[:, :-1] (all of char_ids when
      K = 0; skipped when that is empty); 1/temperature, the top-k/top-p masks, the noise made
      time-major;
      Loop, K times: embed the previous id (char_ids[:, -1] first) -> LSTMs (T = 1: each Y_h is
      the next layer's X) -> logits -> sample -> append the id.
    So every character after the prompt's first T - 1, the prompt's last one included, goes
    through the loop's LSTMs whatever the chunk sizes: a text does not depend on where the calls
    begin and end (with int8 weights the step model's fp32 LSTMs would give other numbers).
    Values in the loop are time-major (1, B, ...) like the ONNX LSTM op's, so nothing is reshaped."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if precision not in PRECISIONS:
        raise GraphError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    g = model.graph
    w = _find_weights(g, n_layers)
    inits = _initializers(g)
    vocab_size = int(inits[w["bias"]].shape[0])
    hidden = [int(helper.get_attribute_value(a)) for lstm in w["lstms"] for a in lstm.attribute
              if a.name == "hidden_size"]
    state_in = [i.name for i in g.input if i.name != CHAR_IDS][: len(state_outputs)]
    const = []
    f32, i64, i32, bool_ = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32, TensorProto.BOOL

    def c(name: str, value) -> str:
        const.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op, ins, outs, **attrs):
        return helper.make_node(op, ins, outs if isinstance(outs, list) else [outs], **attrs)

    # The step model moves into an If: it runs on gen_step_ids; its outputs become the If's.
    step_out = {n: f"step_{n}" for n in state_outputs}
    then_out = {n: f"then_{n}" for n in [LOGITS, *state_outputs]}
    step_nodes = list(g.node)
    for n_ in step_nodes:
        n_.input[:] = ["gen_step_ids" if i == CHAR_IDS else i for i in n_.input]
        n_.output[:] = [then_out.get(o, o) for o in n_.output]
    del g.node[:]
    for o in list(g.output):
        if o.name in step_out:
            g.output.remove(o)
    then_branch = helper.make_graph(
        step_nodes, "step_model", [],
        [helper.make_tensor_value_info(then_out[LOGITS], f32, None),
         *[helper.make_tensor_value_info(then_out[n_], f32, None) for n_ in state_outputs]],
        value_info=list(g.value_info))
    del g.value_info[:]
    else_branch = helper.make_graph(
        [node("ConstantOfShape", ["gen_empty_logits_shape"], "else_logits",
              value=numpy_helper.from_array(np.zeros(1, np.float32))),
         *[node("Identity", [i], f"else_{n_}") for i, n_ in zip(state_in, state_outputs)]],
        "no_step", [],
        [helper.make_tensor_value_info("else_logits", f32, None),
         *[helper.make_tensor_value_info(f"else_{n_}", f32, None) for n_ in state_outputs]])
    n_state = len(state_outputs)

    ax0, ax1 = (c(f"gen_ax{i}", np.array([i], np.int64)) for i in range(2))
    c("gen_v", np.array([vocab_size], np.int64))
    c("gen_inf", np.array(np.inf, np.float32))
    c("gen_ninf", np.array(-np.inf, np.float32))
    c("gen_zero_i", np.array(0, np.int64))
    c("gen_one_1", np.array([1], np.int64))

    def sample(p: str, logits: str, noise: str, filters: bool) -> tuple[list, str]:
        """Nodes sampling one id per row: logits and noise (1, B, V) -> ids (1, B) int64."""
        nodes_ = [node("Mul", [logits, "gen_inv_t"], f"{p}scaled")]
        scaled = f"{p}scaled"
        if filters:
            nodes_ += [
                node("TopK", [scaled, "gen_v"], [f"{p}sorted", f"{p}order"], axis=-1, largest=1, sorted=1),
                node("Softmax", [f"{p}sorted"], f"{p}probs", axis=-1),
                node("CumSum", [f"{p}probs", c(f"{p}axis", np.array(2, np.int64))], f"{p}excl", exclusive=1),
                node("Less", [f"{p}excl", "gen_p"], f"{p}in_p"),  # top-p: keeps the first always
                node("And", [f"{p}in_p", "gen_in_k"], f"{p}keep"),
                node("Where", [f"{p}keep", f"{p}sorted", "gen_inf"], f"{p}kept"),
                node("ReduceMin", [f"{p}kept"], f"{p}cut", axes=[2], keepdims=1),  # opset 17: attribute
                node("GreaterOrEqual", [scaled, f"{p}cut"], f"{p}allowed"),
                node("Where", [f"{p}allowed", scaled, "gen_ninf"], f"{p}filtered"),
            ]
            scaled = f"{p}filtered"
        nodes_ += [
            node("Add", [scaled, noise], f"{p}perturbed"),
            node("ArgMax", [f"{p}perturbed"], f"{p}id", axis=2, keepdims=0),  # (1, B)
        ]
        return nodes_, f"{p}id"

    quantized = _quantized_lstms(model, w["lstms"]) if precision == "int8" else None
    q_added = set()
    emb, kernel = w["emb"], w["kernel"]
    if quantized is not None:  # the sentinels' columns: ±max|embedding| inputs, zero Dense weights
        table = inits[emb]
        bound = np.float32(np.abs(table).max() or 1.0)
        sentinel_cols = np.tile(np.array([bound, -bound], np.float32), (len(table), 1))
        emb = c("gen_q_embedding", np.concatenate([table, sentinel_cols], axis=1))  # (V, E + 2)
        kernel = c("gen_q_kernel", np.concatenate(
            [inits[kernel], np.zeros((SENTINELS, inits[kernel].shape[1]), np.float32)]))  # (H + 2, V)

    def lstm_nodes(k: int, lstm, x: str, h_in: str, c_in: str, outs: list[str]) -> list:
        if quantized is None:
            return [node("LSTM", [x, *lstm.input[1:4], "", h_in, c_in], outs,
                         **{a.name: helper.get_attribute_value(a) for a in lstm.attribute})]
        qnode, qinits = quantized[k]
        rename = {i.name: f"gen_q{k}_{i.name}" for i in qinits}
        ins = [rename.get(i, i) for i in qnode.input]
        ins[0], ins[5], ins[6] = x, h_in, c_in
        for i in qinits:
            if rename[i.name] in ins and rename[i.name] not in q_added:
                t = onnx.TensorProto()
                t.CopyFrom(i)
                t.name = rename[i.name]
                const.append(t)
                q_added.add(t.name)
        return [node("DynamicQuantizeLSTM", ins, outs, domain="com.microsoft",
                     **{a.name: helper.get_attribute_value(a) for a in qnode.attribute})]

    def state_vi(name):
        return helper.make_tensor_value_info(name, f32, [1, "batch", None])

    def generate(filters: bool) -> tuple[list, list[str]]:
        """A Loop of K samples -> nodes, [ids (K, B), state...]."""
        p = "f_" if filters else "n_"
        body = [
            node("Identity", ["cond_in"], "cond_out"),
            node("Gather", ["gen_noise4", "iter"], "noise_t", axis=0),  # (1, B, V)
            node("Gather", [emb, "prev_in"], "x0", axis=0),  # (1, B, E)
        ]
        x = "x0"
        for k, lstm in enumerate(w["lstms"]):
            body += lstm_nodes(k, lstm, x, f"s{2 * k}_in", f"s{2 * k + 1}_in",
                               [f"y{k}", f"s{2 * k}_out", f"s{2 * k + 1}_out"])
            x = f"s{2 * k}_out"  # Y_h (1, B, H) is the next layer's input for T = 1
        body += [node("MatMul", [x, kernel], "z"), node("Add", ["z", w["bias"]], "logits_t")]
        body_sample, body_id = sample("", "logits_t", "noise_t", filters)
        body += body_sample
        body += [node("Identity", [body_id], "prev_out"),
                 node("Concat", ["ids_in", body_id], "ids_out", axis=0)]  # (t + 1, B)
        loop_body = helper.make_graph(
            body, f"{p}generate_step",
            [helper.make_tensor_value_info("iter", i64, []), helper.make_tensor_value_info("cond_in", bool_, []),
             helper.make_tensor_value_info("prev_in", i64, [1, "batch"]),
             *[state_vi(f"s{i}_in") for i in range(n_state)],
             helper.make_tensor_value_info("ids_in", i64, [None, "batch"])],
            [helper.make_tensor_value_info("cond_out", bool_, []),
             helper.make_tensor_value_info("prev_out", i64, [1, "batch"]),
             *[state_vi(f"s{i}_out") for i in range(n_state)],
             helper.make_tensor_value_info("ids_out", i64, [None, "batch"])],
        )
        outs = [f"{p}ids", *[f"{p}s{i}" for i in range(n_state)]]
        loop = node("Loop", [f"{p}trips", "gen_true", "gen_prev0", *state0, "gen_ids0"],
                    [f"{p}prev_last", *outs[1:], outs[0]], body=loop_body)
        return [loop], outs

    c("gen_true", np.array(True))
    nodes = [
        # K > 0: the step model takes char_ids[:, :-1] and the loop starts from char_ids[:, -1].
        node("Shape", [CHAR_IDS], "gen_b", start=0, end=1),  # [B]
        node("Shape", [CHAR_IDS], "gen_t_ids", start=1, end=2),  # [T]
        node("Shape", [NOISE], "gen_k_1", start=1, end=2),  # [K]
        node("Min", ["gen_k_1", "gen_one_1"], "gen_sampling"),  # [1] if K > 0 else [0]
        node("Sub", ["gen_t_ids", "gen_sampling"], "gen_t_step"),
        node("Slice", [CHAR_IDS, c("gen_start", np.array([0], np.int64)), "gen_t_step", ax1], "gen_step_ids"),
        node("Greater", ["gen_t_step", c("gen_zero_1", np.array([0], np.int64))], "gen_run_step"),
        node("Concat", ["gen_b", c("gen_0v", np.array([0, vocab_size], np.int64))], "gen_empty_logits_shape",
             axis=0),
        node("If", ["gen_run_step"], [LOGITS, *[step_out[n_] for n_ in state_outputs]],
             then_branch=then_branch, else_branch=else_branch),
        node("Slice", [CHAR_IDS, c("gen_minus1", np.array([-1], np.int64)),
                       c("gen_end", np.array([np.iinfo(np.int64).max], np.int64)), ax1], "gen_last_b1"),
        node("Transpose", ["gen_last_b1"], "gen_last_1b", perm=[1, 0]),
        node("Cast", ["gen_last_1b"], "gen_prev0", to=i64),  # (1, B)
        node("Concat", ["gen_zero_1", "gen_b"], "gen_ids0_shape", axis=0),
        node("ConstantOfShape", ["gen_ids0_shape"], "gen_ids0",
             value=numpy_helper.from_array(np.zeros(1, np.int64))),  # (0, B)
    ]
    state0 = [f"gen_{n_}_0" for n_ in state_outputs]  # (1, B, H), the ONNX LSTM state layout
    if quantized is None:
        nodes += [node("Unsqueeze", [step_out[n_], ax0], s0) for n_, s0 in zip(state_outputs, state0)]
    else:  # (1, B, H + 2): the sentinels' h and c appended (h, c alternate in state_outputs)
        nodes += [
            node("Concat", [ax1, "gen_b", c("gen_two", np.array([SENTINELS], np.int64))], "gen_sentinel_shape",
                 axis=0),
            node("Expand", [c("gen_sentinel_h", SENTINEL_H[None, None]), "gen_sentinel_shape"], "gen_sentinel_h_b"),
            node("Expand", [c("gen_sentinel_c", SENTINEL_C[None, None]), "gen_sentinel_shape"], "gen_sentinel_c_b"),
        ]
        for i, (n_, s0) in enumerate(zip(state_outputs, state0)):
            nodes += [node("Unsqueeze", [step_out[n_], ax0], f"{s0}_real"),
                      node("Concat", [f"{s0}_real", "gen_sentinel_c_b" if i % 2 else "gen_sentinel_h_b"], s0, axis=2)]
    c("gen_shape_1b1", np.array([1, -1, 1], np.int64))
    nodes += [
        # Per-row settings, (1, B, 1) and (1, B, V).
        node("Reshape", [TEMPERATURE, "gen_shape_1b1"], "gen_temp"),
        node("Max", ["gen_temp", c("gen_tmin", np.array(GREEDY_TEMPERATURE, np.float32))], "gen_temp_safe"),
        node("Reciprocal", ["gen_temp_safe"], "gen_inv_t"),
        node("Reshape", [TOP_P, "gen_shape_1b1"], "gen_p_row"),
        node("Reshape", [TOP_K, "gen_shape_1b1"], "gen_k_row"),
        node("Less", [c("gen_rank", np.arange(vocab_size, dtype=np.int64)[None, None]), "gen_k_row"], "gen_k_in"),
        node("LessOrEqual", ["gen_k_row", "gen_zero_i"], "gen_k_off"),
        node("Or", ["gen_k_in", "gen_k_off"], "gen_in_k"),
        # Does any row filter? (top_k > 0 or top_p < 1) -> the loop with filters, else the lean one.
        node("Not", ["gen_k_off"], "gen_k_on"),
        node("Less", ["gen_p_row", c("gen_one_f", np.array(1, np.float32))], "gen_p_on"),
        # top_p >= 1 keeps every character, also those after a cumulative probability that
        # rounds to 1 (rows without filters then sample as in the lean loop, bit for bit).
        node("Where", ["gen_p_on", "gen_p_row", "gen_inf"], "gen_p"),
        node("Or", ["gen_k_on", "gen_p_on"], "gen_row_filters"),
        node("Cast", ["gen_row_filters"], "gen_row_filters_i", to=i64),
        node("ReduceMax", ["gen_row_filters_i"], "gen_any_i", keepdims=0),
        node("Cast", ["gen_any_i"], "gen_any_filters", to=bool_),
        # Noise time-major (K, 1, B, V).
        node("Transpose", [NOISE], "gen_noise_kbv", perm=[1, 0, 2]),
        node("Unsqueeze", ["gen_noise_kbv", ax1], "gen_noise4"),
        node("Squeeze", ["gen_k_1", ax0], "gen_k"),
        # Two loops, one runs: an If around them would double the cost of every step (onnxruntime
        # runs a Loop nested in an If much slower), so the unused one gets 0 trips.
        node("Where", ["gen_any_filters", "gen_k", "gen_zero_i"], "f_trips"),
        node("Where", ["gen_any_filters", "gen_zero_i", "gen_k"], "n_trips"),
    ]
    with_filters, f_outs = generate(True)
    lean, n_outs = generate(False)
    nodes += with_filters + lean
    # The loop that did not run returns its initial values: no ids (0, B), the state it was given.
    nodes.append(node("Concat", [f_outs[0], n_outs[0]], "gen_ids_kb", axis=0))
    nodes += [node("Where", ["gen_any_filters", f, n], f"gen_s{i}")
              for i, (f, n) in enumerate(zip(f_outs[1:], n_outs[1:]))]
    nodes += [
        node("Transpose", ["gen_ids_kb"], "gen_ids_bk", perm=[1, 0]),  # (K, B) -> (B, K)
        node("Cast", ["gen_ids_bk"], SAMPLED_IDS, to=i32),
    ]
    for i, n_ in enumerate(state_outputs):  # the state before the pending (last sampled) id
        final = f"gen_s{i}"
        if quantized is not None:  # without the sentinels
            final = f"gen_s{i}_real"
            nodes.append(node("Slice", [f"gen_s{i}", c(f"gen_s{i}_from", np.array([0], np.int64)),
                                        c(f"gen_s{i}_to", np.array([hidden[i // 2]], np.int64)),
                                        c(f"gen_s{i}_axis", np.array([2], np.int64))], final))
        nodes.append(node("Squeeze", [final, ax0], n_))

    g.node.extend(nodes)
    g.initializer.extend(const)
    g.input.extend([
        helper.make_tensor_value_info(NOISE, f32, ["batch", "steps", vocab_size]),
        helper.make_tensor_value_info(TEMPERATURE, f32, ["batch"]),
        helper.make_tensor_value_info(TOP_K, i64, ["batch"]),
        helper.make_tensor_value_info(TOP_P, f32, ["batch"]),
    ])
    g.output.extend([helper.make_tensor_value_info(n_, f32, ["batch", None]) for n_ in state_outputs])
    g.output.append(helper.make_tensor_value_info(SAMPLED_IDS, i32, ["batch", "steps"]))
    if precision == "int8" and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model

